"""Adapter files: PEFT layout, exact round trips, strict loading, crash-safe saves."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import load_file, save_file

from mindformers.models.build_model import build_model, build_network
from mindformers_lora_ext import adapter_files
from mindformers_lora_ext.adapter_files import AdapterFileError
from mindformers_lora_ext.peft_format import (load_adapter, mf_param_name, peft_key,
                                              pet_config_from_peft, save_adapter)

IDS = ms.Tensor(np.random.default_rng(0).integers(3, 128, (2, 32)), ms.int32)


def _logits(net):
    net.set_train(False)
    return net(IDS)[0].asnumpy()


def _adapted(tiny_config, seed=7, **pet):
    tiny_config.model.model_config.pet_config.update(pet)
    ms.set_seed(0)
    net = build_network(tiny_config.model)
    rng = np.random.default_rng(seed)
    for p in net.network.saved_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1 + 0.5))
    return net


def test_peft_names_both_ways():
    assert peft_key("model.layers.3.attention.wq.lora_A") == \
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert peft_key("model.layers.0.feed_forward.w2.lora_B_bias") == \
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.bias"
    assert peft_key("model.layers.0.attention.wv.lora_magnitude_vector") == \
        "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    assert peft_key("model.tok_embeddings.embedding_weight") == "base_model.model.model.embed_tokens.weight"
    for name in ("model.layers.3.attention.wq.lora_A", "lm_head.weight", "model.norm_out.weight",
                 "model.tok_embeddings.embedding_weight", "model.layers.1.feed_forward.w3.lora_B"):
        assert mf_param_name(peft_key(name)) == name
    with pytest.raises(ValueError, match="does not start with 'base_model.model.'"):
        mf_param_name("model.layers.0.q_proj.lora_A.weight")


@pytest.mark.parametrize("pet", [{"pet_type": "dora"},
                                 {"lora_bias": True, "modules_to_save": ["lm_head"],
                                  "rank_pattern": {"wq": 4}}], ids=["dora", "bias_saved_pattern"])
def test_round_trip_is_bit_exact(tiny_config, tmp_path, pet):
    net = _adapted(tiny_config, **pet)
    before = net.network.adapter_state_dict()
    save_adapter(net.network, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (pet.get("pet_type") == "dora")
    ms.set_seed(0)
    other = build_network(tiny_config.model)  # same base weights, fresh adapter values
    assert not np.array_equal(other.network.adapter_state_dict()["model.layers.0.attention.wq.lora_A"],
                              before["model.layers.0.attention.wq.lora_A"])
    load_adapter(other.network, str(tmp_path / "a"))
    after = other.network.adapter_state_dict()
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
    np.testing.assert_array_equal(_logits(other), _logits(net))


def test_hand_written_peft_adapter_gives_the_expected_forward(tiny_config, tmp_path):
    """A PEFT-format adapter written with numpy + safetensors only (not our writer) must act
    like W + (alpha/r) B A on the plain base model."""
    mc = tiny_config.model.model_config
    rng = np.random.default_rng(3)
    r, alpha, hidden = 4, 8.0, mc.hidden_size
    tensors, deltas = {}, {}
    for i in range(mc.num_layers):
        for hf, mf in (("q_proj", "wq"), ("v_proj", "wv")):
            a = rng.standard_normal((r, hidden)).astype(np.float32) * 0.2
            b = rng.standard_normal((hidden, r)).astype(np.float32) * 0.2
            prefix = f"base_model.model.model.layers.{i}.self_attn.{hf}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            deltas[f"model.layers.{i}.attention.{mf}.weight"] = (alpha / r) * b.astype(np.float64) @ a
    os.makedirs(tmp_path / "peft")
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
         "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))
    ms.set_seed(0)
    pet = tiny_config.model.model_config.pet_config
    pet.clear()
    pet.update(pet_config_from_peft(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())))
    pet["adapter_path"] = str(tmp_path / "peft")
    adapted = build_network(tiny_config.model)
    del tiny_config.model.model_config["pet_config"]
    ms.set_seed(0)
    base = build_model(tiny_config.model)
    weights = {p.name: p for p in adapted.get_parameters()}
    for p in base.get_parameters():  # same base weights, then the adapter folded in by numpy
        value = weights[p.name].asnumpy().astype(np.float64)
        p.set_data(ms.Tensor((value + deltas.get(p.name, 0.0)).astype(np.float32)))
    np.testing.assert_allclose(_logits(adapted), _logits(base), rtol=1e-4, atol=1e-4)


def test_strict_load_names_the_tensor(tiny_config, tmp_path):
    net = _adapted(tiny_config)
    save_adapter(net.network, str(tmp_path / "a"))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    bad = dict(tensors, **{key: np.zeros((64, 3), np.float32)})
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor model.layers.1.attention.wk.lora_B has shape \(64, 3\)"):
        load_adapter(net.network, str(tmp_path / "a"))
    del bad[key]
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.attention.wk.lora_B'\]"):
        load_adapter(net.network, str(tmp_path / "a"))


def test_truncated_or_missing_files_are_clear_errors(tmp_path):
    adapter_files.write_adapter_dir(str(tmp_path / "a"), {"x": np.ones((4, 4), np.float32)}, {"r": 1})
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is not a readable safetensors"):
        adapter_files.read_adapter_dir(str(tmp_path / "a"))
    os.unlink(tmp_path / "a" / "adapter_config.json")
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        adapter_files.read_adapter_dir(str(tmp_path / "a"))
    with pytest.raises(AdapterFileError, match="no adapter here"):
        adapter_files.resolve_adapter_dir(str(tmp_path))


def test_latest_and_prune(tmp_path):
    root = str(tmp_path)
    for step in (5, 10, 15):
        adapter_files.write_adapter_dir(os.path.join(root, f"step_{step}"), {"x": np.full(2, step, np.float32)}, {})
    assert adapter_files.resolve_adapter_dir(root).endswith("step_15")  # no pointer: newest
    adapter_files.write_text_atomic(os.path.join(root, "latest"), "step_10\n")
    assert adapter_files.resolve_adapter_dir(root).endswith("step_10")
    adapter_files.prune(root, keep_last=1)
    assert [n for n, _ in adapter_files.step_dirs(root)] == [10, 15]  # latest's target survives


_SAVER = r"""
import os, sys, numpy as np
sys.path.insert(0, {root!r})
from mindformers_lora_ext import adapter_files
root = sys.argv[1]
big = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)  # 4 MB per tensor
for step in range(1, 10**6):
    tensors = {{f"t{{i}}": big + step for i in range(6)}}
    adapter_files.write_adapter_dir(os.path.join(root, f"step_{{step}}"), tensors, {{"step": step}})
    adapter_files.write_text_atomic(os.path.join(root, "latest"), f"step_{{step}}\n")
    adapter_files.prune(root, keep_last=2)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_minus_9_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    delays = [0.35, 0.8, 1.3, 1.9, 2.6]
    checked = 0
    for attempt, delay in enumerate(delays):
        root = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not adapter_files.step_dirs(str(root)):
            continue  # killed before the first save completed: nothing to check
        checked += 1
        directory = adapter_files.resolve_adapter_dir(str(root))
        config, tensors = adapter_files.read_adapter_dir(directory)
        step = int(os.path.basename(directory).split("_")[1])
        assert config == {"step": step} and sorted(tensors) == [f"t{i}" for i in range(6)]
        for _, path in adapter_files.step_dirs(str(root)):  # every visible step dir is complete
            adapter_files.read_adapter_dir(path)
        adapter_files.clean_stale(str(root))
        assert all(not n.startswith(".tmp-") for n in os.listdir(root))
    assert checked >= 3
