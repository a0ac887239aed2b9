"""LoKr (LyCORIS; HF PEFT's LoKrConfig): dW = kron(w1, w2) * alpha / r.

Shapes, as PEFT picks them for a linear cell with weight [out, in]: in = in_m * in_n and
out = out_l * out_k by :func:`~mindformers_lora_ext.config.lokr_factorization` of each dim with
``decompose_factor`` (-1: the divisor pair nearest the square root, smaller first); w1 is
[out_l, in_m], w2 [out_k, in_n], kron(w1, w2) [out_l * out_k, in_m * in_n]. w2 is the rank-r
product ``lokr_w2_a`` [out_k, r] @ ``lokr_w2_b`` [r, in_n] when r < max(out_k, in_n) / 2, else
one matrix ``lokr_w2``; w1 likewise (``lokr_w1_a`` [out_l, r], ``lokr_w1_b`` [r, in_m]) only with
``decompose_both`` and r < max(out_l, in_m) / 2. Scaling is alpha / r in every case.

Init: ``init_weights: true`` (PEFT's default) w1 (or w1_a) = 0 and the rest kaiming-uniform
(a = sqrt(5)), so dW starts at 0; ``lycoris``: w1 random, w2 (or w2_b) = 0; ``false``: all
random. Training-only ``rank_dropout`` (output rows of dW; rescaled by 1/mean with
``rank_dropout_scale``) and ``module_dropout`` as PEFT.

Unlike PEFT, the forward never materialises dW: with x viewed as [N, in_m, in_n],
x kron(w1, w2)^T = w1 (x w2^T) per sample, which costs N (in * out_k + out * in_m) instead of
N * in * out multiply-adds. The merge math (numpy) is the plain Kronecker product.

Model parallel (:func:`~mindformers_lora_ext.tuners.sharding.lokr_strategies`): in_m and out_l
lead in and out, so the base's in split k (out split o) is a split of in_m (of out_l) when it
divides it; the second MatMul (by w1) then takes the base's own strategy. The first MatMul (by
w2) has a strategy only when in is not split (k = 1): otherwise x's reshape to
[N * in_m, in_n] merges the batch (split dp) with in_m (split k) into one dim, a layout no
split of that dim reproduces, and MindSpore derives it (and redistributes). w2 is used whole.
"""
import math
from typing import Dict, Tuple

import numpy as np
from mindspore import Parameter
from mindspore.common.initializer import HeUniform, Zero, initializer
from mindspore.ops import operations as P

from mindformers_lora_ext.config import LycorisSpec, lokr_factorization
from mindformers_lora_ext.tuners.additive import AdditiveLinear, AdditiveModel, DeltaMath
from mindformers_lora_ext.tuners.sharding import lokr_strategies
from mindformers_lora_ext import _boot

PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def lokr_shapes(in_dim: int, out_dim: int, spec: LycorisSpec) -> Dict[str, Tuple[int, int]]:
    """The LoKr parameters of an [out_dim, in_dim] weight: attribute -> shape (PEFT's choice)."""
    in_m, in_n = lokr_factorization(in_dim, spec.decompose_factor)
    out_l, out_k = lokr_factorization(out_dim, spec.decompose_factor)
    rank = spec.rank
    shapes = {}
    if spec.decompose_both and rank < max(out_l, in_m) / 2:
        shapes.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if rank < max(out_k, in_n) / 2:
        shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n))
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    return shapes


class LokrMath(DeltaMath):
    """dW = kron(w1, w2) * scaling, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (w2 likewise)."""

    CELL_PARAMS = PARAMS

    @staticmethod
    def factors(arrays) -> Tuple[np.ndarray, np.ndarray]:
        """(w1, w2) from whichever of the whole / factored tensors ``arrays`` holds."""
        w1 = arrays["lokr_w1"] if "lokr_w1" in arrays else arrays["lokr_w1_a"] @ arrays["lokr_w1_b"]
        w2 = arrays["lokr_w2"] if "lokr_w2" in arrays else arrays["lokr_w2_a"] @ arrays["lokr_w2_b"]
        return w1, w2

    @classmethod
    def out_in(cls, arrays):
        w1, w2 = cls.factors(arrays)
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]

    @classmethod
    def expected_shapes(cls, spec, shape_oi):
        return lokr_shapes(shape_oi[1], shape_oi[0], spec)

    @classmethod
    def delta_weight(cls, arrays, spec, shape_oi):
        delta = np.kron(*cls.factors(arrays))
        if delta.shape != tuple(shape_oi):
            raise ValueError(f"LoKr factors give a {delta.shape} update for a {tuple(shape_oi)} weight")
        return delta * spec.scaling


def _zero_side(spec) -> set:
    """Which tensors start at zero (so that dW = 0), by ``init_weights``."""
    if spec.init_weights is True:
        return {"lokr_w1", "lokr_w1_a"}
    if spec.init_weights == "lycoris":
        return {"lokr_w2", "lokr_w2_b"}
    return set()


class LokrLinear(AdditiveLinear):
    """An adopted linear cell plus a LoKr update."""

    MATH = LokrMath

    def __init__(self, base, spec: LycorisSpec, param_init_type=None, compute_dtype=None):
        super().__init__(base, spec, param_init_type, compute_dtype)
        shapes = lokr_shapes(self.in_channels, self.out_channels, spec)
        zeros = _zero_side(spec)
        for name, shape in shapes.items():
            init = Zero() if name in zeros else HeUniform(negative_slope=math.sqrt(5))
            setattr(self, name, Parameter(initializer(init, list(shape), self.param_dtype), name=name))
        self.param_names = tuple(name for name in PARAMS if name in shapes)
        self.whole_w1, self.whole_w2 = "lokr_w1" in shapes, "lokr_w2" in shapes
        w1_shape = shapes["lokr_w1"] if self.whole_w1 else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2_shape = shapes["lokr_w2"] if self.whole_w2 else (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        self.out_l, self.in_m = w1_shape
        self.out_k, self.in_n = w2_shape
        self.scaling = spec.scaling
        self.lokr_w2_matmul = P.MatMul(transpose_b=True)  # x [N * in_m, in_n] @ w2^T -> [., out_k]
        self.lokr_w1_matmul = P.MatMul(transpose_b=True)  # t [N * out_k, in_m] @ w1^T -> [., out_l]
        if not self.whole_w1:
            self.lokr_w1_ab_matmul = P.MatMul()  # w1_a [out_l, r] @ w1_b [r, in_m]
        if not self.whole_w2:
            self.lokr_w2_ab_matmul = P.MatMul()  # w2_a [out_k, r] @ w2_b [r, in_n]
        self.shard_ops(base)

    def adapter_strategies(self, base_strategy, transpose_b):
        return lokr_strategies(base_strategy, transpose_b, in_m=self.in_m, out_l=self.out_l)

    def w1(self):
        if self.whole_w1:
            return self.p("lokr_w1")
        return self.lokr_w1_ab_matmul(self.p("lokr_w1_a"), self.p("lokr_w1_b"))

    def w2(self):
        if self.whole_w2:
            return self.p("lokr_w2")
        return self.lokr_w2_ab_matmul(self.p("lokr_w2_a"), self.p("lokr_w2_b"))

    def update(self, x2d):
        # x [N, in_m * in_n] -> [N * in_m, in_n] @ w2^T -> [N, in_m, out_k] -> [N, out_k, in_m]
        # -> @ w1^T -> [N, out_k, out_l] -> [N, out_l, out_k] -> [N, out]
        t = self.lokr_w2_matmul(self.reshape(x2d, (-1, self.in_n)), self.w2())
        t = self.transpose(self.reshape(t, (-1, self.in_m, self.out_k)), (0, 2, 1))
        t = self.lokr_w1_matmul(self.reshape(t, (-1, self.in_m)), self.w1())
        t = self.transpose(self.reshape(t, (-1, self.out_k, self.out_l)), (0, 2, 1))
        return self.reshape(t, (-1, self.out_channels)) * self.scaling


class LokrModel(AdditiveModel):
    """``pet_type: lokr``."""

    LAYER = LokrLinear


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
