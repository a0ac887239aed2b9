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


def _logits(net, ids):
    net.set_train(False)
    return net(ids)[0].asnumpy()


@pytest.mark.parametrize("pet", [
    {"pet_type": "lora_ext"},
    {"pet_type": "dora"},
    {"pet_type": "rslora"},
    {"pet_type": "pissa"},
    {"pet_type": "olora", "use_dora": True},
])
def test_base_checkpoint_loaded_after_wrapping_gives_base_logits(tiny_config, pet):
    """The trainer's flow with load_checkpoint: build under no_init_parameters, wrap, load the
    base checkpoint, materialise. Data-driven inits must see the loaded weights."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters
    from mindformers.models.build_model import build_model
    ms.set_seed(0)
    base = build_model(tiny_config.model)
    checkpoint = {p.name: ms.Parameter(p.data.copy(), name=p.name) for p in base.get_parameters()}
    ids = ms.Tensor(np.random.default_rng(0).integers(3, 128, (2, 32)), ms.int32)
    expected = _logits(base, ids)
    tiny_config.model.model_config.pet_config.update(pet)
    ms.set_seed(1)  # different random base weights: only the checkpoint can make them equal
    with no_init_parameters():
        adapted = build_network(tiny_config.model)
    not_loaded, _ = ms.load_param_into_net(adapted, checkpoint)
    assert all(".lora_" in name for name in not_loaded)
    adapted.init_parameters_data()
    np.testing.assert_allclose(_logits(adapted, ids), expected, rtol=1e-4, atol=1e-4)
    if pet["pet_type"] in ("pissa", "olora"):  # the base weight now holds the residual
        wq = adapted.parameters_dict()["model.layers.0.attention.wq.weight"].asnumpy()
        assert not np.allclose(wq, checkpoint["model.layers.0.attention.wq.weight"].asnumpy(), atol=1e-3)


@pytest.mark.parametrize("pet_type,extra", [("lora_ext", ()), ("dora", ("lora_magnitude_vector",)),
                                            ("rslora", ()), ("pissa", ()), ("olora", ())])
def test_trainable_names_and_counts_per_type(tiny_config, pet_type, extra):
    mc = tiny_config.model.model_config
    mc.pet_config.pet_type = pet_type
    trainable = build_network(tiny_config.model).trainable_params()
    expected = sorted(f"model.layers.{i}.attention.{t}.{m}" for i in range(mc.num_layers)
                      for t in TARGETS for m in ("lora_A", "lora_B") + extra)
    assert sorted(p.name for p in trainable) == expected
    h, r = mc.hidden_size, mc.pet_config.lora_rank
    per_target = 2 * r * h + (h if extra else 0)
    assert sum(p.size for p in trainable) == mc.num_layers * len(TARGETS) * per_target


def test_rank_pattern_modules_to_save_layers_to_transform(tiny_config, tmp_path):
    pc = tiny_config.model.model_config.pet_config
    pc.update({"rank_pattern": {"wq": 2}, "alpha_pattern": {r"layers\.1\.attention\.wv": 4},
               "layers_to_transform": [1], "modules_to_save": ["lm_head"], "lora_bias": True})
    net = build_network(tiny_config.model)
    shapes = {p.name: p.shape for p in net.trainable_params()}
    assert shapes["model.layers.1.attention.wq.lora_A"] == (2, 64)
    assert shapes["model.layers.1.attention.wk.lora_A"] == (8, 64)
    assert shapes["model.layers.1.attention.wk.lora_B_bias"] == (64,)
    assert shapes["lm_head.weight"] == (128, 64)  # modules_to_save: trained in full
    assert not any(".layers.0." in n for n in shapes)
    net.save_pet_config(str(tmp_path / "adapter_config.json"))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 2}
    assert data["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 4}
    assert (data["layers_to_transform"], data["modules_to_save"], data["lora_bias"]) == ([1], ["lm_head"], True)


def test_modules_to_save_overlapping_a_target_is_an_error(tiny_config):
    tiny_config.model.model_config.pet_config.modules_to_save = ["layers.0.attention"]
    with pytest.raises(ValueError, match="modules_to_save cell 'model.layers.0.attention' overlaps"):
        build_network(tiny_config.model)
