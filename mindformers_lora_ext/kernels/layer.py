"""The fused LoRA linear as a Cell (for adapter layers) and as a function.

Dropout on the shrink path: the fused op draws its mask inside the kernel from Philox4x32-10
keyed by a per-call seed, and the backward op regenerates it from the same seed, so nothing of
size N x in is kept between forward and backward. The seed is an int32 [2] tensor drawn by a
stateful ``UniformInt`` op in the same graph, once per forward execution: every step (every
execution of the compiled graph) gets a new seed, and the bprop receives the forward's seed as
an input value, so forward and backward of one step always agree (graph and PyNative mode).
Each layer has its own ``UniformInt`` op, hence its own stream; ``mindspore.set_seed`` makes
the streams reproducible, as for ``nn.Dropout``. Recompute: MindSpore re-runs the seed op in
backward for a recomputed cell (checked), so the CPU bprop takes the seed from the forward op's
outputs instead (see ``cpu_ops``); tested with ``Cell.recompute()``.
"""
import random

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from mindformers_lora_ext.kernels import dispatch

_INT32_MAX = 2 ** 31 - 1


def _seed_op():
    """A ``UniformInt`` for Philox keys, seeded from ``mindspore.set_seed`` as ``nn.Dropout`` seeds
    its op (``_get_graph_seed``); an unseeded primitive would ignore the global seed.

    Without a global seed every such op would get (seed, seed2) = (0, 0), and MindSpore's graph
    optimizer merges random ops of equal attributes and inputs: in a lazy-inlined Llama layer q,
    k and v then drew one key and, with one input, dropped the same elements (the profiler
    counted 10 draws per step for 16 adapted projections). So each op then gets random seeds of
    its own: still a new stream every run, as unseeded ops are."""
    try:
        from mindspore.common.seed import _get_graph_seed  # pylint: disable=import-outside-toplevel
        seed, seed2 = _get_graph_seed(0, "uniform_int")
    except ImportError:  # not in this MindSpore
        seed = seed2 = 0
    if seed == 0 and seed2 == 0:
        draw = random.SystemRandom()
        seed, seed2 = draw.randrange(1, _INT32_MAX), draw.randrange(1, _INT32_MAX)
    return P.UniformInt(seed=seed, seed2=seed2)


class PhiloxKey(nn.Cell):
    """A fresh Philox key per execution: ``construct() -> int32 [2]`` in [0, 2^31), drawn by this
    cell's own ``UniformInt`` (:func:`_seed_op`), so each user has a stream of its own."""

    def __init__(self):
        super().__init__()
        self.draw = _seed_op()
        self.low = Tensor(0, mstype.int32)
        self.high = Tensor(_INT32_MAX, mstype.int32)

    def construct(self):
        return self.draw((2,), self.low, self.high)


class FusedLoraMatmul(nn.Cell):
    """``y2d = x2d W^T + s * (dropout(x2d) A^T) B^T`` in one fused op where available.

    Args:
        in_channels, out_channels, rank: the layer's sizes (in, out, r).
        dropout: LoRA dropout probability p in [0, 1) (inverted dropout, active only in training).
        dtype: the compute dtype of x2d/weight/lora_a/lora_b (mstype.float32, float16, bfloat16).
        use_fused: "auto" | True | False, see ``dispatch``.

    ``construct(x2d, weight, lora_a, lora_b, scaling) -> y2d``:
        x2d     [N, in]   compute dtype; N may be dynamic.
        weight  [out, in] compute dtype (the frozen base weight in transpose_b layout).
        lora_a  [r, in]   compute dtype.
        lora_b  [out, r]  compute dtype.
        scaling Tensor of shape [] or [1] (any float dtype), e.g. ``lora_active * alpha / r``.
        y2d     [N, out]  compute dtype: the base product plus the LoRA term, no bias.
    Gradients flow to x2d, lora_a, lora_b (and scaling gets none in the fused path); the base
    weight gets none (never materialised).

    Attributes: ``fused`` (bool), ``backend`` ("cpu-aot", "ascend-aot" or "composition"),
    ``reason`` (why the composition is used, or "fused").
    """

    def __init__(self, in_channels, out_channels, rank, dropout=0.0, dtype=mstype.float32, use_fused="auto"):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.dropout_p = float(dropout)
        self.dropout_active = self.dropout_p > 0
        self.compute_dtype = dtype
        backend, self.reason = dispatch.resolve(use_fused, dtype, weight_elements=in_channels * out_channels)
        self.fused = backend is not None
        self.backend = backend.name if backend else "composition"
        self.reshape = P.Reshape()
        self.cast = P.Cast()
        if self.fused:
            self.fused_op = backend.forward
            self.convention = backend.convention
            self.concat = P.Concat()
            self.p_train = Tensor(np.array([self.dropout_p], np.float32))
            self.p_eval = Tensor(np.zeros(1, np.float32))
            seed_type = np.int64 if self.convention == "ascend" else np.int32
            self.no_seed = Tensor(np.zeros(2, seed_type))
            if self.dropout_active:
                self.key = PhiloxKey()
                self.seed_mask = Tensor(np.array([1, 0], np.int64))  # ascend: (seed, offset 0)
        else:
            self.matmul = P.MatMul(transpose_b=True)
            self.lora_a_matmul = P.MatMul(transpose_b=True)
            self.lora_b_matmul = P.MatMul(transpose_b=True)
            self.lora_dropout = nn.Dropout(p=self.dropout_p) if self.dropout_active else nn.Identity()

    def construct(self, x2d, weight, lora_a, lora_b, scaling):
        scaling = self.cast(self.reshape(scaling, (1,)), mstype.float32)
        if self.fused:
            drop = self.dropout_active and self.training
            p = self.p_train if drop else self.p_eval
            seed = self.key() if drop else self.no_seed
            if self.convention == "ascend":
                if drop:
                    seed = self.cast(seed, mstype.int64) * self.seed_mask
                return self.fused_op(x2d, weight, lora_a, lora_b, scaling, p, seed)
            return self.fused_op(x2d, weight, lora_a, lora_b, self.concat((scaling, p)), seed)[0]
        y = self.matmul(x2d, weight)
        h = self.lora_a_matmul(self.lora_dropout(x2d), lora_a)
        return y + self.lora_b_matmul(h, lora_b) * self.cast(scaling, y.dtype)


class PhiloxDropout(nn.Cell):
    """Inverted dropout of probability ``p`` with the fused op's Philox mask, in training only:
    ``construct(x) -> x * mask / (1 - p)``, x float32 of any shape. A fresh seed per execution
    (this cell's own ``UniformInt``, as :class:`FusedLoraMatmul`); the backward regenerates the
    mask from the forward's seed, so no mask is kept between forward and backward.
    ``op``: ``cpu_ops.make_philox_dropout``'s primitive (``dispatch.resolve_dropout``)."""

    def __init__(self, p, op):
        super().__init__()
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {p}")
        self.p = float(p)
        self.op = op
        self.p_tensor = Tensor(np.array([self.p], np.float32))
        self.key = PhiloxKey()

    def construct(self, x):
        if not self.training:
            return x
        return self.with_seed(x)[0]

    def with_seed(self, x):
        """(x dropped, the int32 [2] seed of its mask) in training; DoRA's dropped-element
        kernel regenerates the same mask from it."""
        return self.op(x, self.p_tensor, self.key())


class _Functional:
    """State of :func:`fused_lora`: the backend is resolved on first use. Its attributes are
    properties on purpose: graph mode reads them while compiling (plain Python runs there)."""

    def __init__(self):
        self._backend = None
        self._resolved = False
        self._key = None
        self.concat = P.Concat()
        self.matmul = P.MatMul(transpose_b=True)
        self.shape = P.Shape()

    @property
    def forward(self):
        """The fused forward op (float32, current device, "cpu" convention) or None."""
        if not self._resolved:
            # calling the fused op by name asks for it: the "auto" rule decides for layers by size
            backend, _ = dispatch.resolve(True, mstype.float32)
            self._backend = backend.forward if backend and backend.convention == "cpu" else None
            self._resolved = True
        return self._backend

    @property
    def key(self):
        """The key cell, made on first use: after the user's ``mindspore.set_seed``, which it follows."""
        if self._key is None:
            self._key = PhiloxKey()
        return self._key

    def reset(self):
        self._resolved = False
        self._backend = None
        self._key = None


_FUNCTIONAL = _Functional()


def fused_lora(x, weight, lora_a, lora_b, scaling, dropout=0.0, seed=None):
    """``x W^T + scaling * (drop(x) A^T) B^T``, fused wherever the kernel is built (as with
    ``use_fused_kernel: true``; the ``auto`` rule decides for layers, by their size).

    x [..., in], weight [out, in] (frozen), lora_a [r, in], lora_b [out, r]; returns [..., out].
    Differentiable w.r.t. x, lora_a, lora_b. ``scaling``: float or Tensor ([] or [1]).
    ``dropout``: p (a Python float) of inverted dropout on the shrink path. ``seed``: None (a fresh
    seed per call, drawn in-graph), an int, or an int32 Tensor [2] (the Philox key; the caller
    must change it every step). The fused op needs float32 x/weight/lora_a/lora_b; other dtypes,
    devices without a kernel, and the composition fallback use MatMul + Dropout (the fallback
    ignores ``seed``). Works in PyNative and inside graph-mode cells (N may be dynamic).
    The backend is resolved on the first call (graph mode: while compiling); this function
    uses the CPU kernel only (Ascend layers use :class:`FusedLoraMatmul`).
    Dropout is applied whenever ``dropout > 0`` (this function has no training flag).
    """
    in_channels = weight.shape[1]
    out_shape = _FUNCTIONAL.shape(x)[:-1] + (weight.shape[0],)
    x2d = x.reshape((-1, in_channels))
    forward = _FUNCTIONAL.forward
    fused = forward is not None and x.dtype == mstype.float32 and weight.dtype == mstype.float32 \
        and lora_a.dtype == mstype.float32 and lora_b.dtype == mstype.float32
    if isinstance(scaling, (int, float)):
        scale = Tensor([scaling], mstype.float32)
    else:
        scale = F.cast(scaling.reshape((1,)), mstype.float32)
    if fused:
        sp = _FUNCTIONAL.concat((scale, Tensor([dropout], mstype.float32)))
        if dropout <= 0:
            key = Tensor([0, 0], mstype.int32)
        elif seed is None:
            key = _FUNCTIONAL.key()
        elif isinstance(seed, int):
            key = Tensor([seed & _INT32_MAX, (seed >> 31) & _INT32_MAX], mstype.int32)
        else:
            key = F.cast(seed.reshape((2,)), mstype.int32)
        y = forward(x2d, weight, lora_a, lora_b, sp, key)[0]
    else:
        x_drop = x2d
        if dropout > 0:
            x_drop = ops.dropout(x2d, p=dropout)
        y = _FUNCTIONAL.matmul(x2d, weight)
        h = _FUNCTIONAL.matmul(x_drop, lora_a)
        y = y + _FUNCTIONAL.matmul(h, lora_b) * F.cast(scale, y.dtype)
    return y.reshape(out_shape)
