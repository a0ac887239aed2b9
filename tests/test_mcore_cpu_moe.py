"""The MoE/MLA CPU stand-ins of tests/mcore_cpu_moe.py, checked against numpy (graph mode).

(a) ``cpu_grouped_matmul`` (forward and gradients, an expert with zero rows), ``cpu_swiglu`` and
MindFormers' own token dispatcher running on the dispatcher stand-ins; (b) one MindFormers
``MoELayer`` (router + dispatcher + FFNGroupedGEMM [+ shared expert]) against a dense numpy
every-expert MoE on the same weights, forward and gradients; (c) the tiny Qwen3-MoE and
DeepSeek-V3 of configs/tiny/, built with ``build_network`` (so with their lora_ext adapters), run
forward and backward with a finite loss.
"""
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from conftest import ROOT
import mcore_cpu
import mcore_cpu_moe

QWEN3_MOE_CONFIG = os.path.join(ROOT, "configs", "tiny", "qwen3_moe_lora_ext.yaml")
DEEPSEEK3_CONFIG = os.path.join(ROOT, "configs", "tiny", "deepseek3_lora_ext.yaml")


@pytest.fixture(scope="module", autouse=True)
def standins():
    was_installed = mcore_cpu.is_installed(), mcore_cpu_moe.is_installed()
    mcore_cpu.install()  # the dense stand-ins, then (its MOE_INSTALL_HOOK) ours
    assert mcore_cpu_moe.is_installed()
    yield
    if not was_installed[1]:
        mcore_cpu_moe.uninstall()
    if not was_installed[0]:
        mcore_cpu.uninstall()


class _Fn(nn.Cell):
    """A graph-mode cell around a function of tensors."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *args):
        return self.fn(*args)


class _Call(nn.Cell):
    """A graph-mode cell returning the first output of ``cell``."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, *args):
        return self.cell(*args)[0]


def _grads(fn, *arrays):
    """The gradients of sum(fn(*inputs) * dout) w.r.t. every input; ``dout`` is the last array."""
    dout = Tensor(arrays[-1])

    class _Loss(nn.Cell):
        def construct(self, *args):
            return ops.reduce_sum(fn(*args) * dout)

    inputs = [Tensor(a) for a in arrays[:-1]]
    return ops.GradOperation(get_all=True)(_Loss())(*inputs)


def _tconfig(**kw):
    """A TransformerConfig for standalone mcore cells, with the layout they shard with, as
    GPTModel initialises it (dp = cp = tp = 1)."""
    from mindformers.parallel_core.transformer_config import TransformerConfig
    from mindformers.parallel_core.training_graph.device_matrix import layout
    args = dict(num_layers=1, hidden_size=16, num_attention_heads=4, params_dtype="float32",
                compute_dtype="float32", add_bias_linear=False, gated_linear_unit=True)
    args.update(kw)
    config = TransformerConfig(**args)
    layout.init_layout(config)
    return config


# ---------------------------------------------------------------- numpy references

def np_silu(x):
    return x / (1 + np.exp(-x))


def np_grouped_matmul(x, w, counts):
    """Rows of x in consecutive groups of ``counts`` rows; group e times w[e]; rows past the
    groups give zeros."""
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, count in enumerate(counts):
        out[start:start + count] = x[start:start + count] @ w[e]
        start += count
    return out


# ---------------------------------------------------------------- (a) the op stand-ins

def test_install_is_idempotent_and_patches_the_documented_names():
    from mindformers.parallel_core.training_graph.transformer.moe import ffn, router, token_dispatcher
    from mindformers.parallel_core.training_graph.transformer import flash_attention
    patched = (ffn.FFNGroupedGEMM.experts_forward, token_dispatcher.MoETokenDispatcher.__init__,
               router.TopkExt, flash_attention.FlashAttention.__init__, token_dispatcher.SortExt)
    mcore_cpu_moe.install()
    assert (ffn.FFNGroupedGEMM.experts_forward, token_dispatcher.MoETokenDispatcher.__init__, router.TopkExt,
            flash_attention.FlashAttention.__init__, token_dispatcher.SortExt) == patched  # not wrapped twice
    assert ffn.FFNGroupedGEMM.experts_forward is mcore_cpu_moe.cpu_experts_forward
    assert token_dispatcher.SortExt() is mcore_cpu_moe.cpu_sort_ext
    assert token_dispatcher.IndexSelect() is mcore_cpu_moe.cpu_index_select
    assert token_dispatcher.FmodScalar() is mcore_cpu_moe.cpu_fmod_scalar
    assert token_dispatcher.CumsumExt() is mcore_cpu_moe.cpu_cumsum_ext
    cfg = _tconfig(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8, seq_length=8)
    assert token_dispatcher.MoEAlltoAllTokenDispatcher(cfg).d2h is mcore_cpu_moe.cpu_move_to
    assert isinstance(router.TopKRouter(cfg).topk, ops.TopK)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 4, 4, 0], [4, 3, 0, 0]], ids=["middle_empty", "ends_empty",
                                                                                     "tail_rows_zero"])
def test_cpu_grouped_matmul_and_its_gradients_match_numpy(counts):
    """group_list is the CUMULATIVE row count per expert (int64), as MindFormers' dispatcher
    passes it; an expert may get no row. 'tail_rows_zero': rows past the last group give zeros."""
    rng = np.random.default_rng(0)
    rows, e, d_in, d_out = 10, 4, 6, 5
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    w = rng.standard_normal((e, d_in, d_out)).astype(np.float32)
    dout = rng.standard_normal((rows, d_out)).astype(np.float32)
    group_list = Tensor(np.cumsum(counts).astype(np.int64))
    gmm = lambda a, b: mcore_cpu_moe.cpu_grouped_matmul(a, b, group_list)  # noqa: E731
    out = _Fn(gmm)(Tensor(x), Tensor(w)).asnumpy()
    np.testing.assert_allclose(out, np_grouped_matmul(x, w, counts), rtol=1e-5, atol=1e-5)
    dx, dw = _grads(gmm, x, w, dout)
    # d/dx: each row's upstream times its expert's w^T; d/dw[e]: x_e^T dout_e (zero for an empty expert)
    expected_dw = np.zeros(w.shape)
    expected_dx = np.zeros(x.shape)
    start = 0
    for k, count in enumerate(counts):
        expected_dw[k] = x[start:start + count].T @ dout[start:start + count]
        expected_dx[start:start + count] = dout[start:start + count] @ w[k].T
        start += count
    np.testing.assert_allclose(dx.asnumpy(), expected_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy(), expected_dw, rtol=1e-5, atol=1e-5)


def test_cpu_swiglu_matches_numpy_and_mindformers_weight_layout():
    """Swiglu: silu(first half) * second half. FFNGroupedGEMM's w1 [E*h, 2H] thus holds each
    expert's gate in columns :H and up in H:."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 8)).astype(np.float32)
    out = _Fn(mcore_cpu_moe.cpu_swiglu)(Tensor(x)).asnumpy()
    np.testing.assert_allclose(out, np_silu(x[..., :4]) * x[..., 4:], rtol=1e-5, atol=1e-6)
    along_first = lambda t: mcore_cpu_moe.cpu_swiglu(t, 0)  # noqa: E731
    out = _Fn(along_first)(Tensor(x)).asnumpy()
    np.testing.assert_allclose(out, np_silu(x[:2]) * x[2:4], rtol=1e-5, atol=1e-6)


def np_dispatch(tokens, probs, routing, num_experts, pad):
    """MoEAlltoAllTokenDispatcher (STAND_ALONE) in numpy: optional pad tokens first (zeros, prob
    0, token i routed to experts (i*k + j) % E), then the k routing slots flattened slot-major
    (index j*N + t) and stably sorted by expert. Returns (dispatched rows, cumulative counts,
    combine(expert_out) -> [N, h] for the real tokens)."""
    n, k = routing.shape
    if pad:
        tokens = np.concatenate([np.zeros((num_experts, tokens.shape[1]), tokens.dtype), tokens])
        routing = np.concatenate([np.arange(num_experts * k).reshape(num_experts, k) % num_experts, routing])
        probs = np.concatenate([np.zeros((num_experts, k), probs.dtype), probs])
    n_all = routing.shape[0]
    experts = routing.T.reshape(-1)  # slot-major
    order = np.argsort(experts, kind="stable")
    position = np.argsort(order)  # row of (slot j, token t) among the dispatched rows

    def combine(expert_out):
        rows = expert_out[position].reshape(k, n_all, -1)
        out = (rows * probs.T[..., None]).sum(0)
        return out[num_experts:] if pad else out

    return tokens[order % n_all], np.cumsum(np.bincount(experts, minlength=num_experts)), combine


@pytest.mark.parametrize("pad", [False, True], ids=["no_pad_tokens", "pad_tokens"])
def test_mindformers_token_dispatcher_on_the_stand_ins_matches_numpy(pad):
    """MindFormers' own permute -> (AlltoAllV: identity standalone) -> sort by expert, and the
    inverse with the probs-weighted combine; expert 2 receives no token (without pad tokens)."""
    from mindformers.parallel_core.training_graph.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    rng = np.random.default_rng(2)
    n, h, e, k = 12, 8, 4, 2
    cfg = _tconfig(hidden_size=h, num_moe_experts=e, moe_router_topk=k, moe_ffn_hidden_size=4, seq_length=n,
                   use_pad_tokens=pad)
    routing = np.stack([rng.permutation([0, 1, 3])[:k] for _ in range(n)]).astype(np.int32)  # never expert 2
    tokens = rng.standard_normal((n, h)).astype(np.float32)
    probs = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    expected_rows, expected_ends, combine = np_dispatch(tokens, probs, routing, e, pad)
    expert_out = rng.standard_normal(expected_rows.shape).astype(np.float32)
    dispatcher = MoEAlltoAllTokenDispatcher(cfg)

    def run(tok, prob, route, y):
        rows, ends, ctx = dispatcher.token_permutation(tok, prob, route)
        return rows, ends, dispatcher.token_unpermutation(y, ctx)

    rows, ends, combined = _Fn(run)(Tensor(tokens[None]), Tensor(probs[None]), Tensor(routing[None]),
                                    Tensor(expert_out))
    assert ends.dtype == ms.int64 and ends.shape == (e,)  # GroupedMatmul's group_list: cumulative, int64
    np.testing.assert_array_equal(ends.asnumpy(), expected_ends)
    if not pad:
        assert expected_ends[2] == expected_ends[1]  # the empty expert
    np.testing.assert_array_equal(rows.asnumpy().reshape(-1, h), expected_rows)  # same rows, same order
    np.testing.assert_allclose(combined.asnumpy().reshape(n, h), combine(expert_out), rtol=1e-5, atol=1e-5)


def test_mla_flash_attention_with_smaller_value_head_dim_matches_numpy():
    """MLA's core attention (FlashAttention, BNSD): query/key head dim qk + rope = 24, value 16,
    MindFormers' causal mask; output [S, B, N*16]."""
    from mindformers.parallel_core.transformer_config import MLATransformerConfig
    from mindformers.parallel_core.training_graph.device_matrix import layout
    from mindformers.parallel_core.training_graph.transformer.flash_attention import FlashAttention
    s, b, n, dq, dv = 8, 2, 4, 24, 16
    cfg = MLATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=n, params_dtype="float32",
                               compute_dtype="float32", seq_length=s, attention_dropout=0.0,
                               multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=16, qk_head_dim=16,
                               qk_pos_emb_head_dim=8, v_head_dim=dv)
    layout.init_layout(cfg)
    fa = FlashAttention(cfg, layer_number=1, softmax_scale=0.2)
    assert isinstance(fa.flash_attention, mcore_cpu_moe._PadValueHeadDim)  # pylint: disable=protected-access
    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((s, b, n, dq)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((s, b, n, dv)).astype(np.float32)
    causal = np.triu(np.ones((s, s), bool), 1)
    out = fa(Tensor(q), Tensor(k), Tensor(v), Tensor(np.broadcast_to(causal, (b, 1, s, s)).astype(np.uint8)))
    scores = np.einsum("sbnd,tbnd->bnst", q, k).astype(np.float64) * 0.2
    scores = np.where(causal, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bnst,tbnd->sbnd", probs, v.astype(np.float64)).reshape(s, b, n * dv)
    assert out.shape == (s, b, n * dv)
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- (b) one MoE layer vs dense numpy

S, B, H, F, K = 8, 2, 16, 8, 2
MOE_KINDS = {
    # Qwen3-MoE's router: softmax, top-k of the probabilities, no renormalisation here; 4
    # experts; MindFormers' default pad tokens (each expert gets k zero-prob rows)
    "qwen3_moe": dict(num_moe_experts=4, moe_router_score_function="softmax", norm_topk_prob=False,
                      moe_router_topk_scaling_factor=1.0),
    # DeepSeek-V3's: sigmoid, expert bias (selection only), group-limited (2 groups of 4, 1
    # kept), renormalised gates times 2.5, one shared expert, no pad tokens; 8 experts, the bias
    # of expert 7 keeps it from every token (its grouped-matmul group is empty)
    "deepseek_v3": dict(num_moe_experts=8, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_num_groups=2, moe_router_group_topk=1, norm_topk_prob=True,
                        moe_router_topk_scaling_factor=2.5, shared_expert_num=1, use_pad_tokens=False,
                        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4),
}
STARVED = {"qwen3_moe": None, "deepseek_v3": 7}


def _moe_layer(kind):
    """MindFormers' MoELayer built from its module spec, as a TransformerLayer builds its mlp."""
    from mindformers.parallel_core.training_graph.base_models.gpt.moe_module_specs import get_moe_module_spec
    from mindformers.parallel_core.utils.spec_utils import build_module
    cfg = _tconfig(hidden_size=H, seq_length=S, moe_router_topk=K, moe_ffn_hidden_size=F, hidden_act="silu",
                   moe_grouped_gemm=True, **MOE_KINDS[kind])
    spec = get_moe_module_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=True,
                               use_interleaved_weight_layout_mlp=cfg.use_interleaved_weight_layout_mlp)
    return build_module(spec, config=cfg), cfg


def np_moe(p, x, cfg):
    """Dense every-expert MoE on [S, B, H] in float64, as MindFormers' MoELayer computes it:
    tokens in batch-major order; router logits x W_r^T; softmax or sigmoid; selection by top-k
    of prob (+ expert bias), group-limited if configured (groups scored by the sum of their top
    k/group_topk, experts outside the kept groups scored 0); gates = prob at the selected experts,
    renormalised (k > 1 and norm_topk_prob) and scaled; output = sum of gate * expert(x) with
    expert_e(x) = (silu(x w1_e[:, :F]) * x w1_e[:, F:]) w2_e; plus the shared expert (fc1 with
    gate/up interleaved per unit). Also returns the chosen experts [T, k] and each token's
    selection margins."""
    num_experts = cfg.num_moe_experts
    tokens = x.transpose(1, 0, 2).reshape(-1, H)
    logits = tokens @ p["router.weight"].T
    if cfg.moe_router_score_function == "softmax":
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
    else:
        prob = 1 / (1 + np.exp(-logits))
    scores = prob + p.get("router.expert_bias", 0.0)
    margins = []
    if cfg.moe_router_num_groups:
        groups = scores.reshape(len(tokens), cfg.moe_router_num_groups, -1)
        top_m = K // cfg.moe_router_group_topk
        group_score = -np.sort(-groups, -1)[..., :top_m].sum(-1)
        kept = np.argsort(-group_score, -1, kind="stable")[:, :cfg.moe_router_group_topk]
        ranked = -np.sort(-group_score, -1)
        margins.append(ranked[:, cfg.moe_router_group_topk - 1] - ranked[:, cfg.moe_router_group_topk])
        keep = np.zeros(groups.shape[:2], bool)
        np.put_along_axis(keep, kept, True, -1)
        scores = np.where(np.repeat(keep, num_experts // cfg.moe_router_num_groups, -1), scores, 0.0)
    chosen = np.argsort(-scores, -1, kind="stable")[:, :K]
    ranked = -np.sort(-scores, -1)
    margins.append(ranked[:, K - 1] - ranked[:, K])
    gates = np.take_along_axis(prob, chosen, -1)
    if K > 1 and cfg.norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    gates = gates * cfg.moe_router_topk_scaling_factor
    w1 = p["experts.weight1"].reshape(num_experts, H, 2 * F)
    w2 = p["experts.weight2"].reshape(num_experts, F, H)
    every = np.stack([(np_silu(tokens @ w1[e, :, :F]) * (tokens @ w1[e, :, F:])) @ w2[e]
                      for e in range(num_experts)], 1)
    out = (np.take_along_axis(every, chosen[..., None], 1) * gates[..., None]).sum(1)
    out = out.reshape(B, S, H).transpose(1, 0, 2)
    if "shared_experts.linear_fc1.weight" in p:
        fc1 = (x @ p["shared_experts.linear_fc1.weight"].T).reshape(S, B, -1, 2)
        out = out + (np_silu(fc1[..., 0]) * fc1[..., 1]) @ p["shared_experts.linear_fc2.weight"].T
    return out, chosen, np.concatenate(margins)


def _check_grad(grad, f, value, rng, name, eps=1e-5, samples=192):
    """``grad`` (MindSpore's) against central differences of f() w.r.t. ``value`` (changed in
    place and restored) at up to ``samples`` random entries."""
    flat = value.reshape(-1)
    picks = rng.choice(flat.size, min(samples, flat.size), replace=False)
    numeric = []
    for i in picks:
        saved = flat[i]
        flat[i] = saved + eps
        up = f()
        flat[i] = saved - eps
        down = f()
        flat[i] = saved
        numeric.append((up - down) / (2 * eps))
    np.testing.assert_allclose(grad.reshape(-1)[picks], numeric, rtol=1e-3, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("kind", list(MOE_KINDS))
def test_moe_layer_with_stand_ins_matches_dense_numpy_moe(kind):
    layer, cfg = _moe_layer(kind)
    rng = np.random.default_rng(3)
    params = {}
    for name, param in layer.parameters_and_names():
        if name == "router.expert_bias":  # shifts the selection, not the gates
            value = rng.uniform(-0.1, 0.1, param.shape)
            if STARVED[kind] is not None:
                value[STARVED[kind]] = -1.0  # below the 0 that masks the other group: never chosen
        elif not param.requires_grad:  # the router's load counters
            continue
        else:
            value = rng.standard_normal(param.shape) / np.sqrt(H)
        param.set_data(Tensor(value.astype(np.float32)))
        params[name] = value.astype(np.float32).astype(np.float64)
    names = sorted(n for n in params if n != "router.expert_bias")
    expected_names = ["experts.weight1", "experts.weight2", "router.weight"]
    if kind == "deepseek_v3":
        expected_names += ["shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"]
    assert names == sorted(expected_names)
    x = rng.standard_normal((S, B, H)).astype(np.float32)
    expected, chosen, margins = np_moe(params, x.astype(np.float64), cfg)
    used = set(chosen.reshape(-1).tolist())
    assert used == set(range(cfg.num_moe_experts)) - {STARVED[kind]}, used
    # no near-tie in the routing: float32 picks the same experts, and the numeric gradients'
    # perturbations (1e-5 on an input or a weight) move no score across a selection boundary
    assert margins.min() > 1e-4
    out = _Call(layer)(Tensor(x)).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    # gradients of sum(out * dout) w.r.t. x and every trainable parameter, against numpy's
    # central differences of the dense reference (routing fixed away from ties)
    dout = rng.standard_normal(x.shape)
    weights = [p for n, p in layer.parameters_and_names() if n in names]
    order = [n for n, _ in layer.parameters_and_names() if n in names]

    class _Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer = layer
            self.dout = Tensor(dout.astype(np.float32))

        def construct(self, t):
            return ops.reduce_sum(self.layer(t)[0] * self.dout)

    dx, dparams = ops.GradOperation(get_all=True, get_by_list=True)(_Loss(), ms.ParameterTuple(weights))(Tensor(x))
    x64 = x.astype(np.float64)
    loss = lambda: (np_moe(params, x64, cfg)[0] * dout).sum()  # noqa: E731
    _check_grad(dx[0].asnumpy(), loss, x64, rng, "x")
    grads = dict(zip(order, (g.asnumpy() for g in dparams)))
    for name in order:
        _check_grad(grads[name], loss, params[name], rng, name)
    if STARVED[kind] is not None:  # no row, no gradient: the empty group's weights get exact zeros
        starved = STARVED[kind]
        assert not grads["experts.weight1"][starved * H:(starved + 1) * H].any()
        assert not grads["experts.weight2"][starved * F:(starved + 1) * F].any()
        assert grads["experts.weight1"][:starved * H].any()


# ---------------------------------------------------------------- (c) tiny models, forward + backward

# adapted cells (their checkpoint prefixes): on MoE layers linear_fc1 / linear_fc2 name the routed
# experts' projections (<experts>.linear_fc1) and the shared experts'
MODELS = {
    "qwen3_moe": (QWEN3_MOE_CONFIG, r"layers\.[01]\.(self_attention\.(linear_qkv|linear_proj)|mlp\.experts\.linear_fc[12])$",
                  2 * 4),
    "deepseek3": (DEEPSEEK3_CONFIG,
                  r"(layers\.[01]\.self_attention\.linear_(q_down|q_up|kv_down|kv_up)_proj"
                  r"|layers\.[01]\.self_attention\.linear_proj|layers\.0\.mlp\.linear_fc[12]"
                  r"|layers\.1\.mlp\.(shared_experts|experts)\.linear_fc[12])$",
                  2 * 5 + 2 + 4),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_tiny_moe_model_runs_forward_and_backward_on_cpu(model, mcore_context):  # pylint: disable=unused-argument
    import re
    from mindformers.models.build_model import build_network
    from mindformers.parallel_core.training_graph.transformer.moe.ffn import FFNGroupedGEMM
    from mindformers.tools.register import MindFormerConfig
    path, targets, num_targets = MODELS[model]
    cfg = MindFormerConfig(path)
    net = build_network(cfg.model)
    experts = [name for name, cell in net.cells_and_names() if isinstance(cell, FFNGroupedGEMM)]
    assert len(experts) == (2 if model == "qwen3_moe" else 1)  # DeepSeek: layer 0 dense
    padded = [name for name, cell in net.cells_and_names() if isinstance(cell, mcore_cpu_moe._PadValueHeadDim)]
    assert len(padded) == (2 if model == "deepseek3" else 0)  # MLA: value head dim 16 < 16 + 8
    adapted = sorted({p.name.rsplit(".", 1)[0] for p in net.trainable_params()})
    assert len(adapted) == num_targets and all(re.search(targets, n) for n in adapted), adapted
    routed = [p for p in net.get_parameters() if p.name.endswith("mlp.experts.weight1")]
    assert len(routed) == len(experts) and not any(p.requires_grad for p in routed)  # frozen base

    rng = np.random.default_rng(4)
    ids = Tensor(rng.integers(1, 128, (2, 32)).astype(np.int32))
    labels = Tensor(rng.integers(1, 128, (2, 32)).astype(np.int32))

    class _Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, input_ids, label_ids):
            loss, mtp_loss, extra_loss, attention_loss = self.net(input_ids, labels=label_ids)
            return loss + mtp_loss + extra_loss + attention_loss

    net.set_train(True)
    weights = net.trainable_params() + routed  # the routed experts too: backward reaches them
    loss, grads = ops.value_and_grad(_Loss(), None, ms.ParameterTuple(weights))(ids, labels)
    loss = float(loss.asnumpy().reshape(-1)[0])
    assert np.isfinite(loss) and 3.0 < loss < 7.0, loss  # ~ln(128) at init
    grads = [g.asnumpy() for g in grads]
    assert all(np.isfinite(g).all() for g in grads)
    by_name = dict(zip([p.name for p in weights], grads))
    lora_b = [n for n in by_name if n.endswith("lora_B")]
    assert lora_b and all(np.abs(by_name[n]).max() > 0 for n in lora_b)  # lora_A is 0-grad while B = 0
    assert all(np.abs(by_name[p.name]).max() > 0 for p in routed)
