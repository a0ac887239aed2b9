"""LoRA and DoRA on MoE routed experts: mcore ``FFNGroupedGEMM`` (Qwen3-MoE, DeepSeek-V3).

The routed experts are no linear cells: ``FFNGroupedGEMM`` holds ``weight1`` [E*h, 2H] and
``weight2`` [E*H, h] (expert e computes ``x @ w1_e`` with w1_e [h, 2H], i.e. [in, out]) and runs
them with one grouped matmul over the tokens sorted by expert. Its two projections are targeted
by the virtual names ``<experts>.linear_fc1`` / ``<experts>.linear_fc2`` (Megatron-Core's names
for a grouped MLP; ``<experts>`` alone targets both). Each expert gets its own adapter:

    fc(x) = x W_e + s * (drop(x) A_e^T) B_e^T          A [E, r, in], B [E, out, r]
    DoRA:   scaled by m_e / ||W_e + s B_e A_e||  per output feature (norm detached, as LoRA's DoRA)

computed with the same grouped matmul (``GroupedMatmul``, cumulative group list) as the base's
experts, so it runs wherever they do. Parameters: ``<experts>.linear_fc1.lora_A``, ``.lora_B``,
``.lora_magnitude_vector`` [E, out], and the frozen gate ``.lora_active``; the base Parameters
keep their names. Merge math is LoRA's / DoRA's (tuners/lora.py) applied per expert.
Not supported on experts (an error says so): data-driven inits (PiSSA/OLoRA), ``lora_bias``
(the experts have no bias), token dispatchers other than ``alltoall``. Under semi-auto parallel
the adapter operands are split over experts like the expert weights (expert parallel; not yet
run on hardware).
"""
import math
from typing import Dict

import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common import dtype as mstype
from mindspore.common.initializer import Normal, Uniform, Zero, initializer
from mindspore.context import ParallelMode
from mindspore.ops import functional as F
from mindspore.ops import operations as P
from mindspore.ops.auto_generate import GroupedMatmul, Swiglu
from mindspore.ops.operations import Morph
from mindspore.parallel._utils import _get_parallel_mode

from mindformers_lora_ext.config import KEY_PREFIX, LoraSpec
from mindformers_lora_ext.tuners.base_layer import EXPERT_PROJECTIONS, to_mstype, to_numpy
from mindformers_lora_ext.tuners.lora import Dora, Lora, delta_weight_array
from mindformers_lora_ext.tuners.lora_init import FromBase
from mindformers_lora_ext import _boot

def grouped_matmul(x, weight, group_list):
    """Rows of expert e times ``weight[e]``: x [T, in], weight [E, in, out], ``group_list`` [E]
    int64 cumulative row counts (rows group_list[e-1]..group_list[e] belong to expert e) -> [T, out].
    FFNGroupedGEMM's own call."""
    return GroupedMatmul(split_item=3, group_type=0)([x], [weight], None, None, None, None, None, group_list)[0]


def swiglu(x):
    """silu(first half) * second half of the last dim: FFNGroupedGEMM's activation."""
    return Swiglu()(x, -1)


def row_experts(group_list, rows):
    """The expert index [T] int32 of each of ``rows`` [T] row indices, from the cumulative
    ``group_list`` [E] (the number of experts whose range ends at or before the row)."""
    ends = F.cast(group_list, mstype.int32)
    index = F.reduce_sum(F.cast(F.expand_dims(rows, 1) >= F.expand_dims(ends, 0), mstype.int32), 1)
    return F.minimum(index, F.shape(group_list)[0] - 1)


class ExpertProjectionLora(nn.Cell):
    """One adapted projection of E routed experts (fc1 or fc2).

    ``weight`` is the base Parameter [E*in, out]; ``lora_A`` [E, r, in], ``lora_B`` [E, out, r],
    with DoRA ``lora_magnitude_vector`` [E, out]; ``lora_active`` the frozen 0/1 merge gate.
    """

    def __init__(self, weight, experts: int, in_dim: int, out_dim: int, spec: LoraSpec, param_dtype,
                 compute_dtype, name: str):
        super().__init__()
        if spec.init not in (True, False, "gaussian"):
            raise ValueError(f"{KEY_PREFIX}.init_lora_weights = {spec.init!r} is not supported on MoE "
                             f"routed experts ({name}): data-driven inits need one weight per cell; use "
                             f"true, false or gaussian, or exclude the experts (exclude_layers: [experts])")
        if spec.lora_bias:
            raise ValueError(f"{KEY_PREFIX}.lora_bias is not supported on MoE routed experts ({name}): "
                             f"they have no bias to merge into")
        self.weight = weight
        self.experts, self.in_dim, self.out_dim = experts, in_dim, out_dim
        self.rank, self.scaling = spec.rank, spec.scaling
        self.compute_dtype = compute_dtype
        dtype = param_dtype or weight.dtype
        init_a = Uniform(scale=1.0 / math.sqrt(in_dim))  # kaiming-uniform(a=sqrt(5)) per expert
        init_b = {True: Zero(), "gaussian": Zero(), False: Uniform(scale=1.0 / math.sqrt(spec.rank))}[spec.init]
        if spec.init == "gaussian":
            init_a = Normal(sigma=1.0 / spec.rank)
        self.lora_A = Parameter(initializer(init_a, [experts, spec.rank, in_dim], dtype), name="lora_A")
        self.lora_B = Parameter(initializer(init_b, [experts, out_dim, spec.rank], dtype), name="lora_B")
        self.lora_active = Parameter(Tensor(1.0, mstype.float32), name="lora_active", requires_grad=False)
        self.variant = Dora if spec.use_dora else Lora
        self.use_dora = spec.use_dora
        if spec.use_dora:  # starts at ||W_e + s B_e A_e||: the adapted experts start out as their LoRA form
            self.lora_magnitude_vector = Parameter(
                initializer(FromBase(self._adapted_norms), [experts, out_dim], dtype), name="lora_magnitude_vector")
        self.dropout_active = spec.dropout > 0
        self.lora_dropout = nn.Dropout(p=spec.dropout) if self.dropout_active else nn.Identity()
        self.cast = P.Cast()
        self.transpose = P.Transpose()
        self.reshape = P.Reshape()
        self.batch_matmul = P.BatchMatMul()
        self.no_scale = Tensor(np.ones((experts, 1)), compute_dtype)  # LoRA: DoRA's scale operand, unused
        self.merged = False
        self._merge_cache = None

    def operands(self):
        """What the experts' forward needs of this adapter, computed outside the dispatch:
        A^T [E, in, r], s B^T [E, r, out] (times the merge gate) and the DoRA scale
        1 + gate (m / ||W_e + s B_e A_e|| - 1) [E, out] (ones [E, 1] without DoRA)."""
        dtype = self.compute_dtype
        gate = self.cast(self.lora_active, dtype)
        a_t = self.transpose(self.cast(self.lora_A, dtype), (0, 2, 1))
        b_t = self.transpose(self.cast(self.lora_B, dtype), (0, 2, 1))
        if not self.use_dora:
            return a_t, b_t * (gate * self.scaling), self.no_scale
        weight = self.reshape(self.cast(self.weight, dtype), (self.experts, self.in_dim, self.out_dim))
        adapted = weight + F.stop_gradient(self.batch_matmul(a_t, b_t)) * self.scaling  # [E, in, out]
        norm = F.stop_gradient(F.sqrt(F.reduce_sum(adapted * adapted, 1)))  # [E, out]
        scale = self.cast(self.lora_magnitude_vector, dtype) / norm
        return a_t, b_t * (gate * self.scaling), 1 + gate * (scale - 1)

    def apply(self, x, weight, group_list, a_t, b_t, scale):
        """x [T, in] sorted by expert, ``weight`` [E, in, out] and :meth:`operands` -> [T, out]."""
        base = grouped_matmul(x, weight, group_list)
        x_drop = self.lora_dropout(x)
        lora = grouped_matmul(grouped_matmul(x_drop, a_t, group_list), b_t, group_list)
        if not self.use_dora:
            return base + lora
        if self.dropout_active and self.training:  # DoRA rescales W x_drop, as LoraLinear's DoRA
            base_drop = grouped_matmul(x_drop, weight, group_list)
        else:
            base_drop = base
        rows = F.cumsum(F.ones_like(F.cast(x[:, 0], mstype.int32)), 0) - 1
        row_scale = F.gather(scale, row_experts(group_list, rows), 0)  # [T, out]
        return base + (row_scale - 1) * base_drop + row_scale * lora

    def adapter_parameters(self):
        return [self.lora_A, self.lora_B] + ([self.lora_magnitude_vector] if self.use_dora else [])

    def name_parameters(self, prefix: str):
        """Name the adapter's own parameters ``<prefix>.<attribute>``."""
        for attr, param in self.parameters_and_names(expand=False):
            if param is not self.weight:
                param.name = f"{prefix}.{attr}"

    def adapter_arrays(self) -> Dict[str, np.ndarray]:
        """Adapter parameters as float64 numpy arrays by attribute name (leading dim E)."""
        return {p.name.rsplit(".", 1)[-1]: to_numpy(p) for p in self.adapter_parameters()}

    def weight_arrays(self) -> np.ndarray:
        """The base weight as float64 [E, out, in] (each expert in LoRA's [out, in] layout)."""
        return expert_weights_oi(to_numpy(self.weight), self.experts)

    def _adapted_norms(self) -> np.ndarray:
        """||W_e + s B_e A_e|| per output feature, float64 [E, out]."""
        weights = self.weight_arrays()
        arrays = {"lora_A": to_numpy(self.lora_A), "lora_B": to_numpy(self.lora_B)}
        return np.stack([np.linalg.norm(weights[e] + delta_weight_array(expert_slice(arrays, e), self.scaling),
                                        axis=1) for e in range(self.experts)])

    def merge(self):
        """Fold every expert's adapter into the base weight; forward then skips it."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        merged, self._merge_cache = fold_experts(self.weight_arrays(), self.adapter_arrays(), self.scaling,
                                                 self.variant)
        self._set_weight(merged)
        self.lora_active.set_data(Tensor(0.0, mstype.float32))
        self.merged = True

    def unmerge(self):
        """Undo :meth:`merge` (to float rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        arrays, weights = self.adapter_arrays(), self.weight_arrays()
        self._set_weight(np.stack([self.variant.unmerge(weights[e], delta_weight_array(expert_slice(arrays, e),
                                                                                       self.scaling),
                                                        expert_slice(arrays, e), self._merge_cache[e])
                                   for e in range(self.experts)]))
        self.lora_active.set_data(Tensor(1.0, mstype.float32))
        self.merged = False

    def _set_weight(self, weights_oi):
        data = expert_weights_stored(weights_oi)
        self.weight.set_data(Tensor(np.ascontiguousarray(data, dtype=np.float32), self.weight.dtype))


def expert_weights_oi(stored: np.ndarray, experts: int) -> np.ndarray:
    """FFNGroupedGEMM's [E*in, out] weight as [E, out, in]."""
    return stored.reshape(experts, -1, stored.shape[-1]).transpose(0, 2, 1)


def expert_weights_stored(weights_oi: np.ndarray) -> np.ndarray:
    """Inverse of :func:`expert_weights_oi`."""
    return weights_oi.transpose(0, 2, 1).reshape(-1, weights_oi.shape[1])


def expert_slice(arrays: Dict[str, np.ndarray], expert: int) -> Dict[str, np.ndarray]:
    """One expert's adapter arrays (A [r, in], B [out, r], m [out])."""
    return {name: value[expert] for name, value in arrays.items()}


def fold_experts(weights_oi: np.ndarray, arrays: Dict[str, np.ndarray], scaling: float, variant):
    """(merged [E, out, in], per-expert unmerge caches) with LoRA's / DoRA's merge per expert."""
    results = [variant.merge(weights_oi[e], delta_weight_array(expert_slice(arrays, e), scaling),
                             expert_slice(arrays, e)) for e in range(weights_oi.shape[0])]
    return np.stack([r[0] for r in results]), [r[1] for r in results]


def func_infer_shape(*args):
    """Morph's shape inference: the output is shaped like the tokens."""
    return args[0]


def func_infer_dtype(*args):
    """Morph's dtype inference: the output has the tokens' dtype."""
    return args[0]


class ExpertLoraLayer(nn.Cell):
    """``FFNGroupedGEMM`` with adapters on fc1 and/or fc2 of every routed expert.

    Keeps the base as child ``base_layer`` (its Parameters and token dispatcher unchanged) and,
    like it, runs dispatch -> fc1 (+ adapter) -> swiglu -> fc2 (+ adapter) -> combine inside one
    ``Morph``, whose layouts under semi-auto parallel are the base's plus the adapter operands
    split over experts like the expert weights (:meth:`shard`). ``projections`` maps
    ``linear_fc1`` / ``linear_fc2`` to their ``ExpertProjectionLora``.
    """

    def __init__(self, base, specs: Dict[str, LoraSpec], param_init_type=None, compute_dtype=None,
                 name: str = "experts"):
        super().__init__()
        if base.moe_token_dispatcher_type != "alltoall":
            raise NotImplementedError(f"adapters on MoE routed experts ({name}) need moe_token_dispatcher_type "
                                      f"'alltoall', not {base.moe_token_dispatcher_type!r}")
        self.insert_child_to_cell("base_layer", base)
        self.compute_dtype = to_mstype(compute_dtype) or base.compute_dtype
        param_dtype = to_mstype(param_init_type)
        experts, hidden, ffn = base.num_local_experts, base.hidden_size, base.moe_ffn_hidden_size
        dims = {"linear_fc1": (hidden, 2 * ffn), "linear_fc2": (ffn, hidden)}
        self.projections = {}
        for proj, spec in specs.items():
            cell = ExpertProjectionLora(getattr(base, EXPERT_PROJECTIONS[proj]), experts, *dims[proj], spec,
                                        param_dtype, self.compute_dtype, f"{name}.{proj}")
            self.insert_child_to_cell(proj, cell)
            self.projections[proj] = cell
        # constants in the graph: a projection's cell is only reached when it exists
        self.has_fc1, self.has_fc2 = "linear_fc1" in self.projections, "linear_fc2" in self.projections
        self.hidden_size, self.ffn_hidden_size, self.experts = hidden, ffn, experts
        # operands of a projection without adapter: never read, shaped like real ones for the layouts
        self.unused = (Tensor(np.zeros((experts, 1, 1)), self.compute_dtype),) * 2 \
            + (Tensor(np.ones((experts, 1)), self.compute_dtype),)
        self.cast = P.Cast()
        self.reshape = P.Reshape()
        self.morphed_forward = Morph(self.forward_func, func_infer_shape, func_infer_dtype).add_prim_attr(
            "self_define_shard", True)
        if _get_parallel_mode() in (ParallelMode.SEMI_AUTO_PARALLEL,):
            self.shard()

    def construct(self, tokens, probs, routing_map):
        base = self.base_layer
        dtype = tokens.dtype
        tokens = self.cast(tokens, self.compute_dtype)
        w1 = self.cast(base.weight1, self.compute_dtype)
        w2 = self.cast(base.weight2, self.compute_dtype)
        fc1 = self.linear_fc1.operands() if self.has_fc1 else self.unused
        fc2 = self.linear_fc2.operands() if self.has_fc2 else self.unused
        output = self.morphed_forward(tokens, probs, routing_map, w1, w2, fc1[0], fc1[1], fc1[2],
                                      fc2[0], fc2[1], fc2[2], base.num_tokens_per_expert)
        return self.cast(output, dtype)

    def forward_func(self, tokens, probs, routing_map, w1, w2, fc1_a, fc1_b, fc1_scale, fc2_a, fc2_b, fc2_scale,
                     num_tokens_per_expert=None):
        """The Morph's body, on this device's experts: FFNGroupedGEMM's plus the adapters."""
        w1 = self.reshape(w1, (-1, self.hidden_size, self.ffn_hidden_size * 2))
        w2 = self.reshape(w2, (-1, self.ffn_hidden_size, self.hidden_size))
        dispatcher = self.base_layer.token_dispatcher
        dispatched, group_list, ctx = dispatcher.token_permutation(tokens, probs, routing_map, num_tokens_per_expert)
        x = self.reshape(dispatched, (-1, self.hidden_size))
        if self.has_fc1:
            hidden = self.linear_fc1.apply(x, w1, group_list, fc1_a, fc1_b, fc1_scale)
        else:
            hidden = grouped_matmul(x, w1, group_list)
        hidden = swiglu(hidden)
        if self.has_fc2:
            out = self.linear_fc2.apply(hidden, w2, group_list, fc2_a, fc2_b, fc2_scale)
        else:
            out = grouped_matmul(hidden, w2, group_list)
        return dispatcher.token_unpermutation(out, ctx)

    def shard(self):
        """The base's Morph layouts (tokens split over data, expert weights over ``ep``) plus
        the adapter operands, split over experts like the expert weights: A^T, s B^T
        [E, ., .] and the DoRA scale [E, out] by ``ep`` on the expert dimension."""
        # pylint: disable=import-outside-toplevel
        from mindformers.parallel_core.training_graph.device_matrix import layout_moe
        experts = layout_moe("ep", "None", "None")
        tokens = layout_moe("dp_cp", "None", "None")
        self.morphed_forward.shard(
            in_strategy=(tokens, tokens, tokens,  # tokens [B, S, h], probs, routing_map [B, S, k]
                         layout_moe("ep", "None"), layout_moe("ep", "None"),  # w1, w2 [E*in, out]
                         experts, experts, layout_moe("ep", "None"),  # fc1: A^T, s B^T, scale
                         experts, experts, layout_moe("ep", "None"),  # fc2
                         layout_moe("None")),
            out_strategy=(tokens,))


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
