"""The HF twins of tests/hf_twins.py: base-model logits of the transformers model and of the
MindFormers network holding its weights (converted by MindFormers' own converters) agree.

For each tiny model (legacy Llama, mcore Qwen3, mcore Qwen3-MoE):
(a) the logits agree to 1e-4 (float32) on random ids [2, 16];
(b) MindFormers' second HF converter gives the same weights bit for bit (mcore: the model's
    ``weight_converters`` template, fed as MindFormers' ReshardLoader feeds it; legacy Llama:
    ``LlamaForCausalLM.convert_weight_dict``), and it covers the whole HF state dict;
(c) load_param_into_net leaves out only MindFormers-only state (the MoE router's aux-loss
    accumulator ``fi_accu``, which the logits do not depend on);
(d) the HF config is the one MindFormers builds from the YAML;
(e) the comparison would see a wrong layout (negative controls), and the MoE routing is far from
    a top-k tie, so the agreement is neither weak nor luck.

The MindFormers networks are compiled for the YAML's seq_length (32; legacy Llama and mcore both
build their causal mask for it), so the 16 ids are padded with filler tokens: the models are
causal, so the first 16 positions' logits do not depend on the filler (checked with two fillers).
"""
import copy
import os

import numpy as np
import pytest

from conftest import interop_modules

torch, _ = interop_modules("torch", "transformers")

import mindspore as ms  # noqa: E402  pylint: disable=wrong-import-position

import hf_twins  # noqa: E402  pylint: disable=wrong-import-position
from conftest import ROOT  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.interop
TOL = 1e-4
KINDS = ("llama", "qwen3", "qwen3_moe")
BATCH, SEQ = 2, 16


def _model_config(kind):
    from mindformers.tools.register import MindFormerConfig  # pylint: disable=import-outside-toplevel
    return MindFormerConfig(os.path.join(ROOT, "configs", "tiny", hf_twins.CONFIGS[kind])).model.model_config


@pytest.fixture(scope="module")
def twins():
    """kind -> (pair, plain MindFormers network holding the twin's weights), built once."""
    made = {}

    def get(kind):
        if kind not in made:
            pair = hf_twins.build_pair(kind, seed=0)
            made[kind] = (pair, pair.mf_network())
        return made[kind]
    return get


@pytest.fixture(scope="module")
def input_ids():
    return np.random.default_rng(11).integers(0, 128, (BATCH, SEQ))


def _mf_logits(pair, net, ids, filler_seed=0):
    """[B, S, V] logits of the MindFormers network for ``ids`` [B, S], padded causally to the
    network's seq_length with random filler tokens."""
    mc = _model_config(pair.kind)
    filler = np.random.default_rng(100 + filler_seed).integers(0, mc.vocab_size, (ids.shape[0], mc.seq_length - ids.shape[1]))
    saved = pair.input_ids
    pair.input_ids = np.concatenate([ids, filler], axis=1)
    try:
        return pair.mf_logits(net)[:, :ids.shape[1]]
    finally:
        pair.input_ids = saved


def _hf_state(pair):
    return {k: v.detach().numpy().astype(np.float32) for k, v in pair.hf_model.state_dict().items()}


def _set_weights(pair, net, weights):
    with pair.context():
        ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in weights.items()})


# (a) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_base_logits_agree(twins, input_ids, kind):
    pair, net = twins(kind)
    theirs = hf_twins.hf_logits(pair.hf_model, input_ids)
    ours = _mf_logits(pair, net, input_ids)
    assert ours.shape == theirs.shape == (BATCH, SEQ, pair.hf_model.config.vocab_size)
    np.testing.assert_allclose(_mf_logits(pair, net, input_ids, filler_seed=1), ours, atol=1e-6, rtol=0)
    assert np.abs(theirs).max() > 0.1  # not trivially small logits
    diff = float(np.abs(ours - theirs).max())
    print(f"{kind}: max |logits diff| = {diff:.3g}")
    assert diff <= TOL, diff


# (b) -------------------------------------------------------------------------------------------

def _by_weight_converters(pair, net):
    """The HF state as MindFormers' checkpoint loader converts it with the model's
    ``weight_converters`` (checkpoint/converter/template.py): ReshardLoader's preprocessing (experts
    stacked, q/k/v fused), then ``WeightTemplate.get_mf_state_dict``."""
    template = net.template
    experts, qkv, prepared = {}, {}, {}
    num_experts = _model_config(pair.kind).get("num_experts")
    with pair.context():
        for name, value in _hf_state(pair).items():
            if template.check_weights_for_experts(name) or template.check_weights_for_qkv(name):
                # ms Tensors, as the loader passes them (its `None in list` test needs them)
                name, value = template.preprocess_hf_weights(name, ms.Tensor(value), experts, qkv, num_experts)
                if value is None:  # more experts / q, k, v to come
                    continue
            prepared[name] = value
        converted = template.get_mf_state_dict(prepared)
    return {k: np.asarray(v.asnumpy() if hasattr(v, "asnumpy") else v, np.float32) for k, v in converted.items()}


def _by_llama_convert_weight_dict(pair):
    from mindformers.models.llama.llama import LlamaForCausalLM  # pylint: disable=import-outside-toplevel
    converted = LlamaForCausalLM.convert_weight_dict(_hf_state(pair), model_config=_model_config("llama"))
    return {k: np.asarray(v, np.float32) for k, v in converted.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_second_mindformers_converter_gives_the_same_weights(twins, kind):
    pair, net = twins(kind)
    other = _by_llama_convert_weight_dict(pair) if kind == "llama" else _by_weight_converters(pair, net)
    # the whole HF state converts to exactly the network's parameters (nothing of HF dropped)
    network_names = {p.name for p in net.get_parameters() if not p.name.endswith(hf_twins.MF_ONLY)}
    assert set(other) == set(pair.mf_weights) == network_names, sorted(set(other) ^ network_names)
    for name, value in pair.mf_weights.items():
        assert other[name].shape == value.shape and np.array_equal(other[name], value), name


# (c) -------------------------------------------------------------------------------------------

MF_ONLY_EXPECTED = {"llama": [], "qwen3": [],
                    "qwen3_moe": ["decoder.layers.0.mlp.router.fi_accu", "decoder.layers.1.mlp.router.fi_accu"]}


@pytest.mark.parametrize("kind", KINDS)
def test_only_mindformers_only_state_is_left_unloaded(twins, input_ids, kind):
    pair, net = twins(kind)
    with pair.context():
        params = {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in pair.mf_weights.items()}
        not_loaded, unused = ms.load_param_into_net(net, params)
    assert sorted(not_loaded) == MF_ONLY_EXPECTED[kind] and not unused, (not_loaded, unused)
    if not not_loaded:
        return
    # fi_accu: the router's per-expert load accumulator of the gbs_aux_loss (every forward adds
    # to it, eval included; GPTModel zeroes it at accumulation boundaries). It feeds the aux
    # loss only: any value of it leaves the logits as they are.
    theirs = hf_twins.hf_logits(pair.hf_model, input_ids)
    accus = [p for p in net.get_parameters() if p.name in not_loaded]
    assert all(tuple(p.shape) == (pair.hf_model.config.num_experts,) for p in accus)
    for p in accus:
        p.set_data(ms.Tensor(np.full(p.shape, 7.0, np.float32)))
    assert np.abs(_mf_logits(pair, net, input_ids) - theirs).max() <= TOL


# (d) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_hf_config_is_mindformers_config(twins, kind):
    pair, net = twins(kind)
    hf = pair.hf_model.config
    assert hf._attn_implementation == "eager"  # pylint: disable=protected-access
    assert all(p.dtype == torch.float32 for p in pair.hf_model.parameters())
    if kind == "llama":
        mc = net.config
        ffn = pair.mf_weights["model.layers.0.feed_forward.w1.weight"].shape[0]
        assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
                hf.num_key_value_heads, hf.intermediate_size, hf.rms_norm_eps, hf.rope_theta,
                hf.tie_word_embeddings) == (mc.vocab_size, mc.hidden_size, mc.num_layers, mc.num_heads,
                                            mc.n_kv_heads or mc.num_heads, ffn, mc.rms_norm_eps, mc.theta,
                                            mc.tie_word_embeddings)
        assert hf.hidden_act == "silu" and not hf.attention_bias and not hf.mlp_bias
        return
    tc = net.get_gpt_transformer_config()  # what the mcore network is built from
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
            hf.head_dim, hf.rms_norm_eps, hf.rope_theta, hf.tie_word_embeddings, hf.attention_bias) == (
                tc.vocab_size, tc.hidden_size, tc.num_layers, tc.num_attention_heads, tc.num_query_groups,
                tc.kv_channels, tc.layernorm_epsilon, tc.rotary_base, not tc.untie_embeddings_and_output_weights,
                tc.add_qkv_bias)
    assert hf.hidden_act == "silu" and tc.gated_linear_unit and tc.position_embedding_type == "rope"
    assert not tc.rotary_interleaved and tc.partial_rotary_factor == 1.0 and tc.rope_scaling is None
    if kind == "qwen3":
        assert hf.intermediate_size == tc.ffn_hidden_size
        return
    # every layer MoE, no shared expert; softmax -> top-k -> renormalised (norm_topk_prob), x1.0
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.norm_topk_prob) == (
        tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.norm_topk_prob)
    assert hf.decoder_sparse_step == 1 and not hf.mlp_only_layers and tc.moe_layer_freq == 1
    assert not tc.first_k_dense_replace and not tc.shared_expert_num and not tc.moe_shared_expert_intermediate_size
    assert tc.moe_router_score_function == "softmax" and tc.moe_router_topk_scaling_factor == 1.0
    assert not tc.moe_router_enable_expert_bias and not tc.moe_router_force_expert_balance
    assert tc.moe_router_num_groups is None and tc.moe_expert_capacity_factor is None  # dropless
    assert tc.moe_router_dtype == ms.float32


# (e) -------------------------------------------------------------------------------------------

def _llama_meta_permutation(name, value, num_heads=4):
    """The q/k row permutation MindFormers applies to Meta's original checkpoints
    (convert_weight.convert_meta_torch_ckpt), wrong for HF checkpoints."""
    if ".wq." not in name and ".wk." not in name:
        return value
    dim = value.shape[1]
    return value.reshape(num_heads, dim // num_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(dim, dim)


def _fc1_contiguous(name, value):
    """gate/up as [gate; up] instead of the interleaved rows MindFormers' mcore MLP uses."""
    return np.concatenate([value[0::2], value[1::2]]) if name.endswith("mlp.linear_fc1.weight") else value


def _experts_rolled(name, value, num_experts=4):
    if not name.endswith(("experts.weight1", "experts.weight2")):
        return value
    return np.roll(value.reshape(num_experts, -1, value.shape[-1]), 1, axis=0).reshape(value.shape)


WRONG = {"llama": [("meta q/k permutation", _llama_meta_permutation)],
         "qwen3": [("contiguous gate/up", _fc1_contiguous)],
         "qwen3_moe": [("experts out of order", _experts_rolled), ("no top-k renormalisation", None)]}


@pytest.mark.parametrize("kind", KINDS)
def test_comparison_sees_wrong_layouts(twins, input_ids, kind):
    pair, net = twins(kind)
    theirs = hf_twins.hf_logits(pair.hf_model, input_ids)
    diffs = {}
    for label, wrong in WRONG[kind]:
        if wrong is None:  # the HF side without norm_topk_prob
            model = copy.deepcopy(pair.hf_model)
            for layer in model.model.layers:
                layer.mlp.norm_topk_prob = False
            diffs[label] = np.abs(_mf_logits(pair, net, input_ids) - hf_twins.hf_logits(model, input_ids)).max()
            continue
        _set_weights(pair, net, {n: wrong(n, v) for n, v in pair.mf_weights.items()})
        try:
            diffs[label] = np.abs(_mf_logits(pair, net, input_ids) - theirs).max()
        finally:
            _set_weights(pair, net, pair.mf_weights)
    print(kind, {k: f"{v:.3g}" for k, v in diffs.items()})
    assert all(d > 10 * TOL for d in diffs.values()), diffs
    assert np.abs(_mf_logits(pair, net, input_ids) - theirs).max() <= TOL  # restored


def test_moe_routing_is_far_from_a_tie(twins, input_ids):
    """HF's k-th and (k+1)-th router probabilities differ by far more than float32 rounding on
    these ids, so both frameworks pick the same experts by more than luck."""
    pair, _ = twins("qwen3_moe")
    k = pair.hf_model.config.num_experts_per_tok
    with torch.no_grad():
        out = pair.hf_model(input_ids=torch.tensor(input_ids), output_router_logits=True)
    gaps = []
    for logits in out.router_logits:  # one [B*S, E] per layer
        probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
        gaps.append(float((probs[:, k - 1] - probs[:, k]).min()))
    print("qwen3_moe: min top-k margin per layer", [f"{g:.3g}" for g in gaps])
    assert min(gaps) > 1e-4, gaps
