"""pet_config validation: every bad key or value is an early error naming it."""
import copy

import pytest

from mindformers_lora_ext.config import LoraExtConfig, PetConfigError

BASE = {"target_modules": ".*wq|.*wv"}


def make(**kw):
    return LoraExtConfig(**dict(BASE, **kw))


def test_defaults_and_adapter_globs():
    cfg = make()
    assert (cfg.pet_type, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == ("lora_ext", 8, 16.0, 0.0)
    assert cfg.freeze_exclude == ["*.lora_A", "*.lora_B"]


@pytest.mark.parametrize("key,value,needle", [
    ("lora_rank", 0, "lora_rank = 0: expected an integer >= 1"),
    ("lora_rank", 2.5, "lora_rank = 2.5"),
    ("lora_rank", True, "lora_rank = True"),
    ("lora_alpha", 0, "lora_alpha = 0: expected a number in (0"),
    ("lora_dropout", 1.0, "lora_dropout = 1.0: expected a number in [0, 1)"),
    ("lora_dropout", -0.1, "lora_dropout = -0.1"),
    ("target_modules", "(wq", "is not a valid regex"),
    ("target_modules", [], "expected a non-empty list of strings"),
    ("target_modules", "", "expected a regex, a list or 'all-linear'"),
    ("exclude_layers", [3], "exclude_layers = [3]"),
    ("compute_dtype", "fp16", "expected one of ['float32', 'float16', 'bfloat16']"),
    ("freeze_exclude", "*lm_head*", "freeze_exclude = '*lm_head*': expected a non-empty list"),
])
def test_bad_values_name_key_and_value(key, value, needle):
    with pytest.raises(PetConfigError) as err:
        make(**{key: value})
    assert f"model.model_config.pet_config.{key}" in str(err.value)
    assert needle in str(err.value)


def test_missing_target_modules():
    with pytest.raises(PetConfigError, match="target_modules is required"):
        LoraExtConfig()


def test_unknown_key_did_you_mean():
    with pytest.raises(PetConfigError) as err:
        make(lora_rnak=4)
    msg = str(err.value)
    assert "pet_config.lora_rnak is not an option of pet type 'lora_ext'" in msg
    assert "Did you mean 'lora_rank'?" in msg and "lora_dropout" in msg


def test_stock_lora_key_gets_a_hint():
    with pytest.raises(PetConfigError, match="key of MindFormers' stock 'lora'"):
        make(lora_a_init="normal")


def test_from_pet_config_checks_pet_type_and_copies():
    live = {"pet_type": "lora_ext", "lora_rank": 4, **BASE}
    cfg = LoraExtConfig.from_pet_config(live)
    assert cfg.lora_rank == 4 and live["pet_type"] == "lora_ext"  # the YAML dict is untouched
    with pytest.raises(PetConfigError, match="does not match"):
        LoraExtConfig.from_pet_config(dict(live, pet_type="lora"))


def test_deepcopy_round_trip():
    cfg = make(lora_rank=4, freeze_exclude=["*lm_head*"])
    dup = copy.deepcopy(cfg)
    assert type(dup) is LoraExtConfig and dict(dup) == dict(cfg)
    assert dup.freeze_exclude == ["*lm_head*", "*.lora_A", "*.lora_B"]
