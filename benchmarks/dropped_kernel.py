"""DoRA's dropped-element kernel (``kernels/cpu/dropped_matmul.cc``) alone, against the dense
product it replaces, side by side in one process (CPU).

    python benchmarks/dropped_kernel.py [--shapes N:in:out,...] [--dropouts 0.05,0.1,0.2] [--calls 60]

DoRA under dropout needs drop(x) W^T besides x W^T. Without the kernel that is a second dense
product (forward x' W^T, backward dz W); with it, z = (x * dropped) W^T and its input gradient over
the dropped elements only (a fraction p). For each shape and p it calls, interleaved round-robin
(so machine noise hits every variant alike):
  kernel fwd / bwd   the library's DroppedMatmulForward / DroppedMatmulBackward entry points,
                     through MindSpore's AOT calling convention (ctypes, numpy buffers; no
                     MindSpore in the process), mask regenerated from the seed inside each call;
  dense fwd / bwd    numpy's x W^T and dz W (its BLAS, the same threads).
It prints the minimum and the median ms per call (the minimum is the least disturbed by other
load on a shared machine) and kernel / dense ratios of both. Inside a MindSpore training step the
kernel takes longer than here (MindSpore's CPU profiler: about 5 ms a call at N=512, 1024x1024,
p=0.05, against 2.7-3.4 ms here) and MindSpore's MatMul is oneDNN, not numpy: whole steps
(``step_time.py --setups dora,dora_fused``) decide ``auto``, not this table.
"""
import argparse
import ctypes
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from aot_abi import bind  # noqa: E402  pylint: disable=wrong-import-position,import-error  (MindSpore's AOT ABI by ctypes)

SHAPES = ((512, 1024, 1024), (512, 512, 512), (2048, 1024, 1024))
DROPOUTS = (0.05, 0.1, 0.2)


def measure(lib, n, d_in, d_out, p, calls, rng):
    """{variant: (min ms, median ms)} for one shape and dropout."""
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    dz = rng.standard_normal((n, d_out)).astype(np.float32)
    p_arr, seed = np.array([p], np.float32), np.array([5, 9], np.int32)
    z, dx, count = np.zeros((n, d_out), np.float32), np.zeros((n, d_in), np.float32), np.zeros(1, np.float32)
    variants = {
        "kernel fwd": bind(lib, "DroppedMatmulForward", [x, p_arr, seed, w], [z, count]),
        "kernel bwd": bind(lib, "DroppedMatmulBackward", [dz, p_arr, seed, w], [dx, count]),
        "dense fwd": lambda: np.matmul(x, w.T),
        "dense bwd": lambda: np.matmul(dz, w),
    }
    times = {name: [] for name in variants}
    for name, call in variants.items():  # warm-up: buffers, the pool's threads, BLAS
        call()
        call()
    for _ in range(calls):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    # a sanity check on the last calls, so a broken build cannot time well
    dropped_fraction = count[0] / x.size
    if not 0.5 * p < dropped_fraction < 1.5 * p:
        raise RuntimeError(f"kernel dropped {dropped_fraction:.3f} of x at p={p}")
    if not np.isfinite(z).all() or not z.any():
        raise RuntimeError("kernel output z is empty or not finite")
    return {name: (min(values), statistics.median(values)) for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--shapes", default=",".join(":".join(map(str, s)) for s in SHAPES),
                        help="comma list of N:in:out")
    parser.add_argument("--dropouts", default=",".join(map(str, DROPOUTS)))
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args(argv)
    from mindformers_lora_ext.kernels.build import build_cpu_library, library_isa  # pylint: disable=import-outside-toplevel
    path = build_cpu_library()
    lib = ctypes.CDLL(path)
    print(f"library {path} ({library_isa(path)}); {args.calls} calls per variant, interleaved")
    rng = np.random.default_rng(0)
    header = f"{'N:in:out':>16} {'p':>5} | " + " | ".join(f"{v:>16}" for v in
                                                        ("kernel fwd", "dense fwd", "kernel bwd", "dense bwd"))
    print(header + " | fwd k/d (min, med) | bwd k/d (min, med)")
    for shape in args.shapes.split(","):
        n, d_in, d_out = (int(v) for v in shape.split(":"))
        for p in (float(v) for v in args.dropouts.split(",")):
            t = measure(lib, n, d_in, d_out, p, args.calls, rng)
            cells = " | ".join(f"{t[v][0]:6.2f} / {t[v][1]:6.2f}" for v in
                               ("kernel fwd", "dense fwd", "kernel bwd", "dense bwd"))
            fwd = (t["kernel fwd"][0] / t["dense fwd"][0], t["kernel fwd"][1] / t["dense fwd"][1])
            bwd = (t["kernel bwd"][0] / t["dense bwd"][0], t["kernel bwd"][1] / t["dense bwd"][1])
            print(f"{shape:>16} {p:>5} | {cells} | {fwd[0]:5.2f}, {fwd[1]:5.2f}       | {bwd[0]:5.2f}, {bwd[1]:5.2f}")
    print("cells: min / median ms per call")


if __name__ == "__main__":
    main()
