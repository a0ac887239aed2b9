"""The CPU kernels as MindSpore ``ops.Custom(func_type="aot")`` primitives: the fused LoRA pair,
its dropout alone (:func:`make_philox_dropout`) and DoRA's dropout correction
(:func:`make_dropped_matmul`).

forward  (x [N, in], W [out, in], A [r, in], B [out, r], sp [2] = (s, p), seed [2] int32)
         -> (y [N, out], h [N, r], seed_out [2]),  y = x W^T + s h B^T,  h = drop(x) A^T
backward (dy, x, W, A, B, h, sp, seed) -> (dx [N, in], dA [r, in], dB [out, r])

The bprop takes h and the seed from the forward's OUTPUTS (seed_out is a copy of seed): under
MindSpore recompute the op producing the seed input may run again in backward (a stateful RNG
op then yields a different seed), but the forward's outputs are the ones of the forward that
actually ran, so the backward regenerates exactly the forward's mask.

All float inputs/outputs float32, N may be dynamic (C++ shape and type infer functions + reg_info,
so graph mode with ``set_inputs(None, ...)`` and graphs compiled at run time work). The forward's
bprop runs the backward op; W, sp and seed get zero gradients (W is frozen: its gradient is a
zeros_like that graph mode prunes when W is not a trained parameter; no x^T dy product is ever
formed).
"""
from mindspore import ops
from mindspore.ops import CustomRegOp, DataType
from mindspore.ops import functional as F

FORWARD = "FusedLoraForward"
BACKWARD = "FusedLoraBackward"
DROPOUT_FORWARD = "PhiloxDropoutForward"
DROPOUT_BACKWARD = "PhiloxDropoutBackward"
DROPPED_FORWARD = "DroppedMatmulForward"
DROPPED_BACKWARD = "DroppedMatmulBackward"


def _custom(lib_path, func, name, inputs, outputs, dtypes, bprop=None):
    """``ops.Custom`` of ``func`` in the library at ``lib_path``, with the library's C++ shape and
    type inference (``<func>InferShape`` / ``<func>InferType``): MindSpore calls a Python infer only
    on a PrimitivePy, which graphs compiled at run time (an mcore base's, beside its Morph) no
    longer hold ("The prim is not a PrimitivePy")."""
    reg = CustomRegOp(name)
    for index, input_name in enumerate(inputs):
        reg = reg.input(index, input_name)
    for index, output_name in enumerate(outputs):
        reg = reg.output(index, output_name)
    return ops.Custom(f"{lib_path}:{func}", out_shape=None, out_dtype=None, func_type="aot", bprop=bprop,
                      reg_info=reg.dtype_format(*dtypes).target("CPU").get_op_info())


def make_cpu_ops(lib_path: str):
    """(forward, backward) Custom primitives calling the library at ``lib_path`` (absolute)."""
    f32, i32 = DataType.F32_Default, DataType.I32_Default
    backward = _custom(lib_path, BACKWARD, "mfl_fused_lora_backward", ("dy", "x", "w", "a", "b", "h", "sp", "seed"),
                       ("dx", "da", "db"), (f32,) * 7 + (i32,) + (f32,) * 3)

    def bprop(x, weight, lora_a, lora_b, sp, seed, out, dout):
        dx, da, db = backward(dout[0], x, weight, lora_a, lora_b, out[1], sp, out[2])
        return dx, F.zeros_like(weight), da, db, F.zeros_like(sp), F.zeros_like(seed)

    forward = _custom(lib_path, FORWARD, "mfl_fused_lora_forward", ("x", "w", "a", "b", "sp", "seed"),
                      ("y", "h", "seed_out"), (f32,) * 5 + (i32,) + (f32,) * 2 + (i32,), bprop)
    return forward, backward


def make_philox_dropout(lib_path: str):
    """The fused op's dropout alone as a Custom primitive: ``(x, p [1] float32, seed [2] int32)
    -> (y, seed_out [2])``, y = x * mask / (1 - p) with the mask the fused op draws for this seed
    (element e of x by flat index), x float32 of any shape. Its bprop regenerates the mask from
    the forward's seed output (dx = drop(dy)), so no mask is kept; p and seed get zero gradients."""
    f32, i32 = DataType.F32_Default, DataType.I32_Default
    # a second output (the seed again), as cpu/dropped_matmul.cc explains
    backward = _custom(lib_path, DROPOUT_BACKWARD, "mfl_philox_dropout_backward", ("dy", "p", "seed"),
                       ("dx", "seed_out"), (f32, f32, i32, f32, i32))

    def bprop(x, p, seed, out, dout):
        return backward(dout[0], p, out[1])[0], F.zeros_like(p), F.zeros_like(seed)

    return _custom(lib_path, DROPOUT_FORWARD, "mfl_philox_dropout_forward", ("x", "p", "seed"), ("y", "seed_out"),
                   (f32, f32, i32, f32, i32), bprop)


def make_dropped_matmul(lib_path: str):
    """DoRA's dropout correction ``z = (x * (1 - keep)) W^T`` as a Custom primitive
    (cpu/dropped_matmul.cc): (x [N, in], p [1] float32, seed [2] int32, W [out, in]) -> (z [N, out],
    dropped [1] = the number of dropped elements), keep = the mask :func:`make_philox_dropout`
    applies for (p, seed), regenerated in the kernel (none is kept). Its bprop gives x
    ``(1 - keep) * (dz W)``; p, seed and W get zero gradients (W is frozen)."""
    f32, i32 = DataType.F32_Default, DataType.I32_Default
    # second output `dropped` [1] (count of dropped elements): see cpu/dropped_matmul.cc for why
    backward = _custom(lib_path, DROPPED_BACKWARD, "mfl_dropped_matmul_backward", ("dz", "p", "seed", "w"),
                       ("dx", "dropped"), (f32, f32, i32, f32, f32, f32))

    def bprop(x, p, seed, weight, out, dout):
        return (backward(dout[0], p, seed, weight)[0], F.zeros_like(p), F.zeros_like(seed),
                F.zeros_like(weight))

    return _custom(lib_path, DROPPED_FORWARD, "mfl_dropped_matmul_forward", ("x", "p", "seed", "w"),
                   ("z", "dropped"), (f32, f32, i32, f32, f32, f32), bprop)
