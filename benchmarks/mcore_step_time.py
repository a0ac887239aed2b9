"""Training step time of stock ``lora``, our ``lora_ext`` and ``dora`` (and, on Qwen3-MoE, our
``lora_ext`` on the routed experts too), side by side in one run, on MindFormers' mcore models
(``use_legacy: False``) Qwen3 and Qwen3-MoE on CPU.

NOT A MEASUREMENT OF THE ASCEND KERNELS. MindSpore 2.9 has no CPU kernels for several primitives
these mcore training graphs build, so every child process installs the TEST-SIDE CPU STAND-INS of
``tests/mcore_cpu.py`` (``mcore_cpu.install()``: ``RmsNorm``, the rotary ``Outer``,
``FlashAttentionScore``) and ``tests/mcore_cpu_moe.py`` (installed by the same call: the MoE
experts' ``GroupedMatmul``/``Swiglu``, the token dispatcher's sort/index/cumsum ops, the
router's ``TopkExt``), and routes our expert-adapter layer's ``grouped_matmul``/``swiglu``
(``mindformers_lora_ext.tuners.experts``) to ``mcore_cpu_moe.cpu_grouped_matmul``/``cpu_swiglu``
(module attribute assignment before the model is built; done here when ``mcore_cpu_moe.install()``
has not done it already). Those stand-ins are plain-op test code, never shipped: the CPU grouped
matmul multiplies every row by every expert's weight (E times a dense matmul), attention is an
unfused softmax(QK^T)V. So the absolute times, and on Qwen3-MoE every ratio involving experts,
say how MindFormers' graph plus our adapters behave around CPU stand-ins, not what Ascend's fused
kernels would do. The adapter math of ours and of stock LoRA is the product code in both cases.

For each (model, size, setup) a fresh interpreter (run one after another, never in parallel):

* loads the tiny CPU config of the model (``configs/tiny/qwen3_lora_ext.yaml`` or
  ``configs/tiny/qwen3_moe_lora_ext.yaml``, top-level ``use_legacy: False``, graph mode) as a
  ``MindFormerConfig``, sets the model dims of the size (``tiny``: the YAML as it is) and the
  setup's ``pet_config``;
* builds what ``Trainer.train()`` builds, with MindFormers' own builders, through
  ``benchmarks/_trainer_step.py``'s ``build_train_step``: ``build_context`` (which, for
  ``use_legacy: False`` fine-tuning, sets ``MS_DEV_JIT_SYNTAX_LEVEL=0`` as the trainer does) ->
  ``build_parallel_config`` -> ``build_network`` -> ``DataOrderWrapperCell(['input_ids',
  'labels'])`` (the trainer's wrapping: mcore ``construct`` takes ``position_ids`` second) ->
  ``build_lr`` -> ``get_optimizer_grouped_parameters`` (trainable parameters only) ->
  ``build_optim`` (the YAML's AdamW) -> ``build_wrapper`` (the YAML's ``CpuSafeTrainOneStepCell``,
  grad clipping and the overflow check on);
* runs ``--warmup`` steps (the first compiles the graph), then times ``--steps`` steps of
  ``wrapper(input_ids, labels)`` on fixed random int32 ``[batch, seq]`` inputs (mcore takes
  labels already shifted, unlike legacy Llama's ``seq + 1``), each synchronised on its loss;
* checks that every trainable parameter is an adapter one (name contains ``lora``).

Setups (rank 8, alpha 16, dropout 0, attention targets ``linear_qkv`` (q/k/v fused) and
``linear_proj``): ``lora`` = MindFormers' stock LoRA (target regex ``.*linear_qkv|.*linear_proj``;
on mcore models PetModel freezes by globs only, so it gets ``freeze_include: ['*']``,
``freeze_exclude: ['*lora*']``), ``lora_ext`` and ``dora`` = ours; on Qwen3-MoE also
``lora_ext_experts`` = ``lora_ext`` on ``[linear_qkv, linear_proj, linear_fc1, linear_fc2]``,
where ``linear_fc1``/``linear_fc2`` also reach the routed experts' grouped fc1/fc2 (our virtual
names; per-expert A/B through the grouped matmul) and any shared experts (Qwen3-MoE has none).
No full fine-tune: on CPU the mcore embedding's backward (``EmbeddingDenseBackward``) has no
kernel.

Rounds, table and ratios as in ``benchmarks/step_time.py`` (the same code,
``benchmarks/_rounds.py``): each setup runs ``--rounds`` times (fresh processes, setups
interleaved, each round starting one setup later); the table shows the round with the lowest
median and every round's median; a setup whose round medians differ by more than NOISY (15 %) is
marked ``noisy``, and so is every ratio it enters. Ratios against goals get PASS/FAIL marks (not
asserts): ``lora_ext / lora <= 1.00``, ``dora / lora_ext <= 1.15``; ``lora_ext_experts /
lora_ext`` (MoE) and ``lora_ext_per_module / lora_ext`` (``fused_cells: per_hf_module``: q, k, v
adapters of rank 8 each inside ``linear_qkv``, so rank 24 there, block-masked) are reported without
a goal. MindFormers' logs are captured; a failed setup
prints its last lines and the run goes on. Default invocation: 28 fresh processes, most of each
one's time being import + graph compile (10-30 s); estimated at 8-10 minutes on 2 idle CPU cores
from single runs timed on a busy machine (about 12 minutes there).

``benchmarks/step_time.py --models qwen3`` runs this script's child (``run_child``) for its Qwen3
rows, beside the Llama ones, with a dropout of its own (``--qwen3_dropout``) and our kernel
settings (``extra`` pet_config keys).

    python benchmarks/mcore_step_time.py                       # both models, tiny and small
    python benchmarks/mcore_step_time.py --models qwen3_moe --sizes small --rounds 3 --threads 1
"""
import argparse
import json
import os
import sys
import time

from _rounds import (add_run_arguments, any_failed, chosen, print_ratios,  # pylint: disable=import-error
                     print_table, run_fresh, run_rounds)

MARK = "MCORE_STEP_TIME_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
MODELS = {
    "qwen3": os.path.join(ROOT, "configs", "tiny", "qwen3_lora_ext.yaml"),
    "qwen3_moe": os.path.join(ROOT, "configs", "tiny", "qwen3_moe_lora_ext.yaml"),
}
SETUPS = ("lora", "lora_ext", "dora", "lora_ext_experts", "lora_ext_per_module")
MOE_ONLY = ("lora_ext_experts",)
ATTENTION = ["linear_qkv", "linear_proj"]
EXPERTS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RANK, ALPHA = 8, 16
INPUT_COLUMNS = ["input_ids", "labels"]  # the tiny YAMLs' train_dataset.input_columns
# model_config keys (as the tiny YAMLs spell them) and batch size per size; tiny = the YAMLs as
# they are (hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16, seq 32, vocab 128, batch 2;
# MoE 4 experts top-2, moe_intermediate 32). The MoE routing keys (no capacity factor: dropless)
# stay the YAML's.
SIZES = {
    "tiny": {"model": {}, "moe": {}, "batch_size": None},
    "small": {"model": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1408,
                        "seq_length": 256, "max_position_embeddings": 256, "vocab_size": 4096},
              "moe": {"moe_intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2},
              "batch_size": 2},
    "s3": {"model": {"hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
                     "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 2816,
                     "seq_length": 256, "max_position_embeddings": 256, "vocab_size": 4096},
           "moe": {"moe_intermediate_size": 512, "num_experts": 8, "num_experts_per_tok": 2},
           "batch_size": 2},
}
DEFAULT_STEPS = {"tiny": 20, "small": 8, "s3": 6}  # timed steps when --steps is not given
# (numerator, denominator, bound): "numerator <= bound x denominator" is the goal; None: report only
GOALS = (("lora_ext", "lora", 1.0), ("dora", "lora_ext", 1.15), ("lora_ext_experts", "lora_ext", None),
         ("lora_ext_per_module", "lora_ext", None))


# ----------------------------------------------------------------------------- child side

def _pet_config(setup, dropout=0.0, extra=None):
    """The pet_config of ``setup``; ``extra``: more keys for ours (e.g. use_fused_kernel)."""
    common = {"lora_rank": RANK, "lora_alpha": ALPHA, "lora_dropout": dropout}
    if setup == "lora":  # stock: a regex (re.match); mcore PetModel freezes by these globs only
        return dict(common, pet_type="lora", target_modules="|".join(f".*{t}" for t in ATTENTION),
                    freeze_include=["*"], freeze_exclude=["*lora*"])
    common.update(extra or {})
    if setup == "lora_ext_experts":
        return dict(common, pet_type="lora_ext", target_modules=list(EXPERTS))
    if setup == "lora_ext_per_module":  # q, k, v adapters of their own inside linear_qkv, as HF trains them
        return dict(common, pet_type="lora_ext", target_modules=list(ATTENTION), fused_cells="per_hf_module")
    return dict(common, pet_type=setup, target_modules=list(ATTENTION))


def _install_cpu_standins():
    """The test-side CPU stand-ins (tests/mcore_cpu.py, which installs tests/mcore_cpu_moe.py
    too), and our expert layer's grouped matmul / swiglu routed to mcore_cpu_moe's; returns what
    this function had to patch itself (empty once mcore_cpu_moe.install() does it)."""
    # pylint: disable=import-outside-toplevel,import-error
    sys.path.insert(0, TESTS)
    import mcore_cpu
    import mcore_cpu_moe
    from mindformers_lora_ext.tuners import experts
    mcore_cpu.install()
    if not mcore_cpu_moe.is_installed():
        raise RuntimeError("mcore_cpu.install() did not install tests/mcore_cpu_moe.py's stand-ins")
    patched = []
    for name, standin in (("grouped_matmul", mcore_cpu_moe.cpu_grouped_matmul),
                          ("swiglu", mcore_cpu_moe.cpu_swiglu)):
        if getattr(experts, name).__module__ == experts.__name__:  # still the Ascend primitive call
            setattr(experts, name, standin)
            patched.append(name)
    return patched


def run_child(spec):
    """Build, warm up and time one (model, size, setup); returns the result dict."""
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import mindspore as ms
    from mindformers.pet import is_supported_pet_type
    from mindformers.tools.register import MindFormerConfig
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _trainer_step import arch_of, build_train_step, time_steps  # pylint: disable=import-error

    patched = _install_cpu_standins()
    model, size, setup = spec["model"], spec["size"], spec["setup"]
    config = MindFormerConfig(MODELS[model])
    if config.use_legacy is not False:
        raise RuntimeError(f"{MODELS[model]}: use_legacy is {config.use_legacy!r}, not False")
    config.output_dir = os.path.join(os.getcwd(), "output")
    model_config = config.model.model_config
    dims = SIZES[size]
    for key, value in dict(dims["model"], **(dims["moe"] if model == "qwen3_moe" else {})).items():
        if key not in model_config:
            raise RuntimeError(f"{MODELS[model]} has no model_config key {key!r}")
        model_config[key] = value
    if dims["batch_size"]:
        config.runner_config.batch_size = config.train_dataset.batch_size = dims["batch_size"]
    if list(config.train_dataset.input_columns) != INPUT_COLUMNS:
        raise RuntimeError(f"input_columns {config.train_dataset.input_columns}, expected {INPUT_COLUMNS}")
    pet_config = _pet_config(setup, spec.get("dropout", 0.0), spec.get("extra"))
    if not is_supported_pet_type(pet_config["pet_type"]):
        raise RuntimeError(f"pet_type {pet_config['pet_type']!r} is not registered: "
                           "is mindformers-lora-ext installed?")
    model_config.pet_config = MindFormerConfig(**pet_config)

    # what run_mindformer.py main() and Trainer.__init__ / training_process do, in order
    total_steps = spec["warmup"] + spec["steps"]
    network, wrapper = build_train_step(config, total_steps, spec["threads"],
                                        construct_args_key=INPUT_COLUMNS)

    trainable = network.trainable_params()
    not_adapter = [p.name for p in trainable if "lora" not in p.name]
    if not trainable or not_adapter:
        raise RuntimeError(f"{setup}: trainable parameters should be the adapter's only; "
                           f"{len(trainable)} trainable, not adapter: {not_adapter[:5]}")
    batch, seq = config.runner_config.batch_size, model_config.seq_length
    result = {
        "model": model, "size": size, "setup": setup,
        "arch": arch_of(network),
        "wrapper": type(wrapper).__name__, "optimizer": type(wrapper.optimizer).__name__,
        "trainable": int(sum(p.size for p in trainable)),
        "total": int(sum(p.size for p in network.get_parameters())),
        "patched": patched, "jit_syntax_level": os.environ.get("MS_DEV_JIT_SYNTAX_LEVEL"),
        "mode": ms.get_context("mode"), "batch": batch, "seq": seq,
    }

    rng = np.random.default_rng(0)
    input_ids = ms.Tensor(rng.integers(3, model_config.vocab_size, (batch, seq)), ms.int32)
    labels = ms.Tensor(rng.integers(3, model_config.vocab_size, (batch, seq)), ms.int32)

    result.update(time_steps(wrapper, input_ids, labels, spec["warmup"], total_steps))
    return result


# ---------------------------------------------------------------------------- parent side

def run_one(spec, timeout, tail):
    """One (model, size, setup) in a fresh interpreter; returns (result or None, wall s, error)."""
    prefix = f"mcore_step_time_{spec['model']}_{spec['size']}_{spec['setup']}_"
    return run_fresh(__file__, MARK, spec, prefix, timeout, tail)


def describe(model, size):
    """One line of the model dims a (model, size) runs with, read from the YAML."""
    import yaml  # pylint: disable=import-outside-toplevel
    with open(MODELS[model], encoding="utf-8") as file:
        cfg = yaml.safe_load(file)
    mc = dict(cfg["model"]["model_config"], **SIZES[size]["model"],
              **(SIZES[size]["moe"] if model == "qwen3_moe" else {}))
    batch = SIZES[size]["batch_size"] or cfg["runner_config"]["batch_size"]
    text = (f"hidden {mc['hidden_size']}, {mc['num_hidden_layers']} layers, {mc['num_attention_heads']} "
            f"heads / {mc['num_key_value_heads']} kv, head_dim {mc['head_dim']}, ")
    if model == "qwen3_moe":
        text += (f"{mc['num_experts']} experts top-{mc['num_experts_per_tok']}, moe_intermediate "
                 f"{mc['moe_intermediate_size']}, capacity factor {mc.get('moe_expert_capacity_factor')}, ")
    else:
        text += f"intermediate {mc['intermediate_size']}, "
    return text + f"seq {mc['seq_length']}, vocab {mc['vocab_size']}, batch {batch}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma list of {list(SETUPS)} ({', '.join(MOE_ONLY)}: qwen3_moe only)")
    add_run_arguments(parser, DEFAULT_STEPS, warmup=2, rounds=2, timeout=900)
    args = parser.parse_args(argv)

    if args.child:
        print(MARK + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    models, sizes, setups = chosen(parser, args, {"--models": MODELS, "--sizes": SIZES, "--setups": SETUPS})

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}; rank {RANK}, alpha {ALPHA}, dropout 0, "
          f"attention targets {ATTENTION}, warmup {args.warmup}, {args.rounds} rounds, "
          f"CPU kernel threads {args.threads or 'MindSpore default'}")
    print("mcore models on CPU through the TEST-SIDE stand-ins of tests/mcore_cpu.py and "
          "tests/mcore_cpu_moe.py: Ascend kernels are not measured")
    for model in models:
        for size in sizes:
            print(f"  {model} {size}: {describe(model, size)}, "
                  f"{args.steps or DEFAULT_STEPS[size]} timed steps")
    skipped = [(m, s) for m in models for s in setups if s in MOE_ONLY and m != "qwen3_moe"]
    if skipped:
        print("  not run: " + ", ".join(f"{m} {s} (MoE only)" for m, s in skipped))
    start = time.perf_counter()

    def run(key):
        model, size, setup = key
        return run_one({"model": model, "size": size, "setup": setup,
                        "steps": args.steps or DEFAULT_STEPS[size], "warmup": args.warmup,
                        "threads": args.threads}, args.timeout, args.tail)

    groups = []  # [((model, size), its setups)] in table order: model, size, setup
    for model in models:
        model_setups = [s for s in setups if (model, s) not in skipped]
        groups += [((model, size), model_setups) for size in sizes if model_setups]
    runs = run_rounds(groups, args.rounds, run, arch_key="arch")  # {(model, size, setup): [...]}
    print()
    print_table(runs, ("model", "size", "setup"))
    if not print_ratios(runs, GOALS, (9, 6), 26, note="; CPU stand-ins"):
        print("  none: each ratio needs both of its setups of one model and size")
    done = [r for rounds in runs.values() for r in rounds if r is not None]
    if done:
        first = done[0]
        patched = sorted({name for r in done for name in r["patched"]})
        print(f"\nwrapper {first['wrapper']}, optimizer {first['optimizer']}, graph mode "
              f"{first['mode']} (0 = GRAPH_MODE), MS_DEV_JIT_SYNTAX_LEVEL={first['jit_syntax_level']}; "
              + (f"this script routed mindformers_lora_ext.tuners.experts.{'/'.join(patched)} to "
                 "mcore_cpu_moe's stand-ins (mcore_cpu_moe.install() did not)" if patched else
                 "expert-layer stand-ins installed by mcore_cpu_moe.install()"))
    print(f"total wall time {time.perf_counter() - start:.0f} s; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    return 1 if any_failed(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
