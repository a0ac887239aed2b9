"""LoRA: y = base(x) + s * (dropout(x) A^T) B^T, with s = lora_alpha / r.

A [r, in] starts kaiming-uniform (a = sqrt(5), bound 1/sqrt(in), as HF PEFT), B [out, r]
starts at zero, so the adapted cell initially equals its base. Parameters are named
``<cell>.lora_A`` and ``<cell>.lora_B``.
"""
import math

from mindspore import Parameter, nn
from mindspore.common.initializer import HeUniform, initializer
from mindspore.ops import operations as P

from mindformers_lora_ext.tuners.base_layer import AdoptedLinear, to_mstype
from mindformers_lora_ext.tuners.model import AdapterModel
from mindformers_lora_ext import _boot


class LoraLinear(AdoptedLinear):
    """An adopted linear cell plus a rank-``rank`` update.

    Args: base (nn.Dense | Linear), rank (int), alpha (float), dropout (float in [0, 1)),
    param_init_type / compute_dtype ("float32" | "float16" | "bfloat16" | None = the base's).
    """

    def __init__(self, base, rank, alpha, dropout=0.0, param_init_type=None, compute_dtype=None):
        super().__init__(base, compute_dtype)
        param_dtype = to_mstype(param_init_type) or self.weight.dtype
        self.rank = rank
        self.scaling = float(alpha) / rank
        self.lora_A = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)),
                                            [rank, self.in_channels], param_dtype), name="lora_A")
        self.lora_B = Parameter(initializer("zeros", [self.out_channels, rank], param_dtype),
                                name="lora_B")
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a_matmul = P.MatMul(transpose_b=True)
        self.lora_b_matmul = P.MatMul(transpose_b=True)

    def delta(self, x2d):
        h = self.lora_a_matmul(self.lora_dropout(x2d), self.cast(self.lora_A, self.compute_dtype))
        return self.lora_b_matmul(h, self.cast(self.lora_B, self.compute_dtype)) * self.scaling

    def adapter_parameters(self):
        return [self.lora_A, self.lora_B]


class LoraExtModel(AdapterModel):
    """``pet_type: lora_ext``."""

    def make_layer(self, name, base_cell):
        config = self.config.pet_config
        opts = config.module_options(name)
        return LoraLinear(base_cell, opts["rank"], opts["alpha"], opts["dropout"],
                          config.param_init_type, config.compute_dtype)


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
