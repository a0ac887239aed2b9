"""The frozen base of an adapted linear cell, adopted from ``nn.Dense`` or MindFormers ``Linear``.

An adapter cell takes over the base cell's own ``weight``/``bias`` Parameter objects (same
names, so base checkpoints load unchanged) and its matmul/bias primitives (so shard strategies
set on them carry over), and computes exactly what the base cell computes.
"""
import numpy as np
from mindspore import Tensor, nn
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P

_DTYPES = {"float32": mstype.float32, "float16": mstype.float16, "bfloat16": mstype.bfloat16}


def to_mstype(name):
    """``"float16"`` -> ``mstype.float16``; None stays None."""
    return None if name is None else _DTYPES[name]


class AdoptedLinear(nn.Cell):
    """Base class of adapter cells: ``act(x W^T + b)`` of the adopted cell, plus a delta hook.

    Attributes: ``in_channels``, ``out_channels``, ``weight`` ([out, in] when ``transpose_b``,
    else [in, out]), ``bias`` ([out] or None), ``compute_dtype``.
    Subclasses implement ``delta(x2d, base_out)`` -> [N, out] in ``compute_dtype``, added
    before bias and activation (HF models apply activations outside Linear, so that is where
    PEFT adds it). While ``merged`` is set the delta is skipped: it lives in ``weight``.
    """

    def __init__(self, base: nn.Cell, compute_dtype=None):
        super().__init__()
        from mindformers.modules.layers import Linear  # pylint: disable=import-outside-toplevel
        if isinstance(base, Linear):
            if base.expert_flag or base.use_gmm:
                raise TypeError("MindFormers Linear with experts (expert_num > 1 or use_gmm) is not "
                                "supported as an adapter target")
            self.transpose_b = base.transpose_b
            base_dtype = base.dtype
        elif isinstance(base, nn.Dense):
            self.transpose_b = True
            base_dtype = base.weight.dtype
        else:
            raise TypeError(f"cannot adapt a {type(base).__name__}: expected nn.Dense or MindFormers Linear")
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.compute_dtype = to_mstype(compute_dtype) or base_dtype
        self.weight = base.weight
        self.has_bias = base.has_bias
        if self.has_bias:
            self.bias = base.bias
            self.bias_add = base.bias_add
        self.matmul = base.matmul
        self.activation = base.activation
        self.activation_flag = base.activation is not None
        # True once merged: graphs compiled from then on skip the adapter entirely.
        self.merged = False
        self.cast = P.Cast()
        self.transpose = P.Transpose()
        self.reshape = P.Reshape()
        self.shape = P.Shape()

    def construct(self, x):
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        ori_dtype = x.dtype
        x2d = self.cast(self.reshape(x, (-1, self.in_channels)), self.compute_dtype)
        y = self.matmul(x2d, self.cast(self.weight, self.compute_dtype))
        if not self.merged:
            y = y + self.delta(x2d, y)
        if self.has_bias:
            y = self.bias_add(y, self.cast(self.bias, self.compute_dtype))
        if self.activation_flag:
            y = self.activation(y)
        return self.reshape(self.cast(y, ori_dtype), out_shape)

    def delta(self, x2d, base_out):
        """The adapter's contribution for ``x2d`` [N, in], given ``base_out`` = x2d W^T [N, out]
        (no bias); returns [N, out] in ``compute_dtype``."""
        raise NotImplementedError

    def adapter_parameters(self):
        """The trainable Parameters this adapter added, in a fixed order."""
        raise NotImplementedError

    def name_parameters(self, prefix: str):
        """Name the adapter's own parameters ``<prefix>.<attribute>``."""
        for attr, param in self.parameters_and_names(expand=False):
            if param is not self.weight and param is not getattr(self, "bias", None):
                param.name = f"{prefix}.{attr}"

    def weight_oi(self):
        """The base weight as [out, in] in ``compute_dtype`` (graph-safe)."""
        weight = self.cast(self.weight, self.compute_dtype)
        return weight if self.transpose_b else self.transpose(weight, (1, 0))

    def weight_array(self) -> np.ndarray:
        """The base weight as a float64 [out, in] numpy array (a copy)."""
        data = to_numpy(self.weight)
        return data if self.transpose_b else data.T

    def set_weight_array(self, weight_oi: np.ndarray):
        """Overwrite the base weight from an [out, in] array, in the weight's own dtype."""
        data = weight_oi if self.transpose_b else weight_oi.T
        self.weight.set_data(Tensor(np.ascontiguousarray(data, dtype=np.float32), self.weight.dtype))


def to_numpy(param) -> np.ndarray:
    """A Parameter/Tensor of any float dtype (bfloat16 included) as a float64 numpy array."""
    if getattr(param, "has_init", False):  # built under no_init_parameters: materialise first
        param.init_data()
    return Tensor(param).astype(mstype.float32).asnumpy().astype(np.float64)
