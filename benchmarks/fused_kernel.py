"""Fused LoRA kernel vs the MindSpore composition vs the frozen Dense alone (CPU, graph mode).

    python benchmarks/fused_kernel.py [--quick] [--runs 7] [--no-memory] [--threads T] [--shapes N:in:out,...]

Speed: for each shape (N rows, in -> out, rank 16) and dropout (0, 0.05) it times, in one
process and interleaved round-robin (so machine noise hits every variant alike), the median of
``--runs`` executions of
  dense  y = x W^T                       (W frozen; fwd+bwd = dx only)
  comp   the composition x W^T + s (drop(x) A^T) B^T   (FusedLoraMatmul(use_fused=False))
  fused  the fused op                                   (FusedLoraMatmul(use_fused=True))
forward alone (training mode) and a training step's forward+backward (loss = sum(y * dy),
returning the loss and dx, dA, dB: the forward product is needed, as in training), all in graph
mode, each followed by ``mindspore.runtime.synchronize()``. Ratios are to dense and fused/comp.

Memory: the activation memory kept for backward by LoRA with dropout 0.05, two ways.
  * counted: the tensors each implementation saves (see ``saved_bytes``);
  * measured: peak RSS of a fresh process that trains a small Llama-like stack (4 blocks,
    q/k/v/o/gate/up/down adapted, hidden 1024, 2048 tokens) for 3 steps, minus the peak RSS of
    the same stack with frozen Dense layers only (no LoRA), each in its own subprocess.
The default run takes about 5-8 minutes on 2 cores; ``--quick`` runs the first shape only.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = ((2048, 1024, 1024), (2048, 4096, 4096), (512, 4096, 4096))
RANK = 16
DROPOUTS = (0.0, 0.05)


def _setup_context():
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    return ms


def _nets(ms, n, d_in, d_out, rank, dropout):
    """dense / comp / fused cells, each with (fwd, fwd+bwd) callables."""
    # pylint: disable=import-outside-toplevel
    from mindspore import Parameter, Tensor, nn
    from mindspore.ops import operations as P
    from mindformers_lora_ext.kernels import FusedLoraMatmul

    rng = np.random.default_rng(0)
    weight = Parameter(Tensor(rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.02), name="w",
                       requires_grad=False)

    class Dense(nn.Cell):
        def __init__(self):
            super().__init__()
            self.weight = weight
            self.matmul = P.MatMul(transpose_b=True)

        def construct(self, x):
            return self.matmul(x, self.weight)

    class Lora(nn.Cell):
        def __init__(self, use_fused):
            super().__init__()
            self.weight = weight
            self.lora_a = Parameter(Tensor(rng.standard_normal((rank, d_in)).astype(np.float32) * 0.02), name="a")
            self.lora_b = Parameter(Tensor(rng.standard_normal((d_out, rank)).astype(np.float32) * 0.02), name="b")
            self.scaling = Tensor(2.0, ms.float32)
            self.layer = FusedLoraMatmul(d_in, d_out, rank, dropout, ms.float32, use_fused=use_fused)

        def construct(self, x):
            return self.layer(x, self.weight, self.lora_a, self.lora_b, self.scaling)

    x = Tensor(rng.standard_normal((n, d_in)).astype(np.float32))
    dy = Tensor(rng.standard_normal((n, d_out)).astype(np.float32))
    out = {}
    for name, net in (("dense", Dense()), ("comp", Lora(False)), ("fused", Lora(True))):
        net.set_train(True)
        if name == "fused":
            assert net.layer.fused, net.layer.reason
        out[name] = (lambda net=net: net(x), lambda g=_train_step(ms, net): g(x, dy))
    return out


def _train_step(ms, net):
    """A cell returning (loss, (dx, dparams)) with loss = sum(net(x) * dy): the forward output
    is needed (as in training), so graph mode cannot prune the forward product."""
    # pylint: disable=import-outside-toplevel
    from mindspore import nn, ops

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, x, dy):
            return (self.net(x) * dy).sum()

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            params = net.trainable_params()
            self.value_and_grad = ops.value_and_grad(Loss(), grad_position=0, weights=params or None)

        def construct(self, x, dy):
            return self.value_and_grad(x, dy)

    return Step()


def _time(ms, fns, runs):
    for fn in fns.values():  # compile + warm up
        fn()
        fn()
    ms.runtime.synchronize()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            ms.runtime.synchronize()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def speed(runs, shapes):
    ms = _setup_context()
    rows = []
    for n, d_in, d_out in shapes:
        for dropout in DROPOUTS:
            nets = _nets(ms, n, d_in, d_out, RANK, dropout)
            fwd = _time(ms, {k: v[0] for k, v in nets.items()}, runs)
            both = _time(ms, {k: v[1] for k, v in nets.items()}, runs)
            rows.append(((n, d_in, d_out, dropout), fwd, both))
            _print_row(rows[-1])
    return rows


def _print_row(row):
    (n, d_in, d_out, p), fwd, both = row
    label = f"N={n:<5d} {d_in}x{d_out} r{RANK} p={p:<4}"
    for kind, t in (("fwd", fwd), ("fwd+bwd", both)):
        print(f"{label} {kind:8s} dense {t['dense']:8.2f} ms  comp {t['comp']:8.2f} ms  fused {t['fused']:8.2f} ms"
              f" | comp/dense {t['comp'] / t['dense']:5.3f}  fused/dense {t['fused'] / t['dense']:5.3f}"
              f"  fused/comp {t['fused'] / t['comp']:5.3f}", flush=True)


# ----------------------------------------------------------------------------- memory
def saved_bytes(tokens, inputs, rank, dropout, fused):
    """Estimated bytes the adapted linears keep between forward and backward beyond what frozen
    Dense layers keep (float32). ``inputs``: one list per distinct input tensor of the adapted
    linears, holding the in-features of each linear that reads it (q/k/v share one input).
    Composition: each linear keeps its Dropout output x_drop [tokens, in] and mask [tokens, in]
    (float32) when dropout > 0, else its input x once per distinct input, for dA; plus
    h [tokens, r] for dB. Fused: each distinct input x once (dA regenerates the mask from it)
    plus h [tokens, r] per linear."""
    f32 = 4
    linears = sum(len(group) for group in inputs)
    per_input = sum(tokens * group[0] for group in inputs)
    if fused or dropout == 0:
        return f32 * (per_input + linears * tokens * rank)
    return f32 * sum(2 * tokens * d_in + tokens * rank for group in inputs for d_in in group)


def _stack_child(kind, layers, tokens, hidden, inter, dropout):
    """Train the Llama-like stack 3 steps in this (fresh) process; print its peak RSS as JSON."""
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from mindspore.ops import operations as P
    from mindformers_lora_ext.kernels import FusedLoraMatmul

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)

    def param(shape, name, grad):
        return Parameter(Tensor(rng.standard_normal(shape).astype(np.float32) * 0.02), name=name,
                         requires_grad=grad)

    class Linear(nn.Cell):
        def __init__(self, d_in, d_out, name):
            super().__init__()
            self.weight = param((d_out, d_in), name + ".w", False)
            self.dense = kind == "dense"
            if self.dense:
                self.matmul = P.MatMul(transpose_b=True)
            else:
                self.lora_a = param((RANK, d_in), name + ".a", True)
                self.lora_b = param((d_out, RANK), name + ".b", True)
                self.scaling = Tensor(2.0, ms.float32)
                self.layer = FusedLoraMatmul(d_in, d_out, RANK, dropout, ms.float32, use_fused=kind == "fused")
                assert self.layer.fused == (kind == "fused"), self.layer.reason

        def construct(self, x):
            if self.dense:
                return self.matmul(x, self.weight)
            return self.layer(x, self.weight, self.lora_a, self.lora_b, self.scaling)

    def norm(x):
        return x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + 1e-6)

    class Block(nn.Cell):
        def __init__(self, i):
            super().__init__()
            self.q, self.k, self.v, self.o = (Linear(hidden, hidden, f"l{i}.{n}") for n in "qkvo")
            self.gate, self.up = Linear(hidden, inter, f"l{i}.gate"), Linear(hidden, inter, f"l{i}.up")
            self.down = Linear(inter, hidden, f"l{i}.down")
            self.silu = nn.SiLU()

        def construct(self, x):
            h = norm(x)
            x = x + self.o(ops.tanh(self.q(h)) * self.k(h) + self.v(h))  # attention stand-in
            h = norm(x)
            return x + self.down(self.silu(self.gate(h)) * self.up(h))

    class Stack(nn.Cell):
        def __init__(self):
            super().__init__()
            self.blocks = nn.CellList([Block(i) for i in range(layers)])
            self.emb = param((tokens, hidden), "emb", True)  # trainable input: dense has a backward too

        def construct(self):
            x = self.emb
            for block in self.blocks:
                x = block(x)
            return (x * x).mean()

    net = Stack()
    net.set_train(True)
    step = nn.TrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=1e-3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        loss = step()
    ms.runtime.synchronize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "loss": float(loss.asnumpy()), "peak_kb": peak, "before_kb": before}))


def memory(layers=4, tokens=2048, hidden=1024, inter=2816, dropout=0.05):
    """Peak RSS (MB) of a training step of the stack, per implementation, in fresh processes."""
    results = {}
    for kind in ("dense", "comp", "fused"):
        env = dict(os.environ)
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", kind, str(layers),
                               str(tokens), str(hidden), str(inter), str(dropout)],
                              capture_output=True, text=True, env=env, timeout=900, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"memory child {kind} failed:\n{done.stderr[-3000:]}")
        results[kind] = json.loads(lines[-1])
    dense = results["dense"]["peak_kb"]
    adapted = layers * 7
    print(f"\nMemory: {layers}-block Llama-like stack, {tokens} tokens, hidden {hidden}, intermediate {inter}, "
          f"{adapted} adapted linears, r{RANK}, dropout {dropout}, 3 training steps (peak RSS, fresh processes)")
    for kind in ("dense", "comp", "fused"):
        peak = results[kind]["peak_kb"]
        print(f"  {kind:6s} peak {peak / 1024:8.1f} MB   over dense {(peak - dense) / 1024:8.1f} MB   "
              f"loss {results[kind]['loss']:.6f}")
    inputs = [[hidden] * 3, [hidden], [hidden] * 2, [inter]] * layers  # q/k/v, o, gate/up, down
    counted = {kind: saved_bytes(tokens, inputs, RANK, dropout, kind == "fused") / 2**20 for kind in ("comp", "fused")}
    print(f"  counted (kept for backward beyond frozen Dense, see saved_bytes): comp {counted['comp']:.1f} MB, "
          f"fused {counted['fused']:.1f} MB")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="first shape only, no memory run")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the kernel (0: default)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of N:in:out to time instead of the default shapes, e.g. 512:1024:1024 "
                             "(the q/k/v/o layers of step_time.py's s3 Llama)")
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        kind, layers, tokens, hidden, inter, dropout = args.memory_child
        _stack_child(kind, int(layers), int(tokens), int(hidden), int(inter), float(dropout))
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    start = time.time()
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        try:
            shapes = tuple(tuple(int(v) for v in item.split(":")) for item in args.shapes.split(",") if item)
        except ValueError:
            shapes = ()
        if not shapes or any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
            parser.error(f"--shapes: expected N:in:out[,N:in:out...] of positive integers, got {args.shapes!r}")
    rows = speed(args.runs, shapes)
    goal = [both["fused"] / both["dense"] for _, _, both in rows]
    print(f"\nGoal fused fwd+bwd <= 1.05 x dense fwd+bwd: met in {sum(g <= 1.05 for g in goal)}/{len(goal)} cases "
          f"(fused/dense worst {max(goal):.3f}, best {min(goal):.3f})")
    if not (args.quick or args.no_memory):
        memory()
    print(f"\n(total {time.time() - start:.0f} s, peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
