"""hf_map: HF module names and fused row layouts read from MindFormers' own converters."""
import numpy as np
import pytest

from conftest import mcore_mode
from mindformers_lora_ext import hf_map

QWEN3 = "configs/tiny/qwen3_lora_ext.yaml"
QWEN3_MOE = "configs/tiny/qwen3_moe_lora_ext.yaml"


def _base(path, moe):
    import os
    from mindformers.tools.register import MindFormerConfig
    if moe:
        from mindformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as Config
        from mindformers.models.qwen3_moe.modeling_qwen3_moe_train import TrainingQwen3MoeForCausalLM as Model
    else:
        from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config as Config
        from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM as Model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = MindFormerConfig(os.path.join(root, path)).model.model_config.to_dict()
    for key in ("pet_config", "architectures"):
        cfg.pop(key, None)
    return Model(Config(**cfg)), cfg


def test_qwen3_map_follows_mindformers_fusion():
    """The map's rows put each HF weight where MindFormers' own convert_hf_weight puts it."""
    with mcore_mode():
        net, cfg = _base(QWEN3, moe=False)
        outputs = {p.name[:-len(".weight")]: (0, p.shape[0]) for p in net.get_parameters()
                   if p.name.startswith("decoder.layers.0.") and p.name.endswith(("linear_qkv.weight",
                                                                                   "linear_fc1.weight",
                                                                                   "linear_proj.weight"))}
        names = hf_map.for_network(net, outputs)
        rng = np.random.default_rng(0)
        hidden, d = cfg["hidden_size"], cfg["head_dim"]
        hf = {"q": rng.standard_normal((cfg["num_attention_heads"] * d, hidden)),
              "k": rng.standard_normal((cfg["num_key_value_heads"] * d, hidden)),
              "v": rng.standard_normal((cfg["num_key_value_heads"] * d, hidden))}
        pre = "decoder.layers.0.self_attention."
        fused = net.convert_hf_weight({f"{pre}linear_{k}.weight": v for k, v in hf.items()})[f"{pre}linear_qkv.weight"]
    qkv = names.cell(pre + "linear_qkv")
    assert qkv.modules == tuple(f"model.layers.0.self_attn.{k}_proj" for k in "qkv")
    parts = names.split(pre + "linear_qkv", "lora_B", fused)  # rows split like B's
    for key, module in zip("qkv", qkv.modules):
        np.testing.assert_array_equal(parts[module], hf[key])
    np.testing.assert_array_equal(names.fuse(pre + "linear_qkv", "lora_B", parts), fused)
    assert qkv.rows[0][:2] == (0, 1) and qkv.rows[0] != tuple(range(len(qkv.rows[0])))  # interleaved per group
    fc1 = names.cell("decoder.layers.0.mlp.linear_fc1")
    assert fc1.modules == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert fc1.rows[0][:3] == (0, 2, 4) and fc1.rows[1][:3] == (1, 3, 5)  # gate/up interleaved
    assert names.module(pre + "linear_proj") == "model.layers.0.self_attn.o_proj"
    a = rng.standard_normal((4, hidden))
    shared = names.split(pre + "linear_qkv", "lora_A", a)
    assert all(np.array_equal(v, a) for v in shared.values())
    shared[qkv.modules[1]] = shared[qkv.modules[1]] + 1.0
    with pytest.raises(hf_map.HfMapError, match="differ"):
        names.fuse(pre + "linear_qkv", "lora_A", shared)
    with pytest.raises(hf_map.HfMapError, match="does not split"):
        names.split(pre + "linear_qkv", "lokr_w1", a)


def test_qwen3_moe_expert_map_from_experts_convert_op():
    with mcore_mode():
        net, cfg = _base(QWEN3_MOE, moe=True)
        experts, ffn = cfg["num_experts"], cfg["moe_intermediate_size"]
        names = hf_map.for_network(net, {"decoder.layers.0.mlp.experts.linear_fc1": (experts, 2 * ffn),
                                         "decoder.layers.0.mlp.experts.linear_fc2": (experts, cfg["hidden_size"])})
    fc1 = names.cell("decoder.layers.0.mlp.experts.linear_fc1")
    assert fc1.experts == experts
    assert fc1.rows == (tuple(range(ffn)), tuple(range(ffn, 2 * ffn)))  # [gate | up] per expert
    b = np.random.default_rng(1).standard_normal((experts, 2 * ffn, 3))
    parts = names.split("decoder.layers.0.mlp.experts.linear_fc1", "lora_B", b)
    assert len(parts) == 2 * experts
    np.testing.assert_array_equal(parts["model.layers.0.mlp.experts.2.up_proj"], b[2, ffn:])
    np.testing.assert_array_equal(names.fuse("decoder.layers.0.mlp.experts.linear_fc1", "lora_B", parts), b)
    assert names.cell("decoder.layers.0.mlp.experts.linear_fc2").names()[0] == "model.layers.0.mlp.experts.0.down_proj"


def test_legacy_map_renames_one_module_per_cell():
    names = hf_map.legacy_map(["model.layers.0.attention.wq"])
    assert names.module("model.layers.0.attention.wq") == "model.layers.0.self_attn.q_proj"
    value = np.arange(6.0).reshape(3, 2)
    assert names.split("model.layers.0.attention.wq", "lora_B", value) == {"model.layers.0.self_attn.q_proj": value}
    assert hf_map.HfMap.from_json(names.to_json()).cells == names.cells


def test_adapter_peft_cannot_hold_is_saved_in_mindformers_names_and_export_refuses(tmp_path):
    """LoKr's Kronecker update does not split by output rows: on Qwen3's fused linear_qkv the
    adapter is saved without adapter_config.json (PEFT never sees it), reloads exactly, and
    `mindformers-lora export` refuses it naming the cell."""
    import json
    import os
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig
    from mindformers_lora_ext import adapter_files, cli
    from mindformers_lora_ext.peft_format import load_adapter, save_adapter
    with mcore_mode():
        cfg = MindFormerConfig(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), QWEN3))
        cfg.model.model_config.pet_config = MindFormerConfig(pet_type="lokr", r=2, alpha=2,
                                                             target_modules=["linear_qkv", "linear_proj"])
        net = build_network(cfg.model)
        before = net.network.adapter_state_dict()
        directory = save_adapter(net.network, str(tmp_path / "a"))
        assert sorted(os.listdir(directory)) == sorted([adapter_files.META_NAME, adapter_files.WEIGHTS_NAME])
        meta = json.loads((tmp_path / "a" / adapter_files.META_NAME).read_text())
        assert "linear_qkv" in meta["not_peft"] and meta["config"]["peft_type"] == "LOKR"
        for param in net.network.adapter_parameters():
            param.set_data(param * 0)
        load_adapter(net.network, directory)
    after = net.network.adapter_state_dict()
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    with pytest.raises(SystemExit, match="cannot be exported to HF PEFT.*linear_qkv"):
        cli.main(["export", "--adapter", directory, str(tmp_path / "out")])
