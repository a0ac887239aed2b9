"""The frozen base of an adapted linear cell: ``nn.Dense``, MindFormers ``Linear``, or an mcore
``ColumnParallelLinear`` / ``RowParallelLinear`` (and subclasses).

An adapter cell takes over the base cell's own ``weight``/``bias`` Parameter objects (same
names, so base checkpoints load unchanged) and computes exactly what the base cell computes.
Dense/Linear: it adopts their matmul/bias primitives (so shard strategies set on them carry
over). mcore: it keeps the base cell as child ``base_layer`` and calls it, since its forward is
a ``Morph`` carrying the cell's parallel layouts; where a fused kernel computes base + delta
(unsharded only), it replaces that call and keeps the base's bias / ``skip_bias_add`` contract.
"""
import numpy as np
from mindspore import Tensor, nn
from mindspore.common import dtype as mstype
from mindspore.ops import operations as P

_DTYPES = {"float32": mstype.float32, "float16": mstype.float16, "bfloat16": mstype.bfloat16}


def to_mstype(name):
    """``"float16"`` -> ``mstype.float16``; None stays None."""
    return None if name is None else _DTYPES[name]


def parallel_linear_types() -> tuple:
    """mcore ColumnParallelLinear / RowParallelLinear (imported lazily: they pull in mcore)."""
    # pylint: disable=import-outside-toplevel
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear)
    return ColumnParallelLinear, RowParallelLinear


# MoE routed experts (tuners/experts.py): virtual projection name -> FFNGroupedGEMM's Parameter
EXPERT_PROJECTIONS = {"linear_fc1": "weight1", "linear_fc2": "weight2"}


def expert_types() -> tuple:
    """The routed-experts cell types adapters can target: mcore FFNGroupedGEMM (imported lazily)."""
    # pylint: disable=import-outside-toplevel
    from mindformers.parallel_core.training_graph.transformer.moe.ffn import FFNGroupedGEMM
    return (FFNGroupedGEMM,)


class AdoptedLinear(nn.Cell):
    """Base class of adapter cells: ``act(x W^T + b)`` of the adopted cell, plus a delta hook.

    Attributes: ``in_channels``, ``out_channels``, ``weight`` ([out, in] when ``transpose_b``,
    else [in, out]), ``bias`` ([out], only if ``has_bias``), ``compute_dtype``, ``matmul``
    (x2d [N, in] @ weight in its stored layout), ``parallel`` (base is an mcore layer).
    Subclasses implement ``delta(x2d, base_out)`` -> [N, out] in ``compute_dtype``, added
    before bias and activation (HF models apply activations outside Linear, so that is where
    PEFT adds it). While ``merged`` is set the delta is skipped: it lives in ``weight``.
    ``input_statistics``: a cell called on x2d [N, in] before anything else during a statistics
    pass (data_init.statistics), None otherwise.

    Dense/Linear: ``construct(x) -> y``. mcore: ``construct(x, weight=None) -> (y, bias)``, the
    base's contract: ``bias`` is None when the base added it, else its raw bias Parameter.
    A ``weight`` passed in goes to the base as is; the adapter (delta, DoRA, merge) always
    uses the layer's own weight, so layers fed an external weight are unsupported targets.
    """

    def __init__(self, base: nn.Cell, compute_dtype=None):
        super().__init__()
        from mindformers.modules.layers import Linear  # pylint: disable=import-outside-toplevel
        self.parallel = isinstance(base, parallel_linear_types())
        if self.parallel:
            self._adopt_parallel(base, compute_dtype)
            return
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
            raise TypeError(f"cannot adapt a {type(base).__name__}: expected nn.Dense, MindFormers Linear, "
                            "ColumnParallelLinear or RowParallelLinear")
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
        self._common_ops()

    def _adopt_parallel(self, base, compute_dtype):
        if base.weight is None:  # skip_weight_param_allocation: fed the embedding table at call time
            raise TypeError(f"{type(base).__name__} without its own weight (skip_weight_param_allocation, "
                            "e.g. an output layer tied to the embeddings) is not supported as an adapter "
                            "target")
        if not base.transpose_b:  # its Morph infers [..., in] as output shape: wrong inside any graph
            raise TypeError(f"{type(base).__name__} with transpose_b=False is not supported as an adapter "
                            "target")
        # insert_child_to_cell, not setattr: setattr would rename every base Parameter to
        # "base_layer.<attr>" (Cell.update_parameters_name), breaking checkpoint names.
        self.insert_child_to_cell("base_layer", base)
        self.transpose_b = True
        self.in_channels = base.input_size
        self.out_channels = base.output_size
        self.compute_dtype = to_mstype(compute_dtype) or base.compute_dtype
        self.weight = base.weight  # the same Parameter object, also registered here: name kept
        self.has_bias = base.has_bias
        if self.has_bias:
            self.bias = base.bias
        # The base folds its bias into the output unless skip_bias_add; DoRA needs it out again.
        self.bias_in_output = base.has_bias and not base.skip_bias_add
        # Our own MatMul (DoRA's dropout path): base.matmul runs inside the base's Morph.
        self.matmul = P.MatMul(transpose_b=True)
        self._common_ops()

    def _common_ops(self):
        # True once merged: graphs compiled from then on skip the adapter entirely.
        self.merged = False
        # True when a subclass computes base + delta in one fused op (fused_forward).
        self.fused = False
        self.input_statistics = None
        self.cast = P.Cast()
        self.transpose = P.Transpose()
        self.reshape = P.Reshape()
        self.shape = P.Shape()

    def construct(self, x, weight=None):
        if self.parallel:  # a constant: graph mode compiles one branch
            return self._parallel_forward(x, weight)
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        ori_dtype = x.dtype
        x2d = self.cast(self.reshape(x, (-1, self.in_channels)), self.compute_dtype)
        if self.input_statistics is not None:
            x2d = self.input_statistics(x2d)
        if self.fused and not self.merged:
            y = self.fused_forward(x2d)
        else:
            y = self.matmul(x2d, self.cast(self.weight, self.compute_dtype))
            if not self.merged:
                y = y + self.delta(x2d, y)
        if self.has_bias:
            y = self.bias_add(y, self.cast(self.bias, self.compute_dtype))
        if self.activation_flag:
            y = self.activation(y)
        return self.reshape(self.cast(y, ori_dtype), out_shape)

    def _parallel_forward(self, x, weight):
        """mcore: (base(x) + delta, bias); y has x's dtype, x any [..., in]."""
        if self.input_statistics is not None:
            x = self.reshape(self.input_statistics(self.reshape(x, (-1, self.in_channels))), self.shape(x))
        if self.fused and not self.merged and weight is None:
            return self._parallel_fused_forward(x)
        y, bias = self.base_layer(x) if weight is None else self.base_layer(x, weight)
        if self.merged:
            return y, bias
        x2d = self.cast(self.reshape(x, (-1, self.in_channels)), self.compute_dtype)
        base_out = self.cast(self.reshape(y, (-1, self.out_channels)), self.compute_dtype)
        if self.bias_in_output:  # delta wants x W^T alone (DoRA scales it); HF PEFT does the same
            base_out = base_out - self.cast(self.bias, self.compute_dtype)
        delta = self.delta(x2d, base_out)
        return y + self.reshape(self.cast(delta, y.dtype), self.shape(y)), bias

    def _parallel_fused_forward(self, x):
        """The unsharded mcore base's contract with ``fused_forward`` in place of its product:
        (y [..., out] in x's dtype, with the bias unless skip_bias_add; the bias returned if
        skipped, else None)."""
        x2d = self.cast(self.reshape(x, (-1, self.in_channels)), self.compute_dtype)
        y = self.fused_forward(x2d)
        if self.bias_in_output:
            y = y + self.cast(self.bias, self.compute_dtype)
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        return self.reshape(self.cast(y, x.dtype), out_shape), None if self.bias_in_output else self.base_layer.bias

    def fused_forward(self, x2d):
        """x2d W^T + delta in one op [N, out] (subclasses that set ``fused``)."""
        raise NotImplementedError

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
        full = (self.out_channels, self.in_channels) if self.transpose_b else (self.in_channels, self.out_channels)
        if data.shape != full:  # a model-parallel slice: SVD/QR/norms/merges of it would be wrong
            raise ValueError(f"weight {self.weight.name} holds a {data.shape} slice of {full}: "
                             f"PiSSA, OLoRA and DoRA need the whole weight (not sharded) to initialise, "
                             f"and merge()/merge_on_load to fold; under model parallel, fold a "
                             f"checkpoint with `mindformers-lora merge` instead")
        return data if self.transpose_b else data.T

    def set_weight_array(self, weight_oi: np.ndarray):
        """Overwrite the base weight from an [out, in] array, in the weight's own dtype."""
        data = weight_oi if self.transpose_b else weight_oi.T
        self.weight.set_data(Tensor(np.ascontiguousarray(data, dtype=np.float32), self.weight.dtype))


def param_array(param) -> np.ndarray:
    """A Parameter's data as numpy in its own dtype (MindSpore's numpy bfloat16 included)."""
    if getattr(param, "has_init", False):  # built under no_init_parameters: materialise first
        param.init_data()
    return param.asnumpy()


def to_numpy(param) -> np.ndarray:
    """A Parameter/Tensor of any float dtype (bfloat16 included) as a float64 numpy array."""
    return param_array(param).astype(np.float64)
