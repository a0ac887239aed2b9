"""LoRA and its variants on one layer: y = base(x) + s * (dropout(x) A^T) B^T  [+ s * b_B].

A [r, in], B [out, r]; s = alpha / r (rsLoRA: alpha / sqrt(r)); initial values by
``init_lora_weights`` (see lora_init). Variants are hook classes, as in HF PEFT: ``Lora`` is
the plain update and ``Dora`` rescales the adapted weight per output feature,
W' = m * (W + s B A) / ||W + s B A||_row, with the norm treated as a constant in backward.
Each variant also holds its merge math, on float64 numpy arrays, so folding into a live layer
and into a checkpoint file is the same code.
Parameters are named ``<cell>.lora_A``, ``.lora_B``, ``.lora_B_bias``, ``.lora_magnitude_vector``
(trainable) and ``<cell>.lora_active`` (frozen 0/1 gate that merge() clears).

EVA (data_init/eva.py) may give a cell a rank k other than its configured r, up to
round(r * rho): A and B are allocated with that many rows (``LoraSpec.rows``), the rows past k
(``effective_rank``) are zero and stay zero in training (their gradients are exactly zero), and
adapter files hold the first k only (zero-padded when read back).

A cell fusing k HF modules (mcore ``linear_qkv``, ``linear_fc1``) with ``fused_cells:
per_hf_module`` holds k adapters of rank r stacked: A [k*r, in], B [out, k*r] used as B * M, M
the 0/1 block mask of each module's rows and columns (hf_map.HfMap.block_mask). B starts at
zero and its masked-out entries get zero gradient, so they stay zero and every formula above
(merge included) holds with the stored B.
"""
from typing import Dict

import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from mindformers_lora_ext.config import DATA_DRIVEN_INITS, KEY_PREFIX, LoraSpec, lora_scaling
from mindformers_lora_ext.tuners.base_layer import AdoptedLinear, to_mstype, to_numpy
from mindformers_lora_ext.tuners.lora_init import FromBase, lora_initializers
from mindformers_lora_ext.tuners.model import AdapterModel
from mindformers_lora_ext.tuners.sharding import shard_adapter
from mindformers_lora_ext import _boot


class Lora:
    """The plain LoRA update (hooks are static: they take the layer)."""

    extra_parameters = ()

    @staticmethod
    def init(layer):
        """Create the variant's own parameters on ``layer``."""

    @staticmethod
    def delta(layer, x2d, base_out):  # pylint: disable=unused-argument  (graph mode has no `del`)
        return layer.lora_path(layer.lora_dropout(x2d))

    @staticmethod
    def merge(weight, delta_weight, params):
        """(merged weight, cache for unmerge) from float64 [out, in] arrays."""
        del params
        return weight + delta_weight, None

    @staticmethod
    def unmerge(weight, delta_weight, params, cache):
        del params, cache
        return weight - delta_weight


class Dora(Lora):
    """DoRA: magnitude m [out] (trainable, starts at ||W||_row) times the direction of W + sBA.

    y = x W^T + (c - 1) * drop(x) W^T + c * s drop(x) A^T B^T,  c = m / ||W + sBA||_row.
    Cost near LoRA's, no approximation:
    - the norm is ||W||^2_row + 2s rowsum(B * (W A^T)) + s^2 rowsum(B * (B (A A^T))) (float32,
      from the live W every step, so a reloaded base weight is never seen stale): [out, r]
      products instead of forming W + sBA [out, in];
    - under dropout (training), with ``use_fused_kernel: true``: drop(x) W^T = k (x W^T - z),
      k = 1/(1 - p), z = (x * dropped) W^T over the dropped elements only (kernels
      ``dropped_matmul``, a fraction p of a matmul; it regenerates ``PhiloxDropout``'s mask from
      its seed) where that kernel runs (CPU float32, unsharded Dense, Linear or mcore bases);
      else (and under ``auto``, where whole steps were not reliably faster with it) a second matmul of
      drop(x).
    """

    extra_parameters = ("lora_magnitude_vector",)

    @staticmethod
    def init(layer):
        def row_norms():  # of W + s B A: the adapted cell starts out equal to its LoRA form
            # A and B first: materialising them may replace W by its PiSSA/OLoRA residual
            arrays = {"lora_A": to_numpy(layer.lora_A), "lora_B": to_numpy(layer.lora_B)}
            return np.linalg.norm(layer.weight_array() + delta_weight_array(arrays, layer.scaling), axis=1)
        layer.lora_magnitude_vector = Parameter(
            initializer(FromBase(row_norms), [layer.out_channels], layer.lora_A.dtype),
            name="lora_magnitude_vector")
        # W A^T [out, r] from W in its stored layout ([out, in] or [in, out])
        layer.dora_wa_matmul = P.MatMul(transpose_a=not layer.transpose_b, transpose_b=True)
        layer.dora_dropped = None
        if layer.dropout_active:  # the kernel regenerates PhiloxDropout's mask from its seed
            from mindformers_lora_ext.kernels.layer import PhiloxDropout  # pylint: disable=import-outside-toplevel
            layer.dora_dropped, layer.dora_dropped_reason = _dropped_matmul(layer) \
                if isinstance(layer.lora_dropout, PhiloxDropout) else (None, layer.dropout_reason)
            layer.dora_keep_scale = 1.0 / (1.0 - layer.lora_dropout.p)

    @staticmethod
    def weight_norm(layer):
        """||W + s B A||_row [out] float32, a constant for backward."""
        f32 = mstype.float32
        weight = layer.cast(layer.weight, f32)
        lora_a = F.stop_gradient(layer.cast(layer.lora_A, f32))
        lora_b = F.stop_gradient(layer.cast(layer.b_matrix(), f32))
        s = layer.scaling
        w_sq = F.reduce_sum(weight * weight, 1 if layer.transpose_b else 0)
        cross = F.reduce_sum(lora_b * layer.dora_wa_matmul(weight, lora_a), 1)
        gram = layer.lora_a_matmul(lora_a, lora_a)  # A A^T [r, r]
        ba_sq = F.reduce_sum(lora_b * layer.delta_matmul(lora_b, gram), 1)
        return F.stop_gradient(F.sqrt(F.maximum(w_sq + (2 * s) * cross + (s * s) * ba_sq, 0.0)))

    @staticmethod
    def delta(layer, x2d, base_out):
        base_drop = base_out
        if layer.dropout_active and layer.training:
            if layer.dora_dropped is not None:
                x_drop, seed = layer.lora_dropout.with_seed(x2d)
                dropped_out = layer.dora_dropped(x2d, layer.lora_dropout.p_tensor, seed, layer.weight_oi())[0]
                base_drop = (base_out - dropped_out) * layer.dora_keep_scale
            else:
                x_drop = layer.lora_dropout(x2d)
                base_drop = layer.matmul(x_drop, layer.cast(layer.weight, layer.compute_dtype))
        else:
            x_drop = x2d
        norm = layer.cast(Dora.weight_norm(layer), layer.compute_dtype)
        scale = layer.cast(layer.lora_magnitude_vector, layer.compute_dtype) / norm
        # c (s x A^T B^T) = s x A^T (c B)^T: c scales B's [out, r] rows, not an [N, out] output
        return (scale - 1) * layer.active() * base_drop + layer.lora_path(x_drop, row_scale=scale)

    @staticmethod
    def merge(weight, delta_weight, params):
        adapted = weight + delta_weight
        norm = np.linalg.norm(adapted, axis=1)
        return adapted * (params["lora_magnitude_vector"] / norm)[:, None], norm

    @staticmethod
    def unmerge(weight, delta_weight, params, cache):
        return weight * (cache / params["lora_magnitude_vector"])[:, None] - delta_weight


class LoraLinear(AdoptedLinear):
    """An adopted linear cell plus a rank-``spec.rank`` update.

    Args: base (nn.Dense | Linear), spec (LoraSpec), param_init_type / compute_dtype
    ("float32" | "float16" | "bfloat16" | None = the base's).
    """

    def __init__(self, base, spec: LoraSpec, param_init_type=None, compute_dtype=None, block_mask=None):
        super().__init__(base, compute_dtype)
        param_dtype = to_mstype(param_init_type) or self.weight.dtype
        rank = min(spec.allocated, self.in_channels) if block_mask is None else block_mask.shape[1]
        self.rank = rank  # rows of A, columns of B
        self.configured_rank, self.configured_alpha, self.use_rslora = spec.rank, spec.alpha, spec.use_rslora
        # the rows in use: all, unless allocated beyond the rank for EVA (which sets it later)
        self.effective_rank = min(spec.rank, rank) if block_mask is None and spec.allocated > spec.rank else rank
        self.scaling = spec.scaling
        # per-module adapters in a fused cell (see the module docstring); None: one adapter
        self.block_mask = None if block_mask is None else Tensor(block_mask, self.compute_dtype)
        init_a, init_b = lora_initializers(spec.init, self, rank, spec.scaling)
        self.lora_A = Parameter(initializer(init_a, [rank, self.in_channels], param_dtype),
                                name="lora_A")
        self.lora_B = Parameter(initializer(init_b, [self.out_channels, rank], param_dtype),
                                name="lora_B")
        self.use_lora_bias = spec.lora_bias
        if spec.lora_bias:
            self.lora_B_bias = Parameter(initializer("zeros", [self.out_channels], param_dtype),
                                         name="lora_B_bias")
        self.use_fused_kernel = spec.use_fused_kernel
        self.dropout_active = spec.dropout > 0
        self.lora_dropout = self._make_dropout(spec)
        self.lora_a_matmul = P.MatMul(transpose_b=True)
        self.lora_b_matmul = P.MatMul(transpose_b=True)
        self.delta_matmul = P.MatMul()  # B (A A^T) in DoRA's norm
        # 1 while the adapter is applied, 0 once merged: a Parameter, so a graph compiled
        # before merge() still computes the right thing (a Python flag would be frozen into it).
        self.lora_active = Parameter(Tensor(1.0, mstype.float32), name="lora_active",
                                     requires_grad=False)
        self.variant = Dora if spec.use_dora else Lora
        self.variant.init(self)
        self._merge_cache = None
        self._setup_fused(spec)
        shard_adapter(self, base)

    def _make_dropout(self, spec):
        """The input dropout of the composition: the kernels' Philox dropout where it runs (its
        backward regenerates the mask: none is kept), else MindSpore's ``nn.Dropout``."""
        if not self.dropout_active:
            return nn.Identity()
        from mindformers_lora_ext.kernels import dispatch  # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext.kernels.layer import PhiloxDropout  # pylint: disable=import-outside-toplevel
        op, self.dropout_reason = _layer_kernel(self, dispatch.resolve_dropout)
        return PhiloxDropout(spec.dropout, op) if op is not None else nn.Dropout(p=spec.dropout)

    def _setup_fused(self, spec):
        """Use the fused kernel (kernels.FusedLoraMatmul) where ``use_fused_kernel`` and the
        dispatch rule allow: plain LoRA on an unsharded [out, in] weight (Dense/Linear, or an
        mcore base called without a weight argument: the op then replaces the base's product)."""
        if spec.use_fused_kernel is False or spec.use_dora or not self.transpose_b \
                or getattr(self.matmul, "in_strategy", None) or _sharded_reason(self, spec.use_fused_kernel):
            return
        from mindformers_lora_ext.kernels import FusedLoraMatmul  # pylint: disable=import-outside-toplevel
        fused = FusedLoraMatmul(self.in_channels, self.out_channels, self.rank, spec.dropout,
                                self.compute_dtype, use_fused=spec.use_fused_kernel)
        if fused.fused:
            self.fused_matmul = fused
            self.fused = True

    def fused_forward(self, x2d):
        dtype = self.compute_dtype
        scaling = self.active() * self.scaling
        y = self.fused_matmul(x2d, self.cast(self.weight, dtype), self.cast(self.lora_A, dtype),
                              self.b_matrix(), scaling)
        if self.use_lora_bias:
            y = y + self.cast(self.lora_B_bias, dtype) * scaling
        return y

    def active(self):
        """1 (adapter applied) or 0 (merged), in compute dtype."""
        return self.cast(self.lora_active, self.compute_dtype)

    def b_matrix(self):
        """B [out, r] in compute dtype (times the block mask for per-module adapters)."""
        b = self.cast(self.lora_B, self.compute_dtype)
        return b if self.block_mask is None else b * self.block_mask

    def lora_path(self, x2d, row_scale=None):
        """s * (x A^T) B^T [+ s * b_B] for ``x2d`` [N, in] -> [N, out]; ``row_scale`` [out]
        (compute dtype) multiplies each output feature, through B's rows."""
        scaling = self.active() * self.scaling
        # s scales h [N, r], not y [N, out]: r/out of the elementwise work, forward and backward
        h = self.lora_a_matmul(x2d, self.cast(self.lora_A, self.compute_dtype)) * scaling
        b = self.b_matrix()
        if row_scale is not None:
            b = b * F.expand_dims(row_scale, 1)
        y = self.lora_b_matmul(h, b)
        if self.use_lora_bias:
            bias = self.cast(self.lora_B_bias, self.compute_dtype) * scaling
            y = y + (bias if row_scale is None else bias * row_scale)
        return y

    def delta(self, x2d, base_out):
        return self.variant.delta(self, x2d, base_out)

    def adapter_parameters(self):
        names = ("lora_A", "lora_B") + (("lora_B_bias",) if self.use_lora_bias else ()) \
            + self.variant.extra_parameters
        return [getattr(self, name) for name in names]

    def adapter_arrays(self) -> Dict[str, np.ndarray]:
        """The adapter parameters as float64 numpy arrays, by attribute name."""
        return {p.name.rsplit(".", 1)[-1]: to_numpy(p) for p in self.adapter_parameters()}

    def merge(self):
        """Fold the adapter into the base weight (and bias); forward then skips the adapter."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        arrays = self.adapter_arrays()
        merged, self._merge_cache = self.variant.merge(
            self.weight_array(), delta_weight_array(arrays, self.scaling), arrays)
        self.set_weight_array(merged)
        self._shift_bias(arrays, +1)
        self.lora_active.set_data(Tensor(0.0, mstype.float32))
        self.merged = True

    def unmerge(self):
        """Undo :meth:`merge` (to float rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        arrays = self.adapter_arrays()
        self.set_weight_array(self.variant.unmerge(
            self.weight_array(), delta_weight_array(arrays, self.scaling), arrays, self._merge_cache))
        self._shift_bias(arrays, -1)
        self.lora_active.set_data(Tensor(1.0, mstype.float32))
        self.merged = False

    def apply_data_init(self, lora_a: np.ndarray, lora_b: np.ndarray, alpha=None, residual=False):
        """Set A [k, in] and B [out, k] (float64; zero-padded to the allocated rank) from a
        data-driven init; ``alpha``: the cell's new lora_alpha (k then sets the scaling, EVA);
        ``residual``: the base weight becomes W - s B A. A cell given k = 0 is switched off."""
        rank = lora_a.shape[0]
        if rank > self.rank or lora_b.shape != (self.out_channels, rank):
            raise ValueError(f"{self.weight.name}: data-driven A {lora_a.shape} / B {lora_b.shape} do not fit "
                             f"[<= {self.rank}, {self.in_channels}] / [{self.out_channels}, <= {self.rank}]")
        if alpha is not None:
            self.set_rank(rank, alpha)
        for param, value in ((self.lora_A, self.padded("lora_A", lora_a)), (self.lora_B, self.padded("lora_B", lora_b))):
            param.set_data(Tensor(value.astype(np.float32), param.dtype))
        if residual:
            self.subtract_from_base()

    def subtract_from_base(self):
        """W <- W - s B A with the adapter as it is (in its own dtype): the residual base weight
        of a run that starts at this adapter."""
        arrays = self.adapter_arrays()
        self.set_weight_array(self.weight_array() - self.scaling * (arrays["lora_B"] @ arrays["lora_A"]))

    def set_rank(self, rank: int, alpha: float):
        """Use the first ``rank`` rows (<= the allocated rank) with scaling from ``alpha``; rank 0
        switches the cell off. Call before the graphs that use it compile (the scaling is a
        constant of theirs)."""
        if self.merged or rank > self.rank:
            raise ValueError(f"{self.weight.name}: cannot use rank {rank} (allocated {self.rank}, merged {self.merged})")
        self.effective_rank = rank
        if rank:
            self.scaling = lora_scaling(alpha, rank, self.use_rslora)
        self.lora_active.set_data(Tensor(1.0 if rank else 0.0, mstype.float32))

    def file_array(self, attr: str, array: np.ndarray) -> np.ndarray:
        """``array`` of parameter ``attr`` as adapter files hold it: A, B cut to the rank in use."""
        if self.effective_rank == self.rank:
            return array
        if attr == "lora_A":
            return array[: self.effective_rank]
        if attr == "lora_B":
            return array[:, : self.effective_rank]
        return array

    def padded(self, attr: str, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`file_array`: A, B zero-padded to the allocated rank."""
        if attr == "lora_A" and array.shape[0] < self.rank:
            return np.concatenate([array, np.zeros((self.rank - array.shape[0], array.shape[1]), array.dtype)])
        if attr == "lora_B" and array.shape[1] < self.rank:
            return np.concatenate([array, np.zeros((array.shape[0], self.rank - array.shape[1]), array.dtype)], 1)
        return array

    def _shift_bias(self, arrays, sign):
        if not self.use_lora_bias:
            return
        if not self.has_bias:
            raise ValueError("lora_bias needs a base cell with a bias to merge into")
        bias = to_numpy(self.bias) + sign * self.scaling * arrays["lora_B_bias"]
        self.bias.set_data(Tensor(bias.astype(np.float32), self.bias.dtype))


def _dropped_matmul(layer):
    """(DoRA's dropout-correction op for ``layer`` or None, reason): CPU float32 and unsharded."""
    from mindformers_lora_ext.kernels import dispatch  # pylint: disable=import-outside-toplevel
    return _layer_kernel(layer, dispatch.resolve_dropped_matmul)


def _layer_kernel(layer, resolve):
    """(``resolve``'s op for ``layer`` or None, reason): only where the layer runs unsharded (the
    CPU Custom ops have no shard strategy)."""
    reason = _sharded_reason(layer, layer.use_fused_kernel)
    if reason:
        return None, reason
    return resolve(layer.use_fused_kernel, layer.compute_dtype)


def _sharded_reason(layer, use_fused_kernel):
    """Why ``layer`` cannot run our kernels (its computation is sharded), or None. Logged once
    per reason when ``use_fused_kernel`` is true (asked for, not given)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.kernels import dispatch  # pylint: disable=import-outside-toplevel
    mode = ms.get_auto_parallel_context("parallel_mode")
    reason = None
    if mode not in ("stand_alone", "data_parallel"):
        reason = f"parallel_mode {mode}: the kernel has no shard strategy"
    elif layer.parallel and getattr(layer.base_layer, "tp", 1) != 1:
        # RowParallelLinear reduces its product over tensor-parallel ranks inside its Morph
        reason = f"tensor_model_parallel_size {layer.base_layer.tp}: the kernel has no shard strategy"
    if reason and use_fused_kernel is True:
        dispatch.warn_once(dispatch.current_device(), reason)
    return reason


def delta_weight_array(arrays: Dict[str, np.ndarray], scaling: float) -> np.ndarray:
    """s * B A as float64 [out, in]."""
    return scaling * (arrays["lora_B"] @ arrays["lora_A"])


def merged_weight(weight_oi: np.ndarray, arrays: Dict[str, np.ndarray], scaling: float,
                  use_dora: bool) -> np.ndarray:
    """The merged [out, in] weight for a checkpoint: W folded with the adapter ``arrays``."""
    variant = Dora if use_dora else Lora
    return variant.merge(weight_oi, delta_weight_array(arrays, scaling), arrays)[0]


class LoraExtModel(AdapterModel):
    """``pet_type: lora_ext`` and its presets (dora, rslora, pissa, olora); MoE routed experts
    too (tuners/experts.py)."""

    LAYER = LoraLinear

    def prepare_targets(self, base_model, targets):
        """With ``fused_cells: per_hf_module``: the block masks of the fused cells among
        ``targets``, from the model's HF map (hf_map.for_network)."""
        self._block_masks = {}
        config = self.config.pet_config
        if config.fused_cells != "per_hf_module":
            return
        from mindformers_lora_ext import hf_map  # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext.tuners.targeting import checkpoint_prefix  # pylint: disable=import-outside-toplevel
        cells = dict(base_model.cells_and_names())
        prefixes = {checkpoint_prefix(t, cells[t]): cells[t] for t in targets}
        outputs = {name: (0, int(cell.weight.shape[0])) for name, cell in prefixes.items()}
        names = hf_map.for_network(base_model, outputs)
        names = names.with_per_module(list(names.cells))
        self._block_masks = {name: names.block_mask(name, config.module_options(name).rank)
                             for name in outputs if names.cell(name).per_module}

    def data_init_layers(self) -> Dict[str, LoraLinear]:
        """The adapter layers a data-driven init sets, by checkpoint prefix."""
        return dict(self._adapter_layers)

    def has_adapter_values(self) -> bool:
        """Whether any A holds a non-zero value (a data-driven init's placeholders are 0)."""
        return any(np.any(to_numpy(layer.lora_A) != 0) for layer in self._adapter_layers.values())

    def subtract_adapters(self) -> None:
        """Every adapter taken out of its base weight (W - s B A): the residual base of a run
        that started at the adapters now held (AdapterCheckpoint's resume of CorDA / LoRA-GA)."""
        for layer in self._adapter_layers.values():
            layer.subtract_from_base()

    def adopt_file_ranks(self, arrays, file_config):
        """EVA: each cell's rank in use from the file (A's rows; a cell left out: 0) and its
        lora_alpha from ``file_config`` (the file's pet config; else ours), all checked first."""
        config = self.config.pet_config
        if config.init_lora_weights != "eva":
            return
        ranks = {}
        for name, layer in self._adapter_layers.items():
            found = arrays.get(f"{name}.lora_A")
            rank = 0 if found is None else int(found.shape[0])
            if rank > layer.rank:
                raise ValueError(f"adapter tensor {name}.lora_A has rank {rank}; this model holds at most "
                                 f"{layer.rank} (eva_config.rho x the configured rank)")
            ranks[name] = (rank, (file_config or config).module_options(name).alpha)
        for name, (rank, alpha) in ranks.items():
            self._adapter_layers[name].set_rank(rank, alpha)
        config.record_ranks(ranks)
        self.ranks_changed()

    def make_layer(self, name, base_cell):
        config = self.config.pet_config
        return LoraLinear(base_cell, config.module_options(name), config.param_init_type, config.compute_dtype,
                          block_mask=self._block_masks.get(name))

    def make_expert_layer(self, name, base_cell, projections):
        from mindformers_lora_ext.tuners.experts import ExpertLoraLayer  # pylint: disable=import-outside-toplevel
        config = self.config.pet_config
        if config.init_lora_weights in DATA_DRIVEN_INITS:
            raise ValueError(f"{KEY_PREFIX}.init_lora_weights = {config.init_lora_weights!r} cannot initialise "
                             f"MoE routed experts ({name}: {', '.join(projections)}): each expert sees its own "
                             f"tokens. Leave them out with exclude_layers: [experts]")
        return ExpertLoraLayer(base_cell, {proj: config.module_options(f"{name}.{proj}") for proj in projections},
                               config.param_init_type, config.compute_dtype, name)


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
