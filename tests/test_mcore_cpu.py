"""The test-side CPU stand-ins of tests/mcore_cpu.py, checked against numpy.

(a) each stand-in (and the MindFormers cell that holds it) against an independent numpy
reference; (b) a whole tiny mcore Qwen3 built from configs/tiny/qwen3_lora_ext.yaml against a
numpy forward using the model's own weights. tests/test_mcore_e2e.py trains that Qwen3 with
every pet type through run_mindformer.py --cpu_standins.
"""
import math
import os
import sys
import types

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from conftest import ROOT, float32_attention
import mcore_cpu

QWEN3_CONFIG = os.path.join(ROOT, "configs", "tiny", "qwen3_lora_ext.yaml")


@pytest.fixture(scope="module", autouse=True)
def standins():
    was_installed = mcore_cpu.is_installed()
    mcore_cpu.install()
    yield
    if not was_installed:
        mcore_cpu.uninstall()


def _tconfig(**kw):
    """A TransformerConfig for standalone mcore cells (and the layout they shard with, as
    GPTModel initialises it: dp = cp = tp = 1)."""
    from mindformers.parallel_core.transformer_config import TransformerConfig
    from mindformers.parallel_core.training_graph.device_matrix import layout
    args = dict(num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype="float32",
                compute_dtype="float32", seq_length=8, attention_dropout=0.0)
    args.update(kw)
    config = TransformerConfig(**args)
    layout.init_layout(config)
    return config


# ---------------------------------------------------------------- numpy references

def np_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_attention(q, k, v, masked, scale):
    """q [B, N, S1, D], k/v [B, Nkv, S2, D], masked broadcastable to [B, N, S1, S2] (True = drop).
    Query head h reads kv head h // (N / Nkv). Float64, one head at a time."""
    b, n, s1, _ = q.shape
    n_kv = k.shape[1]
    masked = np.broadcast_to(masked, (b, n, s1, k.shape[2]))
    out = np.zeros(q.shape, np.float64)
    for h in range(n):
        g = h // (n // n_kv)
        scores = np.einsum("bsd,btd->bst", q[:, h].astype(np.float64), k[:, g].astype(np.float64)) * scale
        scores = np.where(masked[:, h], -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, h] = np.einsum("bst,btd->bsd", probs, v[:, g].astype(np.float64))
    return out


def causal_pad_mask(ids, pad_id=0):
    """MindFormers' mask: key j dropped for query i when j > i or ids[b, j] is the pad; [B, 1, S, S]."""
    s = ids.shape[1]
    future = np.triu(np.ones((s, s), bool), k=1)
    return (future[None] | (ids == pad_id)[:, None, :])[:, None]


# ---------------------------------------------------------------- (a) each stand-in

def test_install_is_idempotent_and_swaps_only_the_primitives():
    from mindformers.parallel_core.training_graph.transformer import norm, flash_attention
    from mindformers.parallel_core.training_graph.base_models.common.embeddings import rotary_pos_embedding
    wrapped = norm.FusedRMSNorm.__init__
    mcore_cpu.install()
    assert norm.FusedRMSNorm.__init__ is wrapped  # not wrapped twice
    assert flash_attention.FlashAttentionScore is mcore_cpu.CpuFlashAttentionScore
    assert rotary_pos_embedding.Outer is mcore_cpu.CpuOuter
    cell = norm.FusedRMSNorm(_tconfig(), dim=16, eps=1e-5)
    assert isinstance(cell.norm, mcore_cpu.CpuRmsNorm) and cell.norm.epsilon == 1e-5
    assert "norm" not in cell._primitives  # pylint: disable=protected-access
    assert [name for name, _ in cell.parameters_and_names()] == ["weight"]  # names unchanged


def test_moe_install_hook_calls_the_sibling_module(monkeypatch):
    calls = []
    fake = types.ModuleType("mcore_cpu_moe")
    fake.install = lambda: calls.append("install")
    monkeypatch.setitem(sys.modules, "mcore_cpu_moe", fake)
    mcore_cpu.install()
    assert calls == ["install"]


@pytest.mark.parametrize("shape", [(5, 2, 64), (5, 2, 3, 16)])
def test_fused_rms_norm_matches_numpy(shape):
    from mindformers.parallel_core.training_graph.transformer.norm import FusedRMSNorm
    rng = np.random.default_rng(1)
    dim = shape[-1]
    cell = FusedRMSNorm(_tconfig(), dim=dim, eps=1e-6)
    w = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    cell.weight.set_data(Tensor(w))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    out = cell(Tensor(x)).asnumpy()
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, np_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_fused_rms_norm_gradients_match_numpy():
    from mindformers.parallel_core.training_graph.transformer.norm import FusedRMSNorm
    rng = np.random.default_rng(10)
    cell = FusedRMSNorm(_tconfig(), dim=16, eps=1e-6)
    g = rng.uniform(0.5, 1.5, 16)
    cell.weight.set_data(Tensor(g.astype(np.float32)))
    x = rng.standard_normal((3, 2, 4, 16))
    dy = rng.standard_normal(x.shape)
    dy_t = Tensor(dy.astype(np.float32))

    def loss(inp):
        return (cell(inp) * dy_t).sum()

    dx, (dg,) = ms.grad(loss, grad_position=0, weights=[cell.weight])(Tensor(x.astype(np.float32)))
    r = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    expected_dx = g * dy * r - x * r ** 3 * np.mean(g * dy * x, -1, keepdims=True)
    np.testing.assert_allclose(dx.asnumpy(), expected_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dg.asnumpy(), (dy * x * r).reshape(-1, 16).sum(0), rtol=1e-5, atol=1e-5)


def test_rms_norm_stand_in_returns_rstd_and_keeps_dtype():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 8)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    y, rstd = mcore_cpu.CpuRmsNorm(1e-3)(Tensor(x).astype(ms.float16), Tensor(gamma))
    x16 = x.astype(np.float16).astype(np.float64)
    assert y.dtype == ms.float16 and rstd.dtype == ms.float32 and rstd.shape == (3, 4, 1)
    np.testing.assert_allclose(rstd.asnumpy(), 1 / np.sqrt(np.mean(x16 ** 2, -1, keepdims=True) + 1e-3),
                               rtol=1e-5)
    np.testing.assert_allclose(y.asnumpy().astype(np.float64), np_rms_norm(x16, gamma, 1e-3), rtol=2e-3, atol=2e-3)


def test_rotary_embedding_frequencies_match_numpy():
    from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import \
        RotaryEmbedding
    rope = RotaryEmbedding(kv_channels=16, rotary_base=10000)
    assert isinstance(rope.outer, mcore_cpu.CpuOuter)
    emb, mscale = rope(12)
    inv_freq = 1.0 / (10000 ** (np.arange(0, 16, 2, dtype=np.float64) / 16))
    freqs = np.outer(np.arange(12), inv_freq)
    expected = np.concatenate([freqs, freqs], -1)[:, None, None, :]  # [S, 1, 1, D]: rotate-half layout
    assert mscale == 1.0
    np.testing.assert_allclose(emb.asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_outer_stand_in_matches_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(7).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    np.testing.assert_allclose(mcore_cpu.CpuOuter()(Tensor(a), Tensor(b)).asnumpy(), np.outer(a, b), rtol=1e-6)


B, S, N, NKV, D = 2, 8, 4, 2, 16


def _qkv(rng, s1=S, s2=S):
    q = rng.standard_normal((B, N, s1, D)).astype(np.float32)
    k = rng.standard_normal((B, NKV, s2, D)).astype(np.float32)
    v = rng.standard_normal((B, NKV, s2, D)).astype(np.float32)
    return q, k, v


def _ids_with_pads(rng):
    ids = rng.integers(3, 100, (B, S))
    ids[0, 3] = 0  # a pad key in the middle of row 0
    ids[1, 5:] = 0  # right padding of row 1
    return ids


def test_mcore_flash_attention_cell_matches_numpy_gqa_causal_pad():
    """MindFormers' FlashAttention cell as mcore SelfAttention calls it: q [S, B, N, D], k/v
    [S, B, Nkv, D] (GQA), MindFormers' causal+pad mask [B, 1, S, S] uint8; output [S, B, N*D]."""
    from mindformers.parallel_core.training_graph.transformer.flash_attention import FlashAttention
    from mindformers.parallel_core.training_graph.transformer.mask_generate import CausalMaskGenerate
    cfg = _tconfig(num_query_groups=NKV, seq_length=S)
    assert (cfg.input_layout, cfg.sparse_mode) == ("BNSD", 0)
    fa = FlashAttention(cfg, layer_number=1)
    assert isinstance(fa.flash_attention, mcore_cpu.CpuFlashAttentionScore)
    assert (fa.flash_attention.pre_tokens, fa.flash_attention.next_tokens) == (2147483647, 0)
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng)
    ids = _ids_with_pads(rng)
    mask = CausalMaskGenerate(seq_length=S, compute_type=ms.float32, use_flash_attention=True,
                              config=cfg)(Tensor(ids.astype(np.int32)))
    np.testing.assert_array_equal(mask.asnumpy(), causal_pad_mask(ids).astype(np.uint8))  # its mask is ours
    sbnd = lambda x: Tensor(x.transpose(2, 0, 1, 3))  # noqa: E731  [B, N, S, D] -> [S, B, N, D]
    out = fa(sbnd(q), sbnd(k), sbnd(v), mask).asnumpy()
    expected = np_attention(q, k, v, causal_pad_mask(ids), 1 / math.sqrt(D))
    assert out.shape == (S, B, N * D)
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1, 3).reshape(S, B, N * D), rtol=1e-5, atol=1e-5)


def np_attention_grads(q, k, v, masked, scale, dout):
    """d(sum(out * dout)) / d(q, k, v) of np_attention, by the softmax backward, float64."""
    b, n, s1, _ = q.shape
    rep = n // k.shape[1]
    masked = np.broadcast_to(masked, (b, n, s1, k.shape[2]))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for h in range(n):
        g = h // rep
        scores = np.where(masked[:, h], -np.inf, np.einsum("bsd,btd->bst", q[:, h], k[:, g]) * scale)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        dprobs = np.einsum("bsd,btd->bst", dout[:, h], v[:, g])
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)) * scale
        dq[:, h] = np.einsum("bst,btd->bsd", dscores, k[:, g])
        dk[:, g] += np.einsum("bst,bsd->btd", dscores, q[:, h])
        dv[:, g] += np.einsum("bst,bsd->btd", probs, dout[:, h])
    return dq, dk, dv


def test_mcore_flash_attention_cell_gradients_match_numpy():
    """Training differentiates through the stand-in: dq, dk, dv (GQA: kv gradients summed over
    the query heads of their group) under MindFormers' causal+pad mask."""
    from mindformers.parallel_core.training_graph.transformer.flash_attention import FlashAttention
    fa = FlashAttention(_tconfig(num_query_groups=NKV, seq_length=S), layer_number=1)
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng)
    ids = _ids_with_pads(rng)
    dout = rng.standard_normal((B, N, S, D)).astype(np.float32)
    sbnd = lambda x: Tensor(np.ascontiguousarray(x.transpose(2, 0, 1, 3)))  # noqa: E731
    mask = Tensor(causal_pad_mask(ids).astype(np.uint8))
    weight = Tensor(dout.transpose(2, 0, 1, 3).reshape(S, B, N * D))

    def loss(query, key, value):
        return (fa(query, key, value, mask) * weight).sum()

    grads = ms.grad(loss, grad_position=(0, 1, 2))(sbnd(q), sbnd(k), sbnd(v))
    expected = np_attention_grads(*(x.astype(np.float64) for x in (q, k, v)), causal_pad_mask(ids),
                                  1 / math.sqrt(D), dout.astype(np.float64))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.asnumpy(), want.transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)


def _to_layout(x, layout):
    """[B, N, S, D] numpy -> layout."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return x.transpose(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "SBH"])
def test_flash_attention_stand_in_layouts_with_pad_mask_and_causal_band(layout):
    """sparse_mode 0: a pad-only attn_mask plus next_tokens=0 gives causal+pad."""
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng)
    ids = _ids_with_pads(rng)
    pad_only = np.broadcast_to((ids == 0)[:, None, None, :], (B, 1, S, S)).astype(np.uint8)
    fa = mcore_cpu.CpuFlashAttentionScore(head_num=N, scale_value=0.3, next_tokens=0, input_layout=layout)
    smax, ssum, _, out = fa(*(Tensor(_to_layout(x, layout)) for x in (q, k, v)), None, None, None, Tensor(pad_only))
    expected = np_attention(q, k, v, causal_pad_mask(ids), 0.3)
    np.testing.assert_allclose(out.asnumpy(), _to_layout(expected, layout), rtol=1e-5, atol=1e-5)
    # softmax_max / softmax_sum: each row's max masked scaled score and sum of exp(score - max)
    scores = np.einsum("bnsd,bntd->bnst", q, np.repeat(k, N // NKV, axis=1)).astype(np.float64) * 0.3
    scores = np.where(causal_pad_mask(ids), -np.inf, scores)
    row_max = scores.max(-1)
    np.testing.assert_allclose(smax.asnumpy(), np.repeat(row_max[..., None], 8, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ssum.asnumpy()[..., 0], np.exp(scores - row_max[..., None]).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("mode", ["no_mask", "all_mask", "left_up_causal", "right_down_causal", "band"])
def test_flash_attention_stand_in_sparse_modes(mode):
    rng = np.random.default_rng(6)
    s1, s2 = {"right_down_causal": (S - 3, S), "left_up_causal": (S, S - 3)}.get(mode, (S, S))
    q, k, v = _qkv(rng, s1, s2)
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    random_mask = rng.random((B, 1, s1, s2)) < 0.3
    random_mask[..., 0] = False  # every row keeps a key
    kwargs, attn_mask = {}, None
    if mode == "no_mask":  # mode 0 without attn_mask: pre/next tokens are ignored
        kwargs, masked = dict(next_tokens=0), np.zeros((s1, s2), bool)
    elif mode == "all_mask":  # mode 1: attn_mask only, pre/next tokens ignored
        kwargs, attn_mask, masked = dict(sparse_mode=1, next_tokens=0), random_mask, random_mask
    elif mode == "left_up_causal":  # the compressed mask of mode 2 is not read
        kwargs, attn_mask, masked = dict(sparse_mode=2), np.zeros((64, 64), bool), j > i
    elif mode == "right_down_causal":
        kwargs, masked = dict(sparse_mode=3), j > i + (s2 - s1)
    else:  # mode 0 with a mask and a pre/next band
        kwargs, attn_mask, masked = dict(pre_tokens=2, next_tokens=1), random_mask, random_mask | (j > i + 1) | (j < i - 2)
    fa = mcore_cpu.CpuFlashAttentionScore(head_num=N, scale_value=0.25, input_layout="BNSD", **kwargs)
    mask_arg = None if attn_mask is None else Tensor(attn_mask.astype(np.uint8))
    out = fa(Tensor(q), Tensor(k), Tensor(v), None, None, None, mask_arg)[3].asnumpy()
    np.testing.assert_allclose(out, np_attention(q, k, v, masked, 0.25), rtol=1e-5, atol=1e-5)


def test_flash_attention_stand_in_fp16_in_fp16_out():
    """mcore Attention casts q/k/v to float16 before flash attention: the stand-in computes in
    float32 and returns the query dtype, as the kernel does."""
    rng = np.random.default_rng(7)
    q, k, v = (x.astype(np.float16) for x in _qkv(rng))
    fa = mcore_cpu.CpuFlashAttentionScore(head_num=N, scale_value=0.25, next_tokens=0, input_layout="BNSD")
    out = fa(Tensor(q), Tensor(k), Tensor(v), None, None, None, Tensor(np.zeros((S, S), np.uint8)))[3]
    assert out.dtype == ms.float16
    expected = np_attention(q, k, v, np.triu(np.ones((S, S), bool), 1), 0.25)
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kwargs, match", [(dict(keep_prob=0.9), "keep_prob"), (dict(input_layout="TND"), "TND"),
                                           (dict(sparse_mode=4), "sparse_mode 4")])
def test_flash_attention_stand_in_refuses_what_it_does_not_compute(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        mcore_cpu.CpuFlashAttentionScore(head_num=N, **{"input_layout": "BNSD", **kwargs})


# ---------------------------------------------------------------- (b) a whole tiny Qwen3

def _tiny_qwen3():
    """The tiny Qwen3 of configs/tiny/qwen3_lora_ext.yaml without its adapter, as
    Qwen3ForCausalLM builds it in graph mode (TrainingQwen3ForCausalLM)."""
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
    from mindformers.tools.register import MindFormerConfig
    model_config = MindFormerConfig(QWEN3_CONFIG).model.model_config.to_dict()
    for key in ("pet_config", "architectures"):
        model_config.pop(key)
    return TrainingQwen3ForCausalLM(Qwen3Config(**model_config)), model_config


def np_qwen3_logits(p, ids, cfg, fp16_attention=True, kv_group_of_head=None, causal=True, rotary=True):
    """Numpy forward of MindFormers' mcore Qwen3 (training graph, eval) -> logits [B*S, V].

    p: parameters by name (decoder.layers.<i>...). Mirrors: embedding; per layer input RMSNorm,
    fused linear_qkv split per kv group ([q heads of the group | k | v]), q/k RMSNorm per head,
    rotate-half RoPE, float16 cast of q/k/v (mcore Attention does it before flash attention),
    causal+pad GQA attention, float16 output, linear_proj, residual; pre-MLP RMSNorm,
    linear_fc1 with gate/up interleaved per unit, SiLU(gate)*up, linear_fc2, residual;
    final RMSNorm, output_layer. The keyword switches exist to show the test is sensitive."""
    eps, n, n_kv, d = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rep = n // n_kv
    b, s = ids.shape
    f16 = (lambda x: x.astype(np.float16).astype(np.float64)) if fp16_attention else (lambda x: x)
    kv_group_of_head = kv_group_of_head or (lambda h: h // rep)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = np.outer(np.arange(s, dtype=np.float32), inv_freq).astype(np.float64)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))

    def rope(x):  # [B, S, heads, D]
        if not rotary:
            return x
        rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos[None, :, None] + rotated * sin[None, :, None]

    masked = causal_pad_mask(ids, cfg["pad_token_id"]) if causal else (ids == cfg["pad_token_id"])[:, None, None, :]
    x = p["embedding.word_embeddings.weight"].astype(np.float64)[ids]  # [B, S, H]
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"decoder.layers.{layer}."
        h = np_rms_norm(x, p[pre + "input_layernorm.weight"], eps)
        qkv = (h @ p[pre + "self_attention.linear_qkv.weight"].T).reshape(b, s, n_kv, (rep + 2) * d)
        q = qkv[..., :rep * d].reshape(b, s, n, d)
        k, v = qkv[..., rep * d:(rep + 1) * d], qkv[..., (rep + 1) * d:]
        q = rope(np_rms_norm(q, p[pre + "self_attention.q_layernorm.weight"], eps))
        k = rope(np_rms_norm(k, p[pre + "self_attention.k_layernorm.weight"], eps))
        q, k, v = (f16(t).transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, S, D]
        ctx = np.zeros((b, n, s, d))
        for head in range(n):
            g = kv_group_of_head(head)
            ctx[:, head] = np_attention(q[:, head:head + 1], k[:, g:g + 1], v[:, g:g + 1], masked,
                                        1 / math.sqrt(d))[:, 0]
        ctx = f16(ctx).transpose(0, 2, 1, 3).reshape(b, s, n * d)
        x = x + ctx @ p[pre + "self_attention.linear_proj.weight"].T
        h = np_rms_norm(x, p[pre + "pre_mlp_layernorm.weight"], eps)
        fc1 = (h @ p[pre + "mlp.linear_fc1.weight"].T).reshape(b, s, -1, 2)
        gate, up = fc1[..., 0], fc1[..., 1]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p[pre + "mlp.linear_fc2.weight"].T
    x = np_rms_norm(x, p["decoder.final_layernorm.weight"], eps)
    return (x @ p["output_layer.weight"].T).reshape(b * s, -1)


def _randomized(net, rng):
    """Random values that make every part matter (peaked attention, large logits); returns them
    by parameter name as float64."""
    params = {}
    for param in net.get_parameters():
        if param.name.endswith("layernorm.weight"):
            value = rng.uniform(0.5, 2.0, param.shape)
        elif param.name.startswith("embedding"):
            value = rng.standard_normal(param.shape)
        else:
            value = rng.standard_normal(param.shape) / math.sqrt(param.shape[1])
        param.set_data(Tensor(value.astype(np.float32)))
        params[param.name] = value.astype(np.float32).astype(np.float64)
    return params


def _qwen3_logits_and_reference(rng, fp16_attention):
    net, cfg = _tiny_qwen3()
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)  # GQA
    params = _randomized(net, rng)
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in params  # qk-norm: Qwen3 has it
    ids = rng.integers(3, cfg["vocab_size"], (2, cfg["seq_length"]))
    ids[0, 7] = cfg["pad_token_id"]  # pads are masked as keys
    ids[1, 20:] = cfg["pad_token_id"]
    net.set_train(False)
    logits = net(Tensor(ids.astype(np.int32))).asnumpy()
    expected = np_qwen3_logits(params, ids, cfg, fp16_attention=fp16_attention)
    assert logits.shape == expected.shape == (2 * 32, 128)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers
    return logits, expected, (params, ids, cfg)


def test_tiny_qwen3_with_standins_matches_a_numpy_forward(mcore_context):
    """The whole model, float32 end to end: mcore Attention casts float32 q/k/v to float16 before
    flash attention (as it must for the Ascend kernel); for an exact comparison this test makes that
    cast a float32 one (conftest.float32_attention), nothing else changes. The next test keeps the
    stock float16 cast."""
    # pylint: disable=unused-argument
    with float32_attention():
        logits, expected, (params, ids, cfg) = _qwen3_logits_and_reference(np.random.default_rng(8), False)
    assert np.abs(logits - expected).max() <= 1e-4
    # the comparison sees each piece: a wrong kv grouping, no causal mask or no rotary is far off
    for wrong in (dict(kv_group_of_head=lambda h: h % 2), dict(causal=False), dict(rotary=False)):
        assert np.abs(logits - np_qwen3_logits(params, ids, cfg, fp16_attention=False, **wrong)).max() > 1e-2, wrong


def test_tiny_qwen3_with_standins_and_the_stock_float16_cast(mcore_context):
    """As MindFormers runs it: q/k/v rounded to float16 before attention and the attention output
    float16. The numpy forward rounds at the same points; the residual difference comes from
    values that float32 noise puts on the other side of a float16 rounding boundary (measured:
    max 9.5e-4 on logits up to ~5; 3.0e-3 without modelling the rounding, 3.7e-6 in float32)."""
    # pylint: disable=unused-argument
    logits, expected, _ = _qwen3_logits_and_reference(np.random.default_rng(8), True)
    assert np.abs(logits - expected).max() <= 5e-3
