"""Shared plumbing of adapters whose update is an additive dW on the base weight (VeRA, LoHa,
LoKr): the 0/1 gate that ``merge()`` clears, merge/unmerge through each method's numpy math,
PEFT's ``rank_dropout`` / ``module_dropout``, and the model class.

Each method module (vera.py, loha.py, lokr.py) provides a ``*Math`` class (a subclass of
:class:`DeltaMath`) holding its dW formula on float64 numpy arrays: the live layer's
``merge()`` and ``merge.merge_checkpoint`` both use it, so folding into a layer and into a
checkpoint file is the same code.

Under (semi-)auto parallel every MatMul call site of a method's ``update`` is its own named
primitive, so each takes the strategy its method's rule in :mod:`.sharding` derives from the
base's (:meth:`AdditiveLinear.shard_ops`).
"""
from typing import Dict, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor
from mindspore.common import dtype as mstype
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from mindformers_lora_ext.tuners.base_layer import AdoptedLinear, to_mstype, to_numpy
from mindformers_lora_ext.tuners.model import AdapterModel
from mindformers_lora_ext.tuners.sharding import Strategy, shard_adapter
from mindformers_lora_ext import _boot

GATE = "adapter_active"


class DeltaMath:
    """A method's dW as float64 numpy, shared by live layers and checkpoint merging.

    ``CELL_PARAMS``: per-cell tensor attributes (any present marks an adapted cell);
    ``SHARED_PARAMS``: model-level tensors (VeRA's projections), by parameter name.
    """

    CELL_PARAMS: Tuple[str, ...] = ()
    SHARED_PARAMS: Tuple[str, ...] = ()

    @classmethod
    def out_in(cls, arrays: Dict[str, np.ndarray]) -> Tuple[int, Optional[int]]:
        """(out, in) of the adapted weight as far as the adapter tensors tell (in may be None)."""
        raise NotImplementedError

    @classmethod
    def expected_shapes(cls, spec, shape_oi: Tuple[int, int]) -> Dict[str, Tuple[int, ...]]:
        """Per-cell tensor attribute -> shape for an (out, in) weight under ``spec``."""
        raise NotImplementedError

    @classmethod
    def check_shapes(cls, cell: str, arrays: Dict[str, np.ndarray], spec, shape_oi) -> None:
        """ValueError naming the first per-cell tensor that ``spec`` does not give (wrong config?)."""
        expected = cls.expected_shapes(spec, shape_oi)
        present = {k: tuple(v.shape) for k, v in arrays.items() if k in cls.CELL_PARAMS}
        if present != expected:
            bad = sorted(set(present) ^ set(expected)) or sorted(k for k in present if present[k] != expected[k])
            raise ValueError(f"{cell}: adapter tensors {present} do not match what the pet_config gives for "
                             f"a {tuple(shape_oi)} weight ({expected}; first difference: {bad[0]}): wrong "
                             f"config for this adapter?")

    @classmethod
    def delta_weight(cls, arrays: Dict[str, np.ndarray], spec, shape_oi: Tuple[int, int]) -> np.ndarray:
        """dW [out, in] (float64) for a cell with weight shape ``shape_oi`` = (out, in)."""
        raise NotImplementedError

    @classmethod
    def merge(cls, weight_oi: np.ndarray, arrays, spec) -> np.ndarray:
        """W + dW, float64 [out, in]."""
        return weight_oi + cls.delta_weight(arrays, spec, weight_oi.shape)

    @classmethod
    def unmerge(cls, weight_oi: np.ndarray, arrays, spec) -> np.ndarray:
        """W - dW (inverse of :meth:`merge`)."""
        return weight_oi - cls.delta_weight(arrays, spec, weight_oi.shape)


class AdditiveLinear(AdoptedLinear):
    """An adopted linear cell plus an additive update; subclasses set ``MATH``, create their
    parameters and one primitive per MatMul call site, list the parameters' names in
    ``self.param_names``, implement ``update(x2d)`` and ``adapter_strategies``, and end their
    ``__init__`` with ``self.shard_ops(base)``.

    ``adapter_active`` (frozen scalar, ``<cell>.adapter_active``) is 1 while the adapter is
    applied and 0 once merged, so a graph compiled before ``merge()`` stays correct.
    """

    MATH = DeltaMath

    def __init__(self, base, spec, param_init_type=None, compute_dtype=None):
        super().__init__(base, compute_dtype)
        self.spec = spec
        self.param_dtype = to_mstype(param_init_type) or self.weight.dtype
        self.param_names: Tuple[str, ...] = ()
        self.adapter_active = Parameter(Tensor(1.0, mstype.float32), name=GATE, requires_grad=False)
        rank_dropout = getattr(spec, "rank_dropout", 0.0)
        module_dropout = getattr(spec, "module_dropout", 0.0)
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rank_dropout_on = rank_dropout > 0
        self.module_dropout_on = module_dropout > 0
        self.rank_dropout_scale = bool(getattr(spec, "rank_dropout_scale", False))
        if self.rank_dropout_on or self.module_dropout_on:
            self.uniform = P.UniformReal()

    def adapter_strategies(self, base_strategy: Strategy, transpose_b: bool) -> Dict[str, Strategy]:
        """This method's op strategies (by attribute name) for a base MatMul ``base_strategy``."""
        raise NotImplementedError

    def shard_ops(self, base, force: bool = False) -> Optional[Dict[str, Strategy]]:
        """Set :meth:`adapter_strategies` from ``base``'s strategy, under (semi-)auto parallel
        (or ``force``) and only when the base has one; returns them, else None."""
        return shard_adapter(self, base, force, rule=self.adapter_strategies)

    def active(self):
        """1 (adapter applied) or 0 (merged), in compute dtype."""
        return self.cast(self.adapter_active, self.compute_dtype)

    def p(self, name):
        """Parameter ``name`` in compute dtype."""
        return self.cast(getattr(self, name), self.compute_dtype)

    def delta(self, x2d, base_out):  # pylint: disable=unused-argument
        return self.dropouts(self.update(x2d)) * self.active()

    def update(self, x2d):
        """x2d [N, in] -> x2d dW^T [N, out] in compute dtype."""
        raise NotImplementedError

    def dropouts(self, y):
        """HF PEFT's training-only dropouts on the update y [N, out]: ``rank_dropout`` keeps each
        output row of dW (a column of y) with probability 1 - p (LoHa always, LoKr with
        ``rank_dropout_scale``, rescaled by 1/mean of the mask); ``module_dropout`` drops the whole
        update with probability p (no rescaling). One draw per call."""
        if self.training and self.rank_dropout_on:
            keep = self.cast(self.uniform((self.out_channels,)) > self.rank_dropout, self.compute_dtype)
            if self.rank_dropout_scale:  # PEFT divides by the mean; an all-zero mask stays zero
                keep = keep / F.maximum(keep.mean(), 1.0 / self.out_channels)
            y = y * keep
        if self.training and self.module_dropout_on:
            y = y * self.cast(self.uniform((1,)) > self.module_dropout, self.compute_dtype)
        return y

    def adapter_parameters(self):
        return [getattr(self, name) for name in self.param_names]

    def adapter_arrays(self) -> Dict[str, np.ndarray]:
        """Everything the merge math reads (trainable and shared tensors), float64, by attribute."""
        return {name: to_numpy(getattr(self, name)) for name in self.param_names}

    def delta_weight_array(self) -> np.ndarray:
        """dW [out, in] as float64 numpy."""
        return self.MATH.delta_weight(self.adapter_arrays(), self.spec, (self.out_channels, self.in_channels))

    def merge(self):
        """Fold dW into the base weight; forward then skips the adapter."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        self.set_weight_array(self.MATH.merge(self.weight_array(), self.adapter_arrays(), self.spec))
        self.adapter_active.set_data(Tensor(0.0, mstype.float32))
        self.merged = True

    def unmerge(self):
        """Undo :meth:`merge` (to float rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.set_weight_array(self.MATH.unmerge(self.weight_array(), self.adapter_arrays(), self.spec))
        self.adapter_active.set_data(Tensor(1.0, mstype.float32))
        self.merged = False


class AdditiveModel(AdapterModel):
    """AdapterModel of an additive method: ``make_layer`` builds ``LAYER`` from the config's
    ``module_options(name)``; ``merge()`` / ``unmerge()`` fold every layer."""

    LAYER = AdditiveLinear


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
