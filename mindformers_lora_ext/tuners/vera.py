"""VeRA (Kopiczko et al., 2023; HF PEFT's VeraConfig): h = base(x) + b * (B (d * (A dropout(x)))).

A [r, in_max] and B [out_max, r] are frozen random matrices shared by every target cell of
the model, sized to the largest target input / output and sliced per cell (A[:, :in],
B[:out]). Only the vectors d = ``vera_lambda_d`` [r] and b = ``vera_lambda_b`` [out] train
(r + out parameters per cell). dW = diag(b) B diag(d) A.

The projections are made from ``projection_prng_key`` with numpy's ``default_rng`` (PCG64,
platform independent): kaiming-uniform with gain sqrt(2) (bound sqrt(6 / fan_in), fan_in =
in_max for A, r for B), A drawn before B, as float32. They are the MindSpore parameters
``vera_A`` / ``vera_B`` (frozen; one pair per model), saved in adapter files with
``save_projection`` (PEFT's ``base_model.vera_A`` / ``base_model.vera_B``). HF PEFT draws them
with torch's generator, so the same key gives different matrices there: a PEFT VeRA adapter is
only usable here when it was saved with its projections (PEFT's default).

Model parallel: the projections are shared by cells whose bases split differently, and a
Parameter takes one layout, so every cell keeps A and B whole (its slices and both MatMuls
split only the batch, see :func:`~mindformers_lora_ext.tuners.sharding.vera_strategies`).
"""
from types import SimpleNamespace
from typing import Dict, Tuple

import numpy as np
from mindspore import Parameter, nn
from mindspore.common.initializer import Constant, Normal, One, Zero, initializer
from mindspore.ops import operations as P

from mindformers_lora_ext.config import VeraSpec
from mindformers_lora_ext.tuners.additive import AdditiveLinear, AdditiveModel, DeltaMath
from mindformers_lora_ext.tuners.base_layer import parallel_linear_types, to_mstype, to_numpy
from mindformers_lora_ext.tuners.lora_init import FromBase
from mindformers_lora_ext.tuners.sharding import vera_strategies
from mindformers_lora_ext import _boot

SHARED = ("vera_A", "vera_B")


def vera_projections(key: int, rank: int, in_max: int, out_max: int) -> Tuple[np.ndarray, np.ndarray]:
    """The shared (A [r, in_max], B [out_max, r]) for ``projection_prng_key`` = ``key``, float32."""
    rng = np.random.default_rng(key)
    bound_a, bound_b = np.sqrt(6.0 / in_max), np.sqrt(6.0 / rank)
    proj_a = rng.uniform(-bound_a, bound_a, (rank, in_max))
    proj_b = rng.uniform(-bound_b, bound_b, (out_max, rank))
    return proj_a.astype(np.float32), proj_b.astype(np.float32)


class VeraMath(DeltaMath):
    """dW = (b[:, None] * B[:out]) @ (d[:, None] * A[:, :in])."""

    CELL_PARAMS = ("vera_lambda_b", "vera_lambda_d")
    SHARED_PARAMS = SHARED

    @classmethod
    def out_in(cls, arrays):
        return arrays["vera_lambda_b"].shape[0], None

    @classmethod
    def expected_shapes(cls, spec, shape_oi):
        return {"vera_lambda_b": (shape_oi[0],), "vera_lambda_d": (spec.rank,)}

    @classmethod
    def delta_weight(cls, arrays, spec, shape_oi):
        out_dim, in_dim = shape_oi
        proj_a, proj_b = arrays["vera_A"], arrays["vera_B"]
        if proj_a.shape[1] < in_dim or proj_b.shape[0] < out_dim:
            raise ValueError(f"VeRA projections vera_A {proj_a.shape} / vera_B {proj_b.shape} are too small "
                             f"for a ({out_dim}, {in_dim}) weight")
        lam_b = arrays["vera_lambda_b"][:, None]
        lam_d = arrays["vera_lambda_d"][:, None]
        return (lam_b * proj_b[:out_dim]) @ (lam_d * proj_a[:, :in_dim])


def linear_dims(cell) -> Tuple[int, int]:
    """(in, out) of a supported linear cell."""
    if isinstance(cell, parallel_linear_types()):
        return cell.input_size, cell.output_size
    return cell.in_channels, cell.out_channels


class VeraLinear(AdditiveLinear):
    """An adopted linear cell plus VeRA; ``shared`` holds the model's ``vera_A`` / ``vera_B``
    Parameters (and ``in_max``, ``out_max``)."""

    MATH = VeraMath

    def __init__(self, base, spec: VeraSpec, shared, param_init_type=None, compute_dtype=None):
        super().__init__(base, spec, param_init_type, compute_dtype)
        if shared.in_max < self.in_channels or shared.out_max < self.out_channels:
            raise ValueError(f"VeRA projections sized ({shared.out_max}, {shared.in_max}) cannot serve a "
                             f"({self.out_channels}, {self.in_channels}) cell")
        self.vera_A = shared.vera_A  # the same frozen Parameter objects in every VeRA cell
        self.vera_B = shared.vera_B
        self.slice_a = self.in_channels < shared.in_max
        self.slice_b = self.out_channels < shared.out_max
        self.vera_lambda_b = Parameter(initializer(Zero() if spec.init_weights else One(),
                                                   [self.out_channels], self.param_dtype), name="vera_lambda_b")
        self.vera_lambda_d = Parameter(initializer(Constant(spec.d_initial) if spec.init_weights else Normal(1.0),
                                                   [spec.rank], self.param_dtype), name="vera_lambda_d")
        self.vera_dropout = nn.Dropout(p=spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.param_names = ("vera_lambda_b", "vera_lambda_d")
        self.rank = spec.rank
        # Named slice primitives (not tensor indexing): they take a strategy, so every user of the
        # shared projections can be given the same (whole) layout
        if self.slice_a:
            self.vera_a_slice = P.StridedSlice()
        if self.slice_b:
            self.vera_b_slice = P.StridedSlice()
        self.vera_a_matmul = P.MatMul(transpose_b=True)  # x [N, in] @ A[:, :in]^T -> [N, r]
        self.vera_b_matmul = P.MatMul(transpose_b=True)  # h [N, r] @ B[:out]^T -> [N, out]
        self.shard_ops(base)

    def adapter_strategies(self, base_strategy, transpose_b):
        return vera_strategies(base_strategy, transpose_b)

    def update(self, x2d):
        proj_a = self.p("vera_A")
        if self.slice_a:
            proj_a = self.vera_a_slice(proj_a, (0, 0), (self.rank, self.in_channels), (1, 1))
        proj_b = self.p("vera_B")
        if self.slice_b:
            proj_b = self.vera_b_slice(proj_b, (0, 0), (self.out_channels, self.rank), (1, 1))
        hidden = self.vera_a_matmul(self.vera_dropout(x2d), proj_a) * self.p("vera_lambda_d")
        return self.vera_b_matmul(hidden, proj_b) * self.p("vera_lambda_b")

    def adapter_arrays(self) -> Dict[str, np.ndarray]:
        arrays = super().adapter_arrays()
        arrays.update({name: to_numpy(getattr(self, name)) for name in SHARED})
        return arrays

    def name_parameters(self, prefix: str):
        """Name own parameters ``<prefix>.<attribute>``; the shared projections keep their
        model-level names ``vera_A`` / ``vera_B``."""
        shared = {id(self.vera_A), id(self.vera_B)}
        for attr, param in self.parameters_and_names(expand=False):
            if id(param) not in shared and param is not self.weight and param is not getattr(self, "bias", None):
                param.name = f"{prefix}.{attr}"


class VeraModel(AdditiveModel):
    """``pet_type: vera``: one frozen ``vera_A`` / ``vera_B`` pair for all targets."""

    LAYER = VeraLinear

    def prepare_targets(self, base_model, targets):
        config = self.config.pet_config
        cells = dict(base_model.cells_and_names())
        dims = [linear_dims(cells[name]) for name in targets]
        in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
        dtype = to_mstype(config.param_init_type) or cells[targets[0]].weight.dtype
        cache = {}

        def projection(index):
            def compute():
                if "arrays" not in cache:
                    cache["arrays"] = vera_projections(config.projection_prng_key, config.r, in_max, out_max)
                return cache["arrays"][index]
            return FromBase(compute)

        self._shared = SimpleNamespace(
            in_max=in_max, out_max=out_max,
            vera_A=Parameter(initializer(projection(0), [config.r, in_max], dtype), name="vera_A",
                             requires_grad=False),
            vera_B=Parameter(initializer(projection(1), [out_max, config.r], dtype), name="vera_B",
                             requires_grad=False))

    def make_layer(self, name, base_cell):
        config = self.config.pet_config
        return VeraLinear(base_cell, config.module_options(name), self._shared, config.param_init_type,
                          config.compute_dtype)

    def frozen_saved_parameters(self):
        return [getattr(self._shared, name) for name in self.config.pet_config.file_shared_tensors()]


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
