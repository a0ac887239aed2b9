"""LoHa (FedPara / LyCORIS; HF PEFT's LoHaConfig): dW = ((w1_a w1_b) * (w2_a w2_b)) * alpha / r.

The Hadamard (element-wise) product of two rank-r products: w1_a, w2_a [out, r] and w1_b,
w2_b [r, in] (PEFT's ``hada_w1_a`` ... orientation), so dW can reach rank r^2 with
2 r (out + in) parameters. y = base(x) + x dW^T, with PEFT's training-only ``rank_dropout`` (each
output row of dW kept with probability 1 - p, the mask rescaled by 1/mean) and
``module_dropout`` (the whole update skipped with probability p).

Init (``init_weights: true``, PEFT's): w1_a, w1_b, w2_a kaiming-uniform (a = sqrt(5): bound
1/sqrt(fan_in), fan_in = the second dim), w2_b = 0, so dW starts at 0; ``false``: all four
kaiming-uniform.

Forward: (w1_a w1_b) * (w2_a w2_b) = U V exactly, with U [out, r^2] the column-wise products
w1_a[:, i] * w2_a[:, j] and V [r^2, in] the row-wise products w1_b[i] * w2_b[j]. When
r^2 (in + out) < in * out (any real model: r 8 on 4096 x 4096), y = (x V^T) U^T costs
N r^2 (in + out) instead of materialising dW and paying N in out as PEFT does; otherwise
(tiny cells) dW is materialised. Both are the same function; autodiff gives the same gradients.

Model parallel (:func:`~mindformers_lora_ext.tuners.sharding.loha_strategies`): the factored
path is LoRA at rank r^2 (V split on in like W, U on out like W); the materialised path splits
both factor products, hence dW, like W and multiplies x by dW with the base's own strategy.
The Hadamard products and reshapes building U, V and dW are elementwise: MindSpore derives them.
"""
import math

from mindspore import Parameter
from mindspore.common.initializer import HeUniform, Zero, initializer
from mindspore.ops import operations as P

from mindformers_lora_ext.config import LycorisSpec
from mindformers_lora_ext.tuners.additive import AdditiveLinear, AdditiveModel, DeltaMath
from mindformers_lora_ext.tuners.sharding import loha_strategies
from mindformers_lora_ext import _boot

PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LohaMath(DeltaMath):
    """dW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * scaling."""

    CELL_PARAMS = PARAMS

    @classmethod
    def out_in(cls, arrays):
        return arrays["hada_w1_a"].shape[0], arrays["hada_w1_b"].shape[1]

    @classmethod
    def expected_shapes(cls, spec, shape_oi):
        (out_dim, in_dim), rank = shape_oi, spec.rank
        return {"hada_w1_a": (out_dim, rank), "hada_w1_b": (rank, in_dim),
                "hada_w2_a": (out_dim, rank), "hada_w2_b": (rank, in_dim)}

    @classmethod
    def delta_weight(cls, arrays, spec, shape_oi):
        delta = (arrays["hada_w1_a"] @ arrays["hada_w1_b"]) * (arrays["hada_w2_a"] @ arrays["hada_w2_b"])
        if delta.shape != tuple(shape_oi):
            raise ValueError(f"LoHa factors give a {delta.shape} update for a {tuple(shape_oi)} weight")
        return delta * spec.scaling


def _kaiming():
    return HeUniform(negative_slope=math.sqrt(5))


class LohaLinear(AdditiveLinear):
    """An adopted linear cell plus a LoHa update of rank ``spec.rank``."""

    MATH = LohaMath

    def __init__(self, base, spec: LycorisSpec, param_init_type=None, compute_dtype=None):
        super().__init__(base, spec, param_init_type, compute_dtype)
        rank, out_dim, in_dim = spec.rank, self.out_channels, self.in_channels
        shapes = {"hada_w1_a": [out_dim, rank], "hada_w1_b": [rank, in_dim],
                  "hada_w2_a": [out_dim, rank], "hada_w2_b": [rank, in_dim]}
        for name, shape in shapes.items():
            init = Zero() if (name == "hada_w2_b" and spec.init_weights is True) else _kaiming()
            setattr(self, name, Parameter(initializer(init, shape, self.param_dtype), name=name))
        self.scaling = spec.scaling
        self.param_names = PARAMS
        self.rank = rank
        self.factored = rank * rank * (in_dim + out_dim) < in_dim * out_dim
        self.loha_in_matmul = P.MatMul(transpose_b=True)    # x [N, in] @ V^T -> [N, r^2]
        self.loha_out_matmul = P.MatMul(transpose_b=True)   # h [N, r^2] @ U^T -> [N, out]
        # delta_weight() serves both paths (and callers outside the forward): always built
        self.hada_w1_matmul = P.MatMul()                    # w1_a [out, r] @ w1_b [r, in]
        self.hada_w2_matmul = P.MatMul()                    # w2_a [out, r] @ w2_b [r, in]
        self.loha_delta_matmul = P.MatMul(transpose_b=True)  # x [N, in] @ dW^T -> [N, out]
        self.shard_ops(base)

    def adapter_strategies(self, base_strategy, transpose_b):
        return loha_strategies(base_strategy, transpose_b)

    def delta_weight(self):
        """dW [out, in] in compute dtype (differentiable)."""
        first = self.hada_w1_matmul(self.p("hada_w1_a"), self.p("hada_w1_b"))
        second = self.hada_w2_matmul(self.p("hada_w2_a"), self.p("hada_w2_b"))
        return first * second * self.scaling

    def update(self, x2d):
        if not self.factored:
            return self.loha_delta_matmul(x2d, self.delta_weight())
        rr = self.rank * self.rank
        # U[:, i r + j] = w1_a[:, i] * w2_a[:, j];  V[i r + j] = w1_b[i] * w2_b[j]
        left = self.reshape(self.p("hada_w1_a")[:, :, None] * self.p("hada_w2_a")[:, None, :],
                            (self.out_channels, rr))
        right = self.reshape(self.p("hada_w1_b")[:, None, :] * self.p("hada_w2_b")[None, :, :],
                             (rr, self.in_channels))
        return self.loha_out_matmul(self.loha_in_matmul(x2d, right), left) * self.scaling


class LohaModel(AdditiveModel):
    """``pet_type: loha``."""

    LAYER = LohaLinear


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
