"""Adapters on MoE routed experts (mcore FFNGroupedGEMM): targeting, merge math, naming."""
import numpy as np
import pytest
from mindspore import nn

from mindformers.parallel_core.transformer_config import TransformerConfig
from mindformers.parallel_core.training_graph.tensor_parallel.layers import ColumnParallelLinear
from mindformers.parallel_core.training_graph.transformer.moe.ffn import FFNGroupedGEMM
from mindformers_lora_ext.config import LoraExtConfig
from mindformers_lora_ext.merge import merged_values
from mindformers_lora_ext.tuners.targeting import find_targets, linear_cell_names

E, HIDDEN, FFN = 4, 16, 8


def moe_config():
    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, params_dtype="float32",
                             compute_dtype="float32", num_moe_experts=E, moe_ffn_hidden_size=FFN,
                             moe_router_topk=2, seq_length=8, ffn_hidden_size=32, add_bias_linear=False,
                             gated_linear_unit=True)


class _Router(nn.Cell):
    def __init__(self):
        super().__init__()
        self.weight = nn.Dense(HIDDEN, E).weight


class _Moe(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.router = _Router()
        self.experts = FFNGroupedGEMM(cfg)
        self.shared_experts = nn.CellList([ColumnParallelLinear(HIDDEN, 2 * FFN, config=cfg,
                                                                init_method=cfg.init_method, bias=False)])


class _Block(nn.Cell):
    def __init__(self):
        super().__init__()
        cfg = moe_config()
        self.linear_qkv = ColumnParallelLinear(HIDDEN, 3 * HIDDEN, config=cfg, init_method=cfg.init_method,
                                               bias=False)
        self.mlp = _Moe(cfg)


def test_experts_are_targeted_by_virtual_projection_names():
    net = _Block()
    fc1, fc2 = "mlp.experts.linear_fc1", "mlp.experts.linear_fc2"
    assert linear_cell_names(net) == ["linear_qkv", fc1, fc2, "mlp.shared_experts.0"]
    assert find_targets(net, ["linear_fc1"]) == [fc1]
    assert find_targets(net, ["experts"]) == [fc1, fc2]                      # the whole expert MLP
    assert find_targets(net, r".*experts\.linear_fc2") == [fc2]
    assert find_targets(net, "all-linear") == ["linear_qkv", fc1, fc2, "mlp.shared_experts.0"]
    assert find_targets(net, "all-linear", exclude_layers=["experts"]) == ["linear_qkv", "mlp.shared_experts.0"]
    assert find_targets(net, ["experts"], exclude_layers=["linear_fc1"]) == [fc2]
    with pytest.raises(ValueError, match=r"matches cell 'mlp.router' of type _Router.*router is never adapted"):
        find_targets(net, ["router"])


def _expert_adapter(rng, cell, rank, dora):
    arrays = {f"{cell}.lora_A": rng.standard_normal((E, rank, HIDDEN)),
              f"{cell}.lora_B": rng.standard_normal((E, 2 * FFN, rank))}
    if dora:
        arrays[f"{cell}.lora_magnitude_vector"] = np.abs(rng.standard_normal((E, 2 * FFN))) + 0.5
    return arrays


@pytest.mark.parametrize("dora", [False, True])
def test_merge_of_expert_adapters_matches_numpy(dora):
    rng = np.random.default_rng(0)
    cell = "decoder.layers.0.mlp.experts.linear_fc1"
    stored = rng.standard_normal((E * HIDDEN, 2 * FFN)).astype(np.float32)  # [E*in, out]
    tensors = _expert_adapter(rng, cell, 4, dora)
    pet = LoraExtConfig(pet_type="dora" if dora else "lora_ext", lora_rank=4, lora_alpha=8,
                        use_dora=dora, target_modules=["linear_fc1"])
    base = {"decoder.layers.0.mlp.experts.weight1": stored}
    merged = merged_values(base.get, tensors, pet, "test")
    assert list(merged) == ["decoder.layers.0.mlp.experts.weight1"]
    for e in range(E):
        w_in_out = stored[e * HIDDEN:(e + 1) * HIDDEN].astype(np.float64)
        a, b = tensors[f"{cell}.lora_A"][e], tensors[f"{cell}.lora_B"][e]
        adapted = w_in_out.T + 2.0 * b @ a  # [out, in]
        if dora:
            m = tensors[f"{cell}.lora_magnitude_vector"][e]
            adapted = adapted * (m / np.sqrt((adapted ** 2).sum(axis=1)))[:, None]
        np.testing.assert_allclose(merged["decoder.layers.0.mlp.experts.weight1"][e * HIDDEN:(e + 1) * HIDDEN],
                                   adapted.T, rtol=1e-5, atol=1e-5)


def test_merge_of_expert_adapter_checks_shapes():
    rng = np.random.default_rng(1)
    cell = "mlp.experts.linear_fc1"
    pet = LoraExtConfig(pet_type="lora_ext", lora_rank=4, lora_alpha=8, target_modules=["linear_fc1"])
    wrong = {"mlp.experts.weight1": np.zeros(((E - 1) * HIDDEN, 2 * FFN), np.float32)}
    with pytest.raises(ValueError, match=r"mlp.experts.linear_fc1: adapter of 4 experts, rank 4, in 16"):
        merged_values(wrong.get, _expert_adapter(rng, cell, 4, False), pet, "test")


# ---- forward: ExpertLoraLayer against a numpy MoE, on CPU through the test-side stand-ins ----

TOKENS, TOPK = 12, 2


@pytest.fixture
def cpu_experts():
    """The MoE CPU stand-ins (tests/mcore_cpu_moe.py; they cover our layer's grouped matmul)."""
    import mcore_cpu_moe
    from mindformers_lora_ext.tuners import experts
    was_installed = mcore_cpu_moe.is_installed()
    mcore_cpu_moe.install()
    assert experts.grouped_matmul is mcore_cpu_moe.cpu_grouped_matmul
    yield experts
    if not was_installed:
        mcore_cpu_moe.uninstall()


def _silu(v):
    return v / (1 + np.exp(-v))


def _numpy_moe(x, probs, routing, fc1, fc2):
    """sum_k probs[n, k] * fc2_e(swiglu(fc1_e(x_n))) with e = routing[n, k]; fc*(e, v) -> [.., out]."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(routing.shape[1]):
            e = routing[n, k]
            gate, up = np.split(fc1(e, x[n]), 2)
            out[n] += probs[n, k] * fc2(e, _silu(gate) * up)
    return out


def _inputs(rng):
    x = rng.standard_normal((1, TOKENS, HIDDEN)).astype(np.float32)
    routing = np.stack([rng.choice(E, TOPK, replace=False) for _ in range(TOKENS)]).astype(np.int32)
    routing[0] = [0, 1]  # expert 3 gets no token: an empty group
    routing[routing == 3] = 2
    routing[np.arange(TOKENS), 1] = np.where(routing[:, 0] == routing[:, 1], (routing[:, 0] + 1) % 3, routing[:, 1])
    probs = rng.uniform(0.1, 1.0, (1, TOKENS, TOPK)).astype(np.float32)
    return x, probs, routing[None]


@pytest.mark.parametrize("variant", ["lora", "dora", "fc2_only"])
def test_expert_adapter_forward_matches_numpy(cpu_experts, variant):
    import mindspore as ms
    from mindformers_lora_ext.config import LoraSpec
    rng = np.random.default_rng(3)
    base = FFNGroupedGEMM(moe_config())
    x, probs, routing = _inputs(rng)
    args = [ms.Tensor(v) for v in (x, probs, routing)]
    w1 = base.weight1.asnumpy().reshape(E, HIDDEN, 2 * FFN).astype(np.float64)
    w2 = base.weight2.asnumpy().reshape(E, FFN, HIDDEN).astype(np.float64)
    plain = _numpy_moe(x[0].astype(np.float64), probs[0], routing[0], lambda e, v: v @ w1[e], lambda e, v: v @ w2[e])
    np.testing.assert_allclose(base(*args).asnumpy()[0], plain, rtol=1e-4, atol=1e-5)  # the reference is right

    dora = variant == "dora"
    spec = LoraSpec(rank=4, alpha=8, scaling=2.0, dropout=0.0, init=True, use_dora=dora, lora_bias=False)
    projections = ["linear_fc2"] if variant == "fc2_only" else ["linear_fc1", "linear_fc2"]
    layer = cpu_experts.ExpertLoraLayer(base, {p: spec for p in projections})
    np.testing.assert_allclose(layer(*args).asnumpy()[0], plain, rtol=1e-4, atol=1e-5)  # B = 0: the base
    arrays = {}
    for proj, cell in layer.projections.items():
        for param in cell.adapter_parameters():
            value = rng.standard_normal(param.shape).astype(np.float32) * 0.3
            if param.name.endswith("magnitude_vector"):
                value = np.abs(value) + 0.5
            param.set_data(ms.Tensor(value))
            arrays[(proj, param.name.rsplit(".", 1)[-1])] = value.astype(np.float64)

    def projection(proj, weights):
        def apply(e, v):
            if (proj, "lora_A") not in arrays:
                return v @ weights[e]
            a, b = arrays[(proj, "lora_A")][e], arrays[(proj, "lora_B")][e]
            y = v @ weights[e] + 2.0 * (v @ a.T) @ b.T
            if dora:  # m * (W + sBA) / ||W + sBA|| per output feature, W_oi = weights[e].T
                norm = np.linalg.norm(weights[e].T + 2.0 * b @ a, axis=1)
                y = y * arrays[(proj, "lora_magnitude_vector")][e] / norm
            return y
        return apply

    expected = _numpy_moe(x[0].astype(np.float64), probs[0], routing[0], projection("linear_fc1", w1),
                          projection("linear_fc2", w2))
    got = layer(*args).asnumpy()[0]
    assert np.abs(expected - plain).max() > 0.1 * np.abs(plain).max()  # the adapter acts
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    for cell in layer.projections.values():  # merge folds it; unmerge restores
        cell.merge()
    np.testing.assert_allclose(base(*args).asnumpy()[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer(*args).asnumpy()[0], expected, rtol=1e-4, atol=1e-5)  # compiled before
    for cell in layer.projections.values():
        cell.unmerge()
    np.testing.assert_allclose(base(*args).asnumpy()[0], plain, rtol=1e-4, atol=1e-5)


def test_expert_adapter_layouts_under_expert_parallel(monkeypatch):
    """Semi-auto parallel (dp 4 x tp 2, ep 2): the Morph carries the base's layouts for tokens and
    expert weights, and splits every adapter operand over experts like the expert weights."""
    import mindspore as ms
    from mindformers.parallel_core.training_graph.transformer.moe import token_dispatcher
    from mindformers_lora_ext.config import LoraSpec
    from mindformers_lora_ext.tuners.experts import ExpertLoraLayer
    from mindformers.parallel_core.training_graph import device_matrix
    monkeypatch.setattr(token_dispatcher, "get_ep_group_name", lambda *args: "ep_group")  # no comm init on CPU
    for manager in (device_matrix.layout, device_matrix.layout_moe):  # singletons: init once per process
        for attr in ("_layout", "_layout_type", "_config"):
            monkeypatch.setattr(manager, attr, None)
    spec = LoraSpec(rank=4, alpha=8, scaling=2.0, dropout=0.0, init=True, use_dora=True, lora_bias=False)
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=8)
    try:
        cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, params_dtype="float32",
                                compute_dtype="float32", num_moe_experts=E, moe_ffn_hidden_size=FFN,
                                moe_router_topk=2, seq_length=8, ffn_hidden_size=32, add_bias_linear=False,
                                gated_linear_unit=True, data_parallel_size=4, tensor_model_parallel_size=2,
                                expert_model_parallel_size=2)
        base = FFNGroupedGEMM(cfg)
        layer = ExpertLoraLayer(base, {"linear_fc2": spec})
    finally:
        ms.reset_auto_parallel_context()
    ours, theirs = layer.morphed_forward.in_layout, base.morphed_forward.in_layout
    assert len(ours) == 12 and ours[:5] == theirs[:5] and ours[-1] == theirs[-1]
    assert theirs[3]["tensor_map"] == (0, -1)  # w1 [E*h, 2H]: rows (experts) over ep
    assert ours[3]["device_matrix"] == (4, 2)  # (dp_ex_ep, ep)
    assert [o["tensor_map"] for o in ours[5:11]] == [(0, -1, -1), (0, -1, -1), (0, -1)] * 2
    assert layer.morphed_forward.out_layout == base.morphed_forward.out_layout
    alone = ExpertLoraLayer(FFNGroupedGEMM(moe_config()), {"linear_fc2": spec})  # stand-alone: no layouts
    assert "in_layout" not in alone.morphed_forward.attrs
