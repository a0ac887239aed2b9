"""Training step time of VeRA, LoHa and LoKr against ``lora_ext`` at the same shapes, on a legacy
MindFormers Llama on CPU, in one run.

Each (size, setup) runs in a fresh interpreter, one after another (never in parallel), which:

* loads ``configs/tiny/lora_ext.yaml`` (the CPU recipe), sets the model dims of ``--sizes`` and
  the setup's ``pet_config`` (same targets ``wq|wk|wv|wo`` for all; ranks: lora_ext r 8, vera
  r 256, loha r 8, lokr r 8 -- each method's usual size, PEFT's defaults for the three new ones);
* builds what ``Trainer.train()`` builds with MindFormers' own builders: ``build_network`` ->
  ``build_lr`` -> ``get_optimizer_grouped_parameters`` -> ``build_optim`` (the YAML's AdamW) ->
  ``build_wrapper`` (``CpuSafeTrainOneStepCell``, grad clipping and the overflow check on);
* runs ``--warmup`` steps (the first compiles), then times ``--steps`` steps of
  ``wrapper(input_ids, labels)`` on fixed random inputs, each synchronised on its loss.

Every setup runs ``--rounds`` times, the rounds interleaved (each round starts one setup later);
the table shows per setup the round with the lowest median wall time (other load on a shared
machine only makes a round slower) and every round's median, plus the lowest median of the
process CPU time per step (all threads; much less sensitive to other load than wall time, but
it counts work, not latency). Ratios are against ``lora_ext`` of the same size. The fresh-process
runner and the round order are ``benchmarks/_rounds.py``'s (shared with ``step_time.py``); this
table is its own.

    python benchmarks/adapter_step_time.py                      # tiny, all four, 2 rounds
    python benchmarks/adapter_step_time.py --sizes tiny,small --rounds 3 --threads 1
"""
import argparse
import json
import resource
import statistics
import sys
import time

from _rounds import rotated, run_fresh  # pylint: disable=import-error

MARK = "ADAPTER_STEP_TIME "
TARGETS = ".*wq|.*wk|.*wv|.*wo"
SETUPS = {
    "lora_ext": {"pet_type": "lora_ext", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "vera": {"pet_type": "vera", "r": 256, "d_initial": 0.1},
    "loha": {"pet_type": "loha", "r": 8, "alpha": 8},
    "lokr": {"pet_type": "lokr", "r": 8, "alpha": 8},
}
SIZES = {  # tiny = the dims of configs/tiny/lora_ext.yaml; vocab 128 in both
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "seq_length": 32, "batch_size": 2},
    "small": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "seq_length": 256, "batch_size": 2},
}
DEFAULT_STEPS = {"tiny": 60, "small": 15}


def run_child(spec):
    """Build, warm up and time one (size, setup); returns the result dict."""
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import mindspore as ms
    from mindformers.tools.register import MindFormerConfig
    from _trainer_step import build_train_step, sized_config  # pylint: disable=import-error

    dims = SIZES[spec["size"]]
    config = sized_config(dims)
    config.model.model_config.pet_config = MindFormerConfig(**dict(SETUPS[spec["setup"]], target_modules=TARGETS))

    total_steps = spec["warmup"] + spec["steps"]
    network, wrapper = build_train_step(config, total_steps, spec["threads"])

    inner = getattr(network, "network", network)
    trainable = network.trainable_params()
    if not trainable or type(inner).__name__ == "LlamaForCausalLM":
        raise RuntimeError(f"{spec['setup']}: no adapter was built (is mindformers-lora-ext installed?)")
    rng = np.random.default_rng(0)
    shape = (dims["batch_size"], dims["seq_length"] + 1)
    input_ids = ms.Tensor(rng.integers(3, config.model.model_config.vocab_size, shape), ms.int32)
    labels = ms.Tensor(rng.integers(3, config.model.model_config.vocab_size, shape), ms.int32)
    times, cpu_times, losses = [], [], []
    first = None
    for step in range(total_steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = wrapper(input_ids, labels)
        loss = float(out[0].asnumpy().reshape(-1)[0])  # waits for the step
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        first = elapsed if first is None else first
        if step >= spec["warmup"]:
            times.append(elapsed * 1e3)
            cpu_times.append(cpu * 1e3)
        losses.append(loss)
    ordered = sorted(times)
    return {"size": spec["size"], "setup": spec["setup"], "model": type(inner).__name__,
            "trainable": int(sum(p.size for p in trainable)),
            "median_ms": statistics.median(times), "cpu_median_ms": statistics.median(cpu_times),
            "p10_ms": ordered[int(0.1 * (len(times) - 1))],
            "p90_ms": ordered[int(round(0.9 * (len(times) - 1)))], "first_step_s": first,
            "loss_first": losses[0], "loss_last": losses[-1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(spec, timeout):
    """One (size, setup) in a fresh interpreter (its own temp cwd: MindFormers writes ./output);
    returns (result or None, error text or None)."""
    result, _, error = run_fresh(__file__, MARK, spec, f"adapter_step_{spec['size']}_{spec['setup']}_",
                                 timeout, 15, tail_label="last lines")
    return result, error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="tiny", help=f"comma list of {sorted(SIZES)} (default tiny)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma list (default: all four)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default per size)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per setup, interleaved (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="MindSpore CPU op threads (default 0: MindSpore's own choice); 1 makes wall "
                             "time steadier on a busy shared machine")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child (default 900)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    sizes, setups = args.sizes.split(","), args.setups.split(",")
    for name in sizes + setups:
        if name not in SIZES and name not in SETUPS:
            parser.error(f"unknown size or setup {name!r}")
    rounds = {}
    failed = False
    for size in sizes:
        for round_index in range(args.rounds):
            for setup in rotated(setups, round_index):
                spec = {"size": size, "setup": setup, "warmup": args.warmup, "threads": args.threads,
                        "steps": args.steps or DEFAULT_STEPS[size]}
                result, error = run_one(spec, args.timeout)
                if error:
                    print(f"[{size}/{setup}] FAILED: {error}", flush=True)
                    failed = True
                    continue
                print(f"[{size}/{setup} round {round_index + 1}] median {result['median_ms']:.2f} ms/step",
                      flush=True)
                rounds.setdefault((size, setup), []).append(result)
    print()
    print(f"{'size':<6} {'setup':<9} {'trainable':>9} {'median ms':>10} {'p10-p90 ms':>15} {'x lora_ext':>10} "
          f"{'cpu ms':>8} {'x lora_ext':>10} {'compile+1st s':>13} {'RSS MB':>7}  rounds' medians")
    table = []
    for size in sizes:
        reference = rounds.get((size, "lora_ext"))
        ref_ms = min(r["median_ms"] for r in reference) if reference else None
        ref_cpu = min(r["cpu_median_ms"] for r in reference) if reference else None
        for setup in setups:
            results = rounds.get((size, setup))
            if not results:
                continue
            best = min(results, key=lambda r: r["median_ms"])
            cpu = min(r["cpu_median_ms"] for r in results)
            ratio = best["median_ms"] / ref_ms if ref_ms else float("nan")
            cpu_ratio = cpu / ref_cpu if ref_cpu else float("nan")
            best.update(ratio_vs_lora_ext=ratio, best_cpu_median_ms=cpu, cpu_ratio_vs_lora_ext=cpu_ratio)
            table.append(best)
            print(f"{size:<6} {setup:<9} {best['trainable']:>9} {best['median_ms']:>10.2f} "
                  f"{best['p10_ms']:>7.2f}-{best['p90_ms']:<7.2f} {ratio:>10.2f} {cpu:>8.2f} {cpu_ratio:>10.2f} "
                  f"{best['first_step_s']:>13.1f} {best['peak_rss_mb']:>7.0f}  "
                  + ", ".join(f"{r['median_ms']:.2f}" for r in results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(table, handle, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
