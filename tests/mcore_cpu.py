"""Test-side CPU stand-ins so MindFormers' mcore (``use_legacy: False``) models run on CPU.

MindFormers 1.9's mcore training graph (``parallel_core/training_graph``, e.g. Qwen3) builds
three primitives that have no CPU kernel in MindSpore 2.9:

* ``FusedRMSNorm`` calls ``mindspore.ops.operations.RmsNorm`` (Qwen3's layer spec always uses the
  fused norm: the input/pre-MLP/final norms and the q/k layernorms);
* ``RotaryEmbedding`` (and ``YarnRotaryEmbedding``, its subclass) calls ``Outer``;
* ``FlashAttention`` (the core attention mcore ``SelfAttention`` always builds) calls
  ``FlashAttentionScore``. Its ``use_flash_attention: False`` branch is no way out: it applies
  ``_repeat_kv`` to an [S, B, N, D] tensor as if it were [B, N, S, D], wrong under GQA.

``install()`` swaps each primitive, and only the primitive, for a cell of the same signature and
math built from ops that have CPU kernels, at the point where MindFormers creates it. Everything
around the primitive (casts, layouts, masks, GQA head split, the fp16 cast before flash attention)
stays MindFormers' own code, so a model runs the same graph as on Ascend with three primitives
replaced. Works in graph mode (also under ``MS_DEV_JIT_SYNTAX_LEVEL=0``, which MindFormers sets
for mcore training). Only cells built after ``install()`` get the stand-ins.

This is test code: it never ships in the package. ``tests/test_mcore_cpu.py`` checks every
stand-in against numpy and a whole tiny Qwen3 against a numpy forward.
"""
import functools
import importlib

import mindspore as ms
from mindspore import nn, ops

_FLOAT32_MIN = -3.4028234663852886e38  # the fill of masked attention scores
_STATE = {"installed": False, "originals": {}}


class CpuRmsNorm(nn.Cell):
    """Stands in for ``mindspore.ops.operations.RmsNorm(epsilon)`` (no CPU kernel), the primitive
    of ``mindformers.parallel_core.training_graph.transformer.norm.FusedRMSNorm``.

    Same signature and outputs: ``(x, gamma) -> (y, rstd)`` with
    ``rstd = 1 / sqrt(mean(x**2 over gamma's trailing dims) + epsilon)`` (float32, keepdims) and
    ``y = x * rstd * gamma`` in x's dtype; computed in float32 as the Ascend kernel does.
    """

    def __init__(self, epsilon=1e-6):
        super().__init__()
        self.epsilon = float(epsilon)

    def construct(self, x, gamma):
        axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
        x32 = ops.cast(x, ms.float32)
        rstd = ops.rsqrt(ops.mean(ops.square(x32), axes, keep_dims=True) + self.epsilon)
        y = ops.mul(ops.mul(x32, rstd), ops.cast(gamma, ms.float32))
        return ops.cast(y, x.dtype), rstd

    def shard(self, *args, **kwargs):  # pylint: disable=unused-argument
        """Sharding strategies do not apply on a single CPU device."""
        return self


class CpuOuter(nn.Cell):
    """Stands in for ``mindspore.ops.auto_generate.Outer`` (no CPU kernel), which MindFormers'
    mcore ``RotaryEmbedding`` uses to build its frequencies: ``outer(seq, inv_freq)``.

    ``(input, vec2) -> input[:, None] * vec2[None, :]``, as ``Outer`` computes it.
    """

    def construct(self, x, vec2):
        return ops.mul(ops.reshape(x, (-1, 1)), ops.reshape(vec2, (1, -1)))

    def shard(self, *args, **kwargs):  # pylint: disable=unused-argument
        """Sharding strategies do not apply on a single CPU device."""
        return self


class CpuFlashAttentionScore(nn.Cell):
    """Stands in for ``mindspore.ops.operations.nn_ops.FlashAttentionScore`` (no CPU kernel), the
    primitive of ``mindformers.parallel_core.training_graph.transformer.flash_attention.FlashAttention``.

    Same constructor arguments and call signature, ``(query, key, value, real_shift, drop_mask,
    padding_mask, attn_mask, prefix, actual_seq_qlen, actual_seq_kvlen) -> (softmax_max,
    softmax_sum, softmax_out, attention_out)``, computing plain scaled dot-product attention:
    ``softmax(scale_value * q k^T, masked) v`` in float32, the output cast back to the query dtype.

    * ``input_layout`` BNSD (what mcore ``SelfAttention`` uses without context parallel), BSND,
      BSH or SBH; head size = query hidden / ``head_num``.
    * GQA/MQA: key/value may carry fewer heads N_kv (N % N_kv == 0); query head h reads kv head
      h // (N / N_kv), FlashAttentionScore's grouping and the order mcore's fused ``linear_qkv``
      split produces.
    * masks (``attn_mask``: 1/True = discarded, broadcast over [B, N, S1, S2]):
      sparse_mode 0 applies ``attn_mask`` and, when one is given, the pre_tokens/next_tokens band
      (key j is kept for query i when i - pre_tokens <= j <= i + next_tokens; mcore passes
      pre_tokens=2**31-1, next_tokens=0: causal); without a mask nothing is masked.
      1: ``attn_mask`` only. 2: causal from the top-left corner, 3: from the bottom-right corner
      (the compressed 2048x2048 ``attn_mask`` of those modes is not read).
      Masked scores are filled with the float32 minimum: a row with every key masked (never made by
      MindFormers' causal mask unless a row's own token and all before it are pads) averages the
      values uniformly; this is not claimed to match the Ascend kernel.
    * ``softmax_max`` / ``softmax_sum`` ([B, N, S1, 8], float32, the kernel's shapes) carry each
      row's max masked scaled score and its sum of exp(score - max) (MindFormers reads softmax_max
      only with ``track_max_attention_logit``); ``softmax_out`` (unused) is a zero scalar.

    Not supported (raises): keep_prob < 1 (attention dropout), TND layout / actual_seq_qlen,
    real_shift (ALiBi), prefix, sparse_mode >= 4 (band, prefix, sliding windows).
    """

    def __init__(self, head_num, keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647,
                 next_tokens=2147483647, inner_precise=0, input_layout="BSH", sparse_mode=0):
        super().__init__()
        if keep_prob != 1.0:
            raise NotImplementedError(f"CpuFlashAttentionScore: keep_prob {keep_prob} (attention dropout) "
                                      "is not supported; set attention_dropout: 0.0")
        if input_layout not in ("BNSD", "BSND", "BSH", "SBH"):
            raise NotImplementedError(f"CpuFlashAttentionScore: input_layout {input_layout!r} is not supported "
                                      "(BNSD, BSND, BSH, SBH are)")
        if sparse_mode not in (0, 1, 2, 3):
            raise NotImplementedError(f"CpuFlashAttentionScore: sparse_mode {sparse_mode} is not supported "
                                      "(0, 1, 2, 3 are)")
        self.head_num = int(head_num)
        self.scale_value = float(scale_value)
        self.pre_tokens = int(pre_tokens)
        self.next_tokens = int(next_tokens)
        self.inner_precise = inner_precise  # a kernel tuning knob: no effect on the math
        self.input_layout = input_layout
        self.sparse_mode = int(sparse_mode)
        self.prim_attrs = {}
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.pv_matmul = ops.BatchMatMul()

    def add_prim_attr(self, name, value):
        """Kept for the primitive's interface; the attributes do not change the math."""
        self.prim_attrs[name] = value
        return self

    def shard(self, *args, **kwargs):  # pylint: disable=unused-argument
        """Sharding strategies do not apply on a single CPU device."""
        return self

    def _to_bnsd(self, x, head_dim):
        """query/key/value in ``input_layout`` -> [B, N, S, D]."""
        if self.input_layout == "BNSD":
            return x
        if self.input_layout == "BSND":
            return ops.transpose(x, (0, 2, 1, 3))
        if self.input_layout == "BSH":
            b, s, h = x.shape
            return ops.transpose(ops.reshape(x, (b, s, h // head_dim, head_dim)), (0, 2, 1, 3))
        s, b, h = x.shape  # SBH
        return ops.transpose(ops.reshape(x, (s, b, h // head_dim, head_dim)), (1, 2, 0, 3))

    def _from_bnsd(self, x):
        """[B, N, S, D] -> ``input_layout``."""
        if self.input_layout == "BNSD":
            return x
        if self.input_layout == "BSND":
            return ops.transpose(x, (0, 2, 1, 3))
        b, n, s, d = x.shape
        if self.input_layout == "BSH":
            return ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (b, s, n * d))
        return ops.reshape(ops.transpose(x, (2, 0, 1, 3)), (s, b, n * d))  # SBH

    def _positional_mask(self, s1, s2, lowest, highest):
        """[S1, S2] bool, True where key j lies outside [i + lowest, i + highest] for query i."""
        offset = ops.reshape(ops.arange(0, s2, 1, dtype=ms.int32), (1, s2)) - \
            ops.reshape(ops.arange(0, s1, 1, dtype=ms.int32), (s1, 1))
        return ops.logical_or(offset > highest, offset < lowest)

    def construct(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None,
                  attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None):
        # pylint: disable=unused-argument
        if real_shift is not None:
            raise NotImplementedError("CpuFlashAttentionScore: real_shift (ALiBi) is not supported")
        if prefix is not None or actual_seq_qlen is not None or actual_seq_kvlen is not None:
            raise NotImplementedError("CpuFlashAttentionScore: prefix / actual_seq_*len are not supported")
        if self.input_layout in ("BSH", "SBH"):
            head_dim = query.shape[-1] // self.head_num
        else:
            head_dim = query.shape[-1]
        q = ops.cast(self._to_bnsd(query, head_dim), ms.float32)
        k = ops.cast(self._to_bnsd(key, head_dim), ms.float32)
        v = ops.cast(self._to_bnsd(value, head_dim), ms.float32)
        b, n, s1, d = q.shape
        n_kv = k.shape[1]
        s2 = k.shape[2]
        rep = n // n_kv

        # query heads of one kv group are consecutive: [B, N_kv, rep * S1, D] against [B, N_kv, S2, D]
        scores = self.qk_matmul(ops.reshape(q, (b, n_kv, rep * s1, d)), k)
        scores = ops.reshape(scores, (b, n, s1, s2)) * self.scale_value

        masked = None
        if self.sparse_mode == 2:
            masked = self._positional_mask(s1, s2, -(s1 + s2), 0)
        elif self.sparse_mode == 3:
            masked = self._positional_mask(s1, s2, -(s1 + s2), s2 - s1)
        elif attn_mask is not None:
            masked = ops.cast(attn_mask, ms.bool_)
            if self.sparse_mode == 0:
                lowest = -min(self.pre_tokens, s1 + s2)
                highest = min(self.next_tokens, s1 + s2)
                masked = ops.logical_or(masked, self._positional_mask(s1, s2, lowest, highest))
        if masked is not None:
            masked = ops.broadcast_to(masked, (b, n, s1, s2))
            scores = ops.masked_fill(scores, masked, ms.Tensor(_FLOAT32_MIN, ms.float32))

        row_max = ops.stop_gradient(ops.amax(scores, -1, True))  # softmax is shift-invariant
        exp_scores = ops.exp(scores - row_max)
        row_sum = ops.sum(exp_scores, -1, keepdim=True)
        probs = exp_scores / row_sum
        out = self.pv_matmul(ops.reshape(probs, (b, n_kv, rep * s1, s2)), v)
        out = ops.cast(ops.reshape(out, (b, n, s1, d)), query.dtype)

        softmax_max = ops.broadcast_to(row_max, (b, n, s1, 8))
        softmax_sum = ops.broadcast_to(row_sum, (b, n, s1, 8))
        softmax_out = ops.zeros((), query.dtype)
        return softmax_max, softmax_sum, softmax_out, self._from_bnsd(out)


def _swap_primitive(cell, name, stand_in):
    """Replace the primitive attribute ``name`` of ``cell`` by the cell ``stand_in``."""
    cell.__dict__.get("_primitives", {}).pop(name, None)
    cell.__dict__.pop(name, None)
    setattr(cell, name, stand_in)


def _modules():
    # pylint: disable=import-outside-toplevel
    from mindformers.parallel_core.training_graph.transformer import norm, flash_attention
    from mindformers.parallel_core.training_graph.base_models.common.embeddings import rotary_pos_embedding
    return norm, flash_attention, rotary_pos_embedding


def install():
    """Install the CPU stand-ins in this process (idempotent); then the MoE ones, if present.

    * ``norm.FusedRMSNorm.__init__`` is wrapped: after MindFormers' own ``__init__`` its
      ``self.norm`` (``P.RmsNorm(eps)``) becomes ``CpuRmsNorm(eps)``.
    * ``rotary_pos_embedding.Outer`` (the name ``RotaryEmbedding.__init__`` instantiates; Yarn
      inherits it) becomes ``CpuOuter``.
    * ``flash_attention.FlashAttentionScore`` (the name ``FlashAttention.__init__`` instantiates)
      becomes ``CpuFlashAttentionScore``.
    """
    if not _STATE["installed"]:
        norm, flash_attention, rotary_pos_embedding = _modules()
        originals = _STATE["originals"]
        originals["FusedRMSNorm.__init__"] = norm.FusedRMSNorm.__init__
        originals["Outer"] = rotary_pos_embedding.Outer
        originals["FlashAttentionScore"] = flash_attention.FlashAttentionScore
        fused_init = originals["FusedRMSNorm.__init__"]

        @functools.wraps(fused_init)
        def fused_rms_norm_init(self, *args, **kwargs):
            fused_init(self, *args, **kwargs)
            _swap_primitive(self, "norm", CpuRmsNorm(self.eps))

        norm.FusedRMSNorm.__init__ = fused_rms_norm_init
        rotary_pos_embedding.Outer = CpuOuter
        flash_attention.FlashAttentionScore = CpuFlashAttentionScore
        _STATE["installed"] = True
    # MOE_INSTALL_HOOK: the MoE ops' stand-ins live in a sibling module written separately;
    # its install() must be idempotent too.
    moe = _moe_module()
    if moe is not None:
        moe.install()


def uninstall():
    """Undo ``install()`` for cells built from now on (built cells keep their stand-ins)."""
    if _STATE["installed"]:
        norm, flash_attention, rotary_pos_embedding = _modules()
        originals = _STATE["originals"]
        norm.FusedRMSNorm.__init__ = originals.pop("FusedRMSNorm.__init__")
        rotary_pos_embedding.Outer = originals.pop("Outer")
        flash_attention.FlashAttentionScore = originals.pop("FlashAttentionScore")
        _STATE["installed"] = False
    moe = _moe_module()
    if moe is not None and hasattr(moe, "uninstall"):
        moe.uninstall()


def is_installed():
    return _STATE["installed"]


def _moe_module():
    """The sibling ``mcore_cpu_moe`` module, or None when it does not exist."""
    package = __name__.rpartition(".")[0]
    name = f"{package}.mcore_cpu_moe" if package else "mcore_cpu_moe"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if err.name != name:  # the module exists but one of its own imports failed: say so
            raise
        return None
