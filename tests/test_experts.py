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
