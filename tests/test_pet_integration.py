"""Our pet types through MindFormers' own build_network -> get_pet_model -> PetModel."""
import json

import numpy as np
import pytest

from mindformers.models.build_model import build_network
from mindformers.pet import is_supported_pet_type
from mindformers.pet.pet_model import PetModel
from mindformers_lora_ext.integration import STRICT_ENV, UnknownPetTypeError

TARGETS = ("wq", "wk", "wv", "wo")


def expected_adapter_names(num_layers):
    return sorted(f"model.layers.{i}.attention.{t}.lora_{m}"
                  for i in range(num_layers) for t in TARGETS for m in "AB")


def test_lora_ext_is_a_supported_pet_type():
    assert is_supported_pet_type("lora_ext")


def test_build_network_trains_exactly_the_adapters(tiny_config):
    mc = tiny_config.model.model_config
    net = build_network(tiny_config.model)
    assert isinstance(net, PetModel) and type(net.network).__name__ == "LoraExtModel"
    trainable = net.trainable_params()
    assert sorted(p.name for p in trainable) == expected_adapter_names(mc.num_layers)
    r, h = mc.pet_config.lora_rank, mc.hidden_size
    assert sum(p.size for p in trainable) == mc.num_layers * len(TARGETS) * 2 * r * h
    names = [p.name for p in net.get_parameters()]
    # base weights keep the names a stock Llama checkpoint uses
    assert "model.layers.0.attention.wq.weight" in names and "lm_head.weight" in names
    assert len(names) == len(set(names))


def test_second_build_in_one_process_keeps_the_adapter(tiny_config):
    first = build_network(tiny_config.model)
    assert tiny_config.model.model_config.pet_config.pet_type == "lora_ext"  # not popped
    second = build_network(tiny_config.model)
    assert len(second.trainable_params()) == len(first.trainable_params()) > 0


def test_user_freeze_globs_apply_on_top(tiny_config):
    pc = tiny_config.model.model_config.pet_config
    pc.freeze_exclude = ["lm_head.*"]
    pc.freeze_include = ["*layers.1.*"]
    names = {p.name for p in build_network(tiny_config.model).trainable_params()}
    assert "lm_head.weight" in names
    assert not any(".layers.1." in n for n in names)
    assert "model.layers.0.attention.wq.lora_A" in names


def test_typo_pet_type_is_an_error_not_a_full_finetune(tiny_config):
    tiny_config.model.model_config.pet_config.pet_type = "lora_xet"
    with pytest.raises(UnknownPetTypeError) as err:
        build_network(tiny_config.model)
    msg = str(err.value)
    assert "model.model_config.pet_config.pet_type = 'lora_xet'" in msg
    assert "Did you mean 'lora_ext'?" in msg and "prefixtuning" in msg


def test_missing_pet_type_is_an_error(tiny_config):
    del tiny_config.model.model_config.pet_config["pet_type"]
    with pytest.raises(UnknownPetTypeError, match="pet_type is missing"):
        build_network(tiny_config.model)


def test_strict_off_restores_stock_behaviour(tiny_config, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "0")
    tiny_config.model.model_config.pet_config.pet_type = "lroa"
    net = build_network(tiny_config.model)
    assert not isinstance(net, PetModel)
    assert all(p.requires_grad for p in net.get_parameters())  # what stock MindFormers does


def test_adapter_config_json_is_peft_shaped(tiny_config, tmp_path):
    net = build_network(tiny_config.model)
    path = tmp_path / "adapter_config.json"
    net.save_pet_config(str(path))
    data = json.loads(path.read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 8 and data["lora_alpha"] == 16
    assert data["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_initial_logits_equal_base_model(tiny_config):
    """B starts at zero: the adapted model computes what the base computes."""
    import mindspore as ms
    from mindformers.models.build_model import build_model
    ms.set_seed(0)
    base = build_model(tiny_config.model)
    ms.set_seed(0)
    adapted = build_network(tiny_config.model)
    for p in adapted.get_parameters():  # same base weights in both
        if "lora_" not in p.name:
            p.set_data(base.parameters_dict()[p.name].data)
    ids = ms.Tensor(np.random.default_rng(0).integers(3, 128, (2, 32)), ms.int32)
    base.set_train(False)
    adapted.set_train(False)
    np.testing.assert_allclose(adapted(ids)[0].asnumpy(), base(ids)[0].asnumpy(), rtol=1e-5, atol=1e-5)
