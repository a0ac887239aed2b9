"""Regenerate the CPU ``use_fused_kernel: auto`` rule (``mindformers_lora_ext/kernels/cpu_auto_rule.json``)
from whole training steps, fused kernel vs the MindSpore composition, side by side in one run.

For each ``--sizes`` Llama of ``step_time.py`` (hidden h, 4 layers, seq 256, batch 2: q/k/v/o are
h x h layers) it times ``lora_ext_fused`` (``use_fused_kernel: true``) and ``lora_ext_composition``
(``auto`` where the rule never picks the fused op: what ``auto`` runs otherwise, the composition
with the kernels' dropout) with ``step_time.py``'s runner: fresh interpreters, the setups interleaved over
``--rounds``, the stock trainer's wrapper and optimizer, the best round's median step. Then,
for the instruction set the kernel library runs on this machine (``flk_isa``), it writes the
smallest h x h from which the fused step was at most ``--goal`` (0.95) times the composition's at
that and every larger measured size, none of them noisy; or null (never). The entries of other
instruction sets in the file are kept. ``--dry-run`` prints without writing; ``--output PATH``
writes (or updates) another file, e.g. for a read-only install: point
``MINDFORMERS_LORA_EXT_CPU_AUTO_RULE`` at it.

    python benchmarks/auto_rule.py                           # small,s3, dropout 0.05, 3 rounds
    python benchmarks/auto_rule.py --sizes s3 --rounds 2 --dry-run

The layer alone is not the measure: ``fused_kernel.py`` showed the op faster than the
composition in isolation where whole steps with it were slower (see ``kernels/dispatch.py``).
"""
import argparse
import datetime
import json
import os
import platform
import sys

from _rounds import best_round, print_table, run_rounds  # pylint: disable=import-error
import step_time  # pylint: disable=import-error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE_FILE = os.path.join(ROOT, "mindformers_lora_ext", "kernels", "cpu_auto_rule.json")
FUSED, COMPOSITION = "lora_ext_fused", "lora_ext_composition"


def machine_isa():
    """The instruction set the CPU kernel library runs here (it is built if needed)."""
    sys.path.insert(0, ROOT)
    from mindformers_lora_ext.kernels.build import build_cpu_library, library_isa  # pylint: disable=import-outside-toplevel
    return library_isa(build_cpu_library())


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decide(rows, goal):
    """The smallest weight size from which every measured row (sorted by size) has a ratio <=
    ``goal`` and is not noisy; None if the largest does not."""
    threshold = None
    for row in sorted(rows, key=lambda r: r["weight_elements"], reverse=True):
        if row["ratio"] is None or row["noisy"] or row["ratio"] > goal:
            break
        threshold = row["weight_elements"]
    return threshold


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,s3", help=f"comma list of {sorted(step_time.SIZES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: step_time.py's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--goal", type=float, default=0.95, help="fused / composition at most this")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--dry-run", action="store_true", help="print the rule, do not write the file")
    parser.add_argument("--output", default=RULE_FILE, help="the rule file to write (default: the package's)")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in step_time.SIZES]
    if bad or not sizes:
        parser.error(f"--sizes: unknown {bad or sizes}; choose from {sorted(step_time.SIZES)}")

    isa = machine_isa()
    print(f"{cpu_model()}, kernel ISA {isa}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"dropout {args.dropout}, {args.rounds} rounds")
    runs = run_rounds(  # the legacy Llama of step_time.py: the fused op runs on its bases
        [(("llama", size), [FUSED, COMPOSITION]) for size in sizes], args.rounds,
        lambda key: step_time.run_one(*key, args.steps or step_time.DEFAULT_STEPS[key[1]], args.warmup, 0,
                                      args.timeout, 25, args.dropout),
        arch_key="arch")
    print()
    print_table(runs, ("model", "size", "setup"))
    rows = []
    for size in sizes:
        fused, comp = best_round(runs[("llama", size, FUSED)]), best_round(runs[("llama", size, COMPOSITION)])
        dims = step_time.SIZES[size]
        ratio = fused["median_ms"] / comp["median_ms"] if fused and comp else None
        rows.append({"size": size, "hidden": dims["hidden_size"], "weight_elements": dims["hidden_size"] ** 2,
                     "tokens": dims["batch_size"] * dims["seq_length"], "dropout": args.dropout,
                     "fused_ms": fused and round(fused["median_ms"], 1),
                     "composition_ms": comp and round(comp["median_ms"], 1),
                     "ratio": ratio and round(ratio, 3),
                     "noisy": bool((fused or {}).get("noisy") or (comp or {}).get("noisy"))})
    threshold = decide(rows, args.goal)
    print(f"\nfused / composition, whole step (goal <= {args.goal}):")
    for row in rows:
        ratio = "failed" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"  {row['size']:6s} h{row['hidden']:<5d} {ratio}{' (noisy)' if row['noisy'] else ''}")
    print(f"rule for {isa}: " + ("never fused" if threshold is None else f"fused from {threshold} weight elements"))
    if args.dry_run:
        return 0
    source = args.output if os.path.exists(args.output) else RULE_FILE
    with open(source, encoding="utf-8") as handle:
        table = json.load(handle)
    table["isa"][isa] = {"min_weight_elements": threshold, "goal": args.goal, "cpu": cpu_model(),
                         "measured": datetime.date.today().isoformat(), "rows": rows}
    with open(args.output + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=1)
        handle.write("\n")
    os.replace(args.output + ".tmp", args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
