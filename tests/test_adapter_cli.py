"""mindformers-lora export / import / inspect (in-process: cli.main)."""
import os

import numpy as np
import pytest
import yaml
import mindspore as ms
from safetensors.numpy import load_file

from mindformers.models.build_model import build_network
from mindformers.tools.register.config import DictConfig
from mindformers_lora_ext import cli
from conftest import METHOD_KEYS, TINY_CONFIG, pet_config_over_tiny


@pytest.fixture
def trained_checkpoint(tiny_config, tmp_path):
    """A MindFormers-style full checkpoint of a dora run, and the run's YAML."""
    pet = {"pet_type": "dora", "lora_rank": 4, "rank_pattern": {"wv": 2}}
    tiny_config.model.model_config.pet_config.update(pet)
    net = build_network(tiny_config.model)
    rng = np.random.default_rng(5)
    for p in net.trainable_params():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    path = tmp_path / "run.ckpt"
    ms.save_checkpoint(net, str(path))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"base_config": [TINY_CONFIG],
                                        "model": {"model_config": {"pet_config": pet}}}))
    return path, run_yaml, {p.name: p.asnumpy() for p in net.trainable_params()}


def test_export_import_round_trip_is_bit_exact(trained_checkpoint, tmp_path, capsys):
    ckpt, run_yaml, adapter = trained_checkpoint
    assert cli.main(["export", "--adapter", str(ckpt), "--config", str(run_yaml), "--to", "peft",
                     str(tmp_path / "peft")]) == 0
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight" in peft
    assert peft["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 64)
    assert cli.main(["import", "--peft", str(tmp_path / "peft"), str(tmp_path / "back.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "pet_type: dora" in printed and "model.layers.0.self_attn.v_proj" not in printed
    back = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(tmp_path / "back.safetensors"),
                                                          format="safetensors").items()}
    assert sorted(back) == sorted(adapter)
    for name, value in adapter.items():
        assert np.array_equal(back[name], value), name
    # exporting our own adapter directory again is a clean, identical copy
    assert cli.main(["export", "--adapter", str(tmp_path / "peft"), str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(np.array_equal(again[k], v) for k, v in peft.items())


def test_inspect_and_errors(trained_checkpoint, tmp_path, capsys):
    ckpt, run_yaml, _ = trained_checkpoint
    cli.main(["export", "--adapter", str(ckpt), "--config", str(run_yaml), str(tmp_path / "peft")])
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "type LORA (pet_type dora): " in out and "r=4" in out and "use_dora=True" in out
    assert "norm layer 0:" in out and "norm layer 1:" in out
    os.unlink(tmp_path / "peft" / "adapter_model.safetensors")
    assert cli.main(["inspect", str(tmp_path / "peft")]) == 2
    assert "adapter_model.safetensors is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --config"):
        cli.main(["export", "--adapter", str(ckpt), str(tmp_path / "x")])


STRUCTURED = {t: METHOD_KEYS[t] for t in ("vera", "loha", "lokr", "adalora")}


@pytest.mark.parametrize("pet_type", list(STRUCTURED) + ["vera_without_projections"])
def test_export_of_a_run_checkpoint_equals_the_adapter_files(tiny_config, tmp_path, capsys, pet_type):
    """export from a MindFormers run checkpoint writes what AdapterCheckpoint/save_adapter write."""
    from mindformers_lora_ext.adapter_files import read_adapter_dir
    from mindformers_lora_ext.peft_format import save_adapter
    pet = {"pet_type": pet_type.split("_")[0], "target_modules": ".*wq|.*wv",
           **STRUCTURED[pet_type.split("_")[0]]}
    if pet_type == "vera_without_projections":
        pet["save_projection"] = False
    tiny_config.model.model_config.pet_config = DictConfig(**pet)
    net = build_network(tiny_config.model)
    rng = np.random.default_rng(7)
    for p in net.network.saved_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    ms.save_checkpoint(net, str(tmp_path / "run.ckpt"))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"base_config": [TINY_CONFIG],
                                        "model": {"model_config": {"pet_config": pet_config_over_tiny(pet)}}}))
    assert cli.main(["export", "--adapter", str(tmp_path / "run.ckpt"), "--config", str(run_yaml),
                     str(tmp_path / "exported")]) == 0
    save_adapter(net.network, str(tmp_path / "saved"))
    config, tensors = read_adapter_dir(str(tmp_path / "exported"))
    expected_config, expected = read_adapter_dir(str(tmp_path / "saved"))
    assert config == expected_config
    assert sorted(tensors) == sorted(expected) and len(tensors) >= 4
    assert ("base_model.vera_A" in tensors) == (pet_type == "vera")
    for key, value in expected.items():
        assert np.array_equal(tensors[key], value), key
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "exported")]) == 0
    out = capsys.readouterr().out
    line = out.splitlines()[1]  # the method's own options, not LoRA's
    assert line.startswith(f"  type {config['peft_type']} (pet_type {pet['pet_type']}): "), line
    own = {"vera": "projection_prng_key=0", "loha": "r=4", "lokr": "decompose_factor=", "adalora": "init_r=8"}
    assert own[pet["pet_type"]] in line and "use_dora" not in line, line
