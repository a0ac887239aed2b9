"""PiSSA/OLoRA -> plain LoRA: the converted adapter on the original base computes what the
trained adapter computes on the residual base."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from mindformers.models.build_model import build_model, build_network
from mindformers.tools.register.config import DictConfig
from mindformers_lora_ext import cli
from mindformers_lora_ext.adapter_files import read_adapter_dir
from mindformers_lora_ext.callbacks import AdapterCheckpoint
from mindformers_lora_ext.peft_format import pet_config_from_peft
from mindformers_lora_ext.pissa_to_lora import converted_config
from conftest import CallbackContext

IDS = ms.Tensor(np.arange(5, 69, dtype=np.int32).reshape(2, 32) % 128)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    from mindformers.tools.register import MindFormerConfig
    from conftest import TINY_CONFIG
    cfg = MindFormerConfig(TINY_CONFIG)
    del cfg.model.model_config["pet_config"]
    ms.set_seed(3)
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    ms.save_checkpoint(build_model(cfg.model), str(path))
    return str(path)


def _logits(net):
    net.set_train(False)
    return net(IDS)[0].asnumpy()


@pytest.mark.parametrize("pet_type,extra", [
    ("pissa", {}),
    ("olora", {}),
    ("pissa", {"use_dora": True}),
    ("pissa", {"use_rslora": True, "rank_pattern": {"wv": 2}, "alpha_pattern": {"wq": 4}}),
])
def test_converted_adapter_on_the_original_base_equals_the_trained_run(tiny_config, base_ckpt, tmp_path,
                                                                        pet_type, extra):
    # the run: built as MindFormers does (load after wrapping), so the base becomes the residual
    tiny_config.model.model_config.pet_config = DictConfig(
        pet_type=pet_type, lora_rank=4, lora_alpha=8, target_modules=".*wq|.*wv|.*wo", **extra)
    with no_init_parameters():
        net = build_network(tiny_config.model)
    ms.load_param_into_net(net, ms.load_checkpoint(base_ckpt))
    net.init_parameters_data()
    callback = AdapterCheckpoint(save_steps=1, output_dir=str(tmp_path / "adapters"))
    callback.on_train_begin(CallbackContext(net, 0))
    callback.on_train_step_begin(CallbackContext(net, 1))  # writes initial/ (after any DataDrivenInit)
    rng = np.random.default_rng(1)
    for p in net.network.saved_parameters():  # "training"
        p.set_data(ms.Tensor(p.asnumpy() + 0.05 * rng.standard_normal(p.shape).astype(np.float32)))
    callback.on_train_step_end(CallbackContext(net, 1))
    expected = _logits(net)

    assert cli.main(["convert", "--adapter", str(tmp_path / "adapters"), str(tmp_path / "lora")]) == 0
    config, tensors = read_adapter_dir(str(tmp_path / "lora"))
    assert config["r"] == 8 and config["init_lora_weights"] is True
    v_rank = 2 * extra.get("rank_pattern", {}).get("wv", 4)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (v_rank, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 8)
    pet = pet_config_from_peft(config)
    assert pet["pet_type"] == "lora_ext"
    tiny_config.model.model_config.pet_config = DictConfig(**pet, adapter_path=str(tmp_path / "lora"))
    plain_lora = build_network(tiny_config.model)
    ms.load_param_into_net(plain_lora, ms.load_checkpoint(base_ckpt))  # the original weights
    np.testing.assert_allclose(_logits(plain_lora), expected, rtol=1e-4, atol=1e-4)
    # the trained adapter alone on the original base is something else: that is why we convert
    trained = dict(pet_config_from_peft(read_adapter_dir(str(tmp_path / "adapters" / "step_1"))[0]),
                   pet_type="lora_ext", init_lora_weights=True, adapter_path=str(tmp_path / "adapters" / "step_1"))
    tiny_config.model.model_config.pet_config = DictConfig(**trained)
    unconverted = build_network(tiny_config.model)
    ms.load_param_into_net(unconverted, ms.load_checkpoint(base_ckpt))
    assert np.abs(_logits(unconverted) - expected).max() > 1e-3


def test_scaling_is_kept_and_bad_input_is_refused(tmp_path, capsys):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "init_lora_weights": "pissa_niter_4",
              "use_rslora": False, "rank_pattern": {"a": 4}, "alpha_pattern": {"b": 2},
              "mindformers_pet_type": "pissa"}
    out = converted_config(config)
    assert (out["r"], out["lora_alpha"], out["rank_pattern"], out["alpha_pattern"]) == (16, 32, {"a": 8}, {"b": 4})
    assert out["mindformers_pet_type"] == "lora_ext"
    rs = converted_config(dict(config, use_rslora=True, mindformers_pet_type="dora"))
    assert rs["lora_alpha"] / np.sqrt(rs["r"]) == pytest.approx(16 / np.sqrt(8))
    assert rs["mindformers_pet_type"] == "dora"
    with pytest.raises(ValueError, match="init_lora_weights = True: only a LoRA adapter initialised from the base "
                                         r"weights \(init_lora_weights pissa, pissa_niter_<N>, olora, corda, lora_ga\)"):
        converted_config(dict(config, init_lora_weights=True))
    os.makedirs(tmp_path / "run" / "step_1")
    (tmp_path / "run" / "step_1" / "adapter_config.json").write_text(json.dumps(config))
    assert cli.main(["convert", "--adapter", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "no initial adapter at" in capsys.readouterr().err
