"""Test-side CPU stand-ins for MindFormers' mcore MoE (Qwen3-MoE, DeepSeek-V3) and MLA pieces.

Companion of ``tests/mcore_cpu.py`` (the dense stand-ins: RmsNorm, rotary ``Outer``,
FlashAttentionScore), whose ``install()`` ends by calling this module's ``install()``. Like that
module this is test code only; it never ships in the package.

MindFormers 1.9's mcore MoE training graph (``parallel_core/training_graph/transformer/moe``)
builds these ops, which have no CPU kernel in MindSpore 2.9: ``GroupedMatmul`` and ``Swiglu``
(``FFNGroupedGEMM.experts_forward``), ``SortExt``, ``IndexSelect``, ``FmodScalar``, ``CumsumExt``
and ``MoveTo`` (the ``alltoall`` token dispatcher, ``MoEAlltoAllTokenDispatcher``), ``TopkExt``
(``TopKRouter``). The dispatcher's ``AlltoAll``/``AlltoAllV`` need nothing: in STAND_ALONE mode
its expert-parallel group is None (``moe.utils.get_ep_group_name``) and MindFormers' own
``AlltoAll``/``AlltoAllV`` cells then return their input unchanged.

The stand-ins work at the OP level, so the code around each op (router, dispatcher permutation,
pad tokens, ``experts_forward``'s reshapes, the combine) stays MindFormers' own and a model runs
the same graph as on Ascend with those ops replaced. ``install()`` patches these qualified names
(``T`` = ``mindformers.parallel_core.training_graph.transformer``):

* ``T.moe.ffn.FFNGroupedGEMM.experts_forward`` becomes ``cpu_experts_forward``: the original's
  math (fc1 grouped matmul -> swiglu -> fc2 grouped matmul over the tokens sorted by expert)
  calling ``cpu_grouped_matmul`` and ``cpu_swiglu`` instead of
  ``GroupedMatmul(split_item=3, group_type=0)`` and ``Swiglu``. Why: neither has a CPU kernel;
  ``FFNGroupedGEMM.forward_func`` (its Morph) calls ``self.experts_forward``.
* ``T.moe.token_dispatcher.SortExt``, ``.IndexSelect``, ``.FmodScalar``, ``.CumsumExt`` become
  factories (same constructor call) of CPU functions with the primitives' call signature
  (``cpu_sort_ext``: ``ops.Sort``; ``cpu_index_select``: ``ops.gather``; ``cpu_fmod_scalar``:
  ``ops.floor_mod``; ``cpu_cumsum_ext``: ``ops.cumsum``). Why: these module-level names are what
  the dispatcher instantiates, in ``__init__`` (``self.sort``, ``self.cumsum``) and inline in
  graph code (``permute``, ``unpermute``, ``token_permutation``, ``token_unpermutation``), so
  inline ones cannot be cells; none has a CPU kernel.
* ``T.moe.token_dispatcher.MoETokenDispatcher.__init__`` is wrapped: afterwards ``self.d2h``
  (``ops.MoveTo``, no CPU kernel; it copies the AlltoAllV split sizes to the host) is
  ``cpu_move_to``, the identity.
* ``T.moe.router.TopkExt`` (the name ``TopKRouter.__init__`` instantiates: ``topk``, the
  expert-bias ``afb_topk``, the group-limited ``tc_topk``) becomes ``ops.TopK(sorted=True)``
  (CPU kernel and bprop; same ``(x, k)`` call over the last axis, largest first; int32 indices,
  which the router casts to int32 anyway).
* ``T.flash_attention.FlashAttention.__init__`` is wrapped for MLA only (query head dim
  qk_head_dim + qk_pos_emb_head_dim != v_head_dim, as in DeepSeek-V3): its ``flash_attention``
  primitive (``tests/mcore_cpu.py``'s stand-in once that is installed, which takes one head dim
  for q, k and v) becomes ``_PadValueHeadDim`` around it: value zero-padded to the query head dim,
  the output sliced back, which is exact: ``softmax(qk^T) [v | 0] = [softmax(qk^T) v | 0]``.

Every other op of MLA (``SplitWithSize``, ``Tile``, ``Concat``, ``ExpandDims``, the stride-2
``StridedSlice`` of its rotary de-interleave), of the router and of the dispatcher has a CPU kernel;
MLA's q/kv layernorms are ``FusedRMSNorm`` (``tests/mcore_cpu.py``).

* ``mindformers_lora_ext.tuners.experts.grouped_matmul`` / ``.swiglu``: our adapters on routed
  experts call the experts' ``GroupedMatmul`` and ``Swiglu`` through these; they become
  ``cpu_grouped_matmul`` / ``cpu_swiglu``.

``cpu_grouped_matmul`` and ``cpu_swiglu`` are public so tests can use them directly. Cells built after ``install()`` get the
stand-ins bound at construction (dispatcher ``sort``/``cumsum``/``d2h``, router top-k, MLA
attention); the patched ``experts_forward`` and the inline dispatcher names apply at graph
compile time.
"""
import functools

import mindspore as ms
from mindspore import ops

_STATE = {"installed": False, "originals": {}}


# ----------------------------------------------------------------------------------------------
# grouped matmul and swiglu


def cpu_grouped_matmul(x, w, group_list):
    """``GroupedMatmul(split_item=3, group_type=0)([x], [w], None, None, None, None, None,
    group_list)[0]`` with ops that have CPU kernels (graph mode, differentiable in x and w).

    x: [T, in] rows sorted by group; w: [E, in, out]; group_list: [E] int (MindFormers passes
    int64) CUMULATIVE row ends, as ``MoEAlltoAllTokenDispatcher.preprocess`` builds it
    (``cumsum(tokens per local expert)``): rows ``group_list[e-1] <= r < group_list[e]`` (from 0
    for e = 0) are multiplied by ``w[e]``. A group may be empty (equal consecutive ends). Rows
    at or past ``group_list[-1]`` get zeros (GroupedMatmul requires the last end to be T).

    Each expert's rows are masked out of x and all experts are multiplied at once
    (``BatchMatMul`` over [E, T, in] x [E, in, out]), then summed over E: every row gets exactly
    one nonzero term, so the result is exact; costs E times a dense matmul (tests only).
    """
    num_rows = x.shape[0]
    num_groups = w.shape[0]
    ends = ops.reshape(ops.cast(group_list, ms.int32), (num_groups, 1))
    starts = ops.concat((ops.zeros((1, 1), ms.int32), ends[:num_groups - 1]), 0)
    rows = ops.reshape(ops.arange(0, num_rows, 1, dtype=ms.int32), (1, num_rows))
    member = ops.logical_and(rows >= starts, rows < ends)  # [E, T]: row r belongs to group e
    member = ops.reshape(ops.cast(member, x.dtype), (num_groups, num_rows, 1))
    per_group = ops.BatchMatMul()(member * ops.reshape(x, (1, num_rows, -1)), w)  # [E, T, out]
    return ops.reduce_sum(per_group, 0)


def cpu_swiglu(x, dim=-1):
    """``Swiglu()(x, dim)``: ``silu(a) * b`` with a, b the first and second half of x along dim."""
    gate, up = ops.split(x, x.shape[dim] // 2, dim)
    return ops.mul(ops.silu(gate), up)


def cpu_experts_forward(self, permuted_local_hidden_states, tokens_per_expert, w1, w2):
    """``FFNGroupedGEMM.experts_forward`` (w1 [E, h, 2H], w2 [E, H, h]) with the CPU stand-ins."""
    permuted_local_hidden_states = permuted_local_hidden_states.reshape((-1, self.hidden_size))
    fc1_output = cpu_grouped_matmul(permuted_local_hidden_states, w1, tokens_per_expert)
    intermediate_parallel = cpu_swiglu(fc1_output, -1).reshape((-1, w2.shape[1]))
    return cpu_grouped_matmul(intermediate_parallel, w2, tokens_per_expert)


# ----------------------------------------------------------------------------------------------
# token dispatcher ops: factories with the primitives' constructor, returning CPU functions with
# their call signature (they are instantiated inline in graph code, so they cannot be cells)


def cpu_sort_ext(x, dim=-1, descending=False, stable=False):
    """``SortExt()(x, dim, descending, stable)`` -> (values, int64 indices). The CPU ``Sort``
    kernel keeps ties in input order (checked by the tests); the dispatcher does not depend on it:
    it inverts its own sort."""
    # pylint: disable=unused-argument
    values, indices = ops.Sort(axis=dim, descending=descending)(x)
    return values, ops.cast(indices, ms.int64)


def cpu_index_select(x, dim, index):
    """``IndexSelect()(x, dim, index)``: rows (along dim) of x at index."""
    return ops.gather(x, index, dim)


def cpu_fmod_scalar(x, other):
    """``FmodScalar()(x, other)`` for the dispatcher's non-negative indices (fmod == floor mod)."""
    return ops.floor_mod(x, other)


def cpu_cumsum_ext(x, dim, dtype=None):
    """``CumsumExt()(x, dim, dtype)``."""
    out = ops.cumsum(x, dim)
    if dtype is not None:
        out = ops.cast(out, dtype)
    return out


def cpu_move_to(x, to="CPU", blocking=True):
    """``ops.MoveTo()(x, to, blocking)``: on a CPU-only run the data is already on the host."""
    # pylint: disable=unused-argument
    return x


def _sort_ext():
    return cpu_sort_ext


def _index_select():
    return cpu_index_select


def _fmod_scalar():
    return cpu_fmod_scalar


def _cumsum_ext():
    return cpu_cumsum_ext


def _topk_ext():
    """Stands in for ``TopkExt()``: a ``TopK`` primitive (CPU kernel, bprop on CPU) with the same
    ``(x, k)`` call over the last axis, largest first; keeps ``recompute``/``shard``/``add_prim_attr``."""
    return ops.TopK(sorted=True)


# ----------------------------------------------------------------------------------------------
# MLA: value head dim != query head dim


class _PadValueHeadDim(ms.nn.Cell):
    """Wraps a FlashAttentionScore (or its CPU stand-in) for MLA in BNSD/BSND layout: value is
    zero-padded from v_head_dim to the query head dim, the output sliced back to v_head_dim."""

    def __init__(self, inner, layout):
        super().__init__()
        if layout not in ("BNSD", "BSND"):
            raise NotImplementedError(f"MLA value padding: input_layout {layout!r} (BNSD, BSND are supported)")
        self.inner = inner

    def shard(self, *args, **kwargs):  # pylint: disable=unused-argument
        return self

    def add_prim_attr(self, *args, **kwargs):  # pylint: disable=unused-argument
        return self

    def construct(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None,
                  attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None):
        v_dim = value.shape[-1]
        pad = ops.zeros(value.shape[:-1] + (query.shape[-1] - v_dim,), value.dtype)
        softmax_max, softmax_sum, softmax_out, out = self.inner(
            query, key, ops.concat((value, pad), -1), real_shift, drop_mask, padding_mask, attn_mask, prefix,
            actual_seq_qlen, actual_seq_kvlen)
        return softmax_max, softmax_sum, softmax_out, out[..., :v_dim]


# ----------------------------------------------------------------------------------------------
# install / uninstall


def _modules():
    # pylint: disable=import-outside-toplevel
    from mindformers.parallel_core.training_graph.transformer.moe import ffn, router, token_dispatcher
    from mindformers.parallel_core.training_graph.transformer import flash_attention
    return ffn, router, token_dispatcher, flash_attention


# our adapters on routed experts (mindformers_lora_ext/tuners/experts.py) call the experts'
# grouped matmul and activation through these two module-level functions
_OUR_EXPERT_OPS = {"grouped_matmul": cpu_grouped_matmul, "swiglu": cpu_swiglu}


def _our_experts():
    from mindformers_lora_ext.tuners import experts  # pylint: disable=import-outside-toplevel
    return experts


_DISPATCHER_NAMES = {"SortExt": _sort_ext, "IndexSelect": _index_select, "FmodScalar": _fmod_scalar,
                     "CumsumExt": _cumsum_ext}


def install():
    """Install the MoE/MLA CPU stand-ins in this process (idempotent); see the module docstring."""
    if _STATE["installed"]:
        return
    ffn, router, token_dispatcher, flash_attention = _modules()
    originals = _STATE["originals"]
    originals["experts_forward"] = ffn.FFNGroupedGEMM.experts_forward
    originals["dispatcher_init"] = token_dispatcher.MoETokenDispatcher.__init__
    originals["TopkExt"] = router.TopkExt
    originals["flash_attention_init"] = flash_attention.FlashAttention.__init__
    for name, factory in _DISPATCHER_NAMES.items():
        originals[name] = getattr(token_dispatcher, name)
        setattr(token_dispatcher, name, factory)

    ffn.FFNGroupedGEMM.experts_forward = cpu_experts_forward
    experts = _our_experts()
    for name, stand_in in _OUR_EXPERT_OPS.items():
        originals[f"experts.{name}"] = getattr(experts, name)
        setattr(experts, name, stand_in)

    dispatcher_init = originals["dispatcher_init"]

    @functools.wraps(dispatcher_init)
    def init_dispatcher(self, *args, **kwargs):
        dispatcher_init(self, *args, **kwargs)
        self.d2h = cpu_move_to

    token_dispatcher.MoETokenDispatcher.__init__ = init_dispatcher
    router.TopkExt = _topk_ext

    fa_init = originals["flash_attention_init"]

    @functools.wraps(fa_init)
    def init_flash_attention(self, config, *args, **kwargs):
        fa_init(self, config, *args, **kwargs)
        if getattr(config, "multi_latent_attention", False) and \
                config.v_head_dim != config.qk_head_dim + config.qk_pos_emb_head_dim:
            inner = self.flash_attention
            self.__dict__.get("_primitives", {}).pop("flash_attention", None)
            self.__dict__.pop("flash_attention", None)
            self.flash_attention = _PadValueHeadDim(inner, self.input_layout)

    flash_attention.FlashAttention.__init__ = init_flash_attention
    _STATE["installed"] = True


def uninstall():
    """Undo ``install()`` (cells built meanwhile keep what they bound at construction)."""
    if not _STATE["installed"]:
        return
    ffn, router, token_dispatcher, flash_attention = _modules()
    originals = _STATE["originals"]
    ffn.FFNGroupedGEMM.experts_forward = originals.pop("experts_forward")
    experts = _our_experts()
    for name in _OUR_EXPERT_OPS:
        setattr(experts, name, originals.pop(f"experts.{name}"))
    token_dispatcher.MoETokenDispatcher.__init__ = originals.pop("dispatcher_init")
    router.TopkExt = originals.pop("TopkExt")
    flash_attention.FlashAttention.__init__ = originals.pop("flash_attention_init")
    for name in _DISPATCHER_NAMES:
        setattr(token_dispatcher, name, originals.pop(name))
    _STATE["installed"] = False


def is_installed():
    return _STATE["installed"]
