"""Loss after N training steps for LoRA initialised by kaiming (plain LoRA), PiSSA, EVA, CorDA and
LoRA-GA at the same rank, lr and seeds, on the tiny counting task (mindformers_lora_ext.tiny_data),
and the wall time of each data-driven statistics pass divided by one training step.

Each (size, init) runs in a fresh interpreter, one after another, which:

* loads ``configs/tiny/lora_ext.yaml`` (the CPU recipe), sets the model dims of the size and
  ``pet_config`` = lora_ext r 8, alpha 16 on ``wq|wk|wv|wo`` with the init (same everywhere else);
* builds what ``Trainer.train()`` builds (``benchmarks/_trainer_step.py``: network, AdamW at
  lr 1e-2, ``CpuSafeTrainOneStepCell``) with ``ms.set_seed(0)``, so the base weights are the same;
* for eva / corda / lora_ga runs the statistics pass (``data_init.runner.initialize``, what the
  ``DataDrivenInit`` callback runs) on the first ``--batches`` batches of the training rows,
  timed (its first batch compiles the pass's graph: reported apart);
* trains ``--steps`` steps on the counting rows in order (batch 2), recording every loss.

The table: loss at steps N/4, N/2 and the mean of the last 4 (this is evidence, not a pass/fail:
one seed, one tiny task), the pass's seconds (and without its first batch), the median training
step, and pass / step (how many training steps the initialisation costs).

    python benchmarks/data_init_convergence.py                       # tiny and small
    python benchmarks/data_init_convergence.py --sizes tiny --steps 64
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _rounds import run_fresh  # pylint: disable=import-error
from step_time import SIZES as STEP_TIME_SIZES  # pylint: disable=import-error

MARK = "DATA_INIT_RESULT "
TARGETS = ".*wq|.*wk|.*wv|.*wo"
INITS = ("kaiming", "pissa", "eva", "corda", "lora_ga")
# step_time.py's dims, vocab 128 (the generated data's)
SIZES = {name: dict(STEP_TIME_SIZES[name], vocab_size=128) for name in ("tiny", "small")}
DEFAULT_STEPS = {"tiny": 64, "small": 32}


def run_child(spec):
    """Initialise, train and time one (size, init); returns the result dict."""
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import mindspore as ms
    from mindspore.mindrecord import FileReader
    from mindformers.tools.register import MindFormerConfig
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    from _trainer_step import build_train_step, sized_config  # pylint: disable=import-error

    dims = SIZES[spec["size"]]
    config = sized_config(dims)
    init = spec["init"]
    pet = dict(pet_type="lora_ext", lora_rank=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
               init_lora_weights=True if init == "kaiming" else init)
    config.model.model_config.pet_config = MindFormerConfig(**pet)
    config.lr_schedule.learning_rate = 1e-2
    ms.set_seed(0)
    network, wrapper = build_train_step(config, spec["steps"])

    batch = dims["batch_size"]
    path = write_tiny_dataset(os.path.join(tempfile.mkdtemp(), "rows.mindrecord"), num_rows=spec["steps"] * batch,
                              seq_length=dims["seq_length"], vocab_size=128, seed=0)
    reader = FileReader(path)
    rows = list(reader.get_next())
    reader.close()
    batches = [(ms.Tensor(np.stack([r["input_ids"] for r in rows[i:i + batch]]).astype(np.int32)),
                ms.Tensor(np.stack([r["labels"] for r in rows[i:i + batch]]).astype(np.int32)))
               for i in range(0, len(rows), batch)]

    result = {"size": spec["size"], "init": init, "pass_s": None, "pass_first_s": None}
    if init in ("eva", "corda", "lora_ga"):
        from mindformers_lora_ext.data_init import runner
        model = next(c for _, c in network.cells_and_names() if hasattr(c, "data_init_pending"))
        start = time.perf_counter()
        report = runner.initialize(model, wrapper.network, batches[:spec["batches"]], ["input_ids", "labels"],
                                   spec["batches"], lambda line: None)
        result.update(pass_s=time.perf_counter() - start, pass_first_s=report.first_batch_s,
                      pass_batches=report.batches, ranks=sorted(report.ranks.values()) if report.ranks else None)
    losses, times = [], []
    for inputs in batches:
        start = time.perf_counter()
        out = wrapper(*inputs)
        losses.append(float(out[0].asnumpy().reshape(-1)[0]))
        times.append(time.perf_counter() - start)
    result.update(losses=losses, step_ms=statistics.median(times[2:]) * 1e3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--inits", default=",".join(INITS), help=f"comma list of {list(INITS)}")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--batches", type=int, default=8, help="batches of the statistics pass (default 8)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    sizes, inits = args.sizes.split(","), args.inits.split(",")
    bad = [s for s in sizes if s not in SIZES] + [i for i in inits if i not in INITS]
    if bad:
        parser.error(f"unknown {bad}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; lora_ext r 8 "
          f"alpha 16 on '{TARGETS}', AdamW lr 1e-2, seed 0, statistics on {args.batches} batches")
    rows, failed = [], False
    for size in sizes:
        for init in inits:
            spec = {"size": size, "init": init, "steps": args.steps or DEFAULT_STEPS[size], "batches": args.batches}
            res, wall, error = run_fresh(__file__, MARK, spec, f"data_init_{size}_{init}_", args.timeout, 25)
            if res is None:
                print(f"[{size} {init}] FAILED after {wall:.0f} s: {error}", flush=True)
                failed = True
                continue
            print(f"  [{size} {init}] done in {wall:.0f} s", flush=True)
            rows.append(res)
    header = ("size", "init", "loss@N/4", "loss@N/2", "loss last 4", "pass s", "pass s w/o compile",
              "step ms", "pass/step", "EVA ranks")
    table = []
    for r in rows:
        n = len(r["losses"])
        pass_s = r["pass_s"]
        table.append((r["size"], r["init"], f"{r['losses'][n // 4 - 1]:.3f}", f"{r['losses'][n // 2 - 1]:.3f}",
                      f"{statistics.mean(r['losses'][-4:]):.3f}", "-" if pass_s is None else f"{pass_s:.2f}",
                      "-" if pass_s is None else f"{pass_s - r['pass_first_s']:.2f}", f"{r['step_ms']:.1f}",
                      "-" if pass_s is None else f"{pass_s / (r['step_ms'] / 1e3):.1f}",
                      "-" if not r.get("ranks") else f"{min(r['ranks'])}..{max(r['ranks'])}"))
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(len(header))]
    print()
    print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
