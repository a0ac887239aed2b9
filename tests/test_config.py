"""pet_config validation: every bad key or value is an early error naming it."""
import copy

import pytest

from mindformers_lora_ext.config import (DoraConfig, LoraExtConfig, OloraConfig, PetConfigError,
                                         PissaConfig, RsLoraConfig)

BASE = {"target_modules": ".*wq|.*wv"}


def make(**kw):
    return LoraExtConfig(**dict(BASE, **kw))


def test_defaults_and_adapter_globs():
    cfg = make()
    assert (cfg.pet_type, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == ("lora_ext", 8, 16.0, 0.0)
    assert cfg.freeze_exclude == ["*.lora_A", "*.lora_B", "*.lora_B_bias", "*.lora_magnitude_vector",
                                  "*.trainable_tokens_delta"]


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
    ("use_dora", "yes", "use_dora = 'yes': expected true or false"),
    ("merge_on_load", 1, "merge_on_load = 1: expected true or false"),
    ("init_lora_weights", "pissa_niter_0", "expected one of ['true', 'false', 'kaiming', 'gaussian'"),
    ("init_lora_weights", "svd", "init_lora_weights = 'svd'"),
    ("rank_pattern", {"wq": 0}, "rank_pattern['wq'] = 0: expected an integer >= 1"),
    ("rank_pattern", ["wq"], "expected a mapping of regex -> value"),
    ("alpha_pattern", {"(wq": 4}, "is not a valid regex"),
    ("layers_to_transform", [0, 0], "expected a layer index >= 0 or a non-empty list of distinct"),
    ("layers_to_transform", -1, "layers_to_transform = -1"),
    ("modules_to_save", "lm_head", "modules_to_save = 'lm_head': expected a non-empty list"),
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
    assert dup.freeze_exclude[:3] == ["*lm_head*", "*.lora_A", "*.lora_B"]


def test_peft_spelling_gets_a_hint():
    with pytest.raises(PetConfigError, match="HF PEFT's 'r' is spelled 'lora_rank' here"):
        make(r=4)


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(PetConfigError, match="layers_pattern = 'layers' only applies together"):
        make(layers_pattern="layers")
    assert make(layers_to_transform=1, layers_pattern="layers").layers_pattern == ["layers"]


@pytest.mark.parametrize("kw,needle", [
    ({"use_dora": True, "lora_bias": True}, "lora_bias = true is not supported with use_dora"),
    ({"init_lora_weights": "pissa", "lora_bias": True}, "needs init_lora_weights true or false"),
])
def test_incompatible_options(kw, needle):
    with pytest.raises(PetConfigError, match=needle):
        make(**kw)


def test_module_options_follow_patterns_and_rslora():
    cfg = make(lora_rank=8, lora_alpha=16, rank_pattern={"wq": 4, r"layers\.1\..*": 2},
               alpha_pattern={"attention.wv": 3})
    q0 = cfg.module_options("model.layers.0.attention.wq")
    assert (q0.rank, q0.alpha, q0.scaling) == (4, 16, 4.0)
    v1 = cfg.module_options("model.layers.1.attention.wv")
    assert (v1.rank, v1.alpha, v1.scaling) == (2, 3, 1.5)  # first matching key wins
    k0 = cfg.module_options("model.layers.0.attention.wk")
    assert (k0.rank, k0.scaling) == (8, 2.0)
    # a key matches whole trailing name components only ("q" is not "wq")
    assert make(rank_pattern={"q": 1}).module_options("model.layers.0.attention.wq").rank == 8
    rs = make(lora_rank=4, lora_alpha=8, use_rslora=True).module_options("x")
    assert rs.scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize("cls,key,good,bad", [
    (DoraConfig, "use_dora", True, False),
    (RsLoraConfig, "use_rslora", True, False),
    (PissaConfig, "init_lora_weights", "pissa_niter_4", "olora"),
    (OloraConfig, "init_lora_weights", "olora", "gaussian"),
])
def test_presets_fix_their_key(cls, key, good, bad):
    assert getattr(cls(**BASE), key) == cls.DEFAULTS[key]
    assert getattr(cls(**BASE, **{key: good}), key) == good
    with pytest.raises(PetConfigError) as err:
        cls(**BASE, **{key: bad})
    assert f"{key} = {bad!r} contradicts pet_type {cls.pet_type_name!r}" in str(err.value)


def test_kaiming_is_peft_true():
    assert make(init_lora_weights="kaiming").init_lora_weights is True


def test_dora_fused_kernel_true_needs_dropout():
    # DoRA's kernel is its dropout correction: "true" at dropout 0 would force nothing
    with pytest.raises(PetConfigError, match="use_fused_kernel = true with use_dora needs lora_dropout > 0"):
        make(use_dora=True, use_fused_kernel=True)
    assert make(use_dora=True, use_fused_kernel=True, lora_dropout=0.1).use_fused_kernel is True


def test_data_driven_inits_take_peft_subconfigs_with_defaults():
    cfg = make(init_lora_weights="eva")
    assert cfg.eva_config == {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                              "whiten": False, "adjust_scaling_factors": True}
    assert cfg.corda_config is None and cfg.lora_ga_config is None
    spec = cfg.module_options("model.layers.0.attention.wq")
    assert (spec.rank, spec.allocated) == (8, 16)  # EVA may give up to round(r * rho)
    assert make(init_lora_weights="eva", eva_config={"rho": 1.5}, lora_rank=3).module_options("x").allocated == 4
    corda = make(init_lora_weights="corda", corda_config={"corda_method": "kpm"})
    assert corda.corda_config["corda_method"] == "kpm" and corda.corda_config["cache_file"] is None
    assert make(init_lora_weights="lora_ga").lora_ga_config == {"direction": "ArB2r", "scale": "stable",
                                                                 "stable_gamma": 16}
    assert make().module_options("x").allocated == 8


@pytest.mark.parametrize("kw,needle", [
    ({"init_lora_weights": "eva", "eva_config": {"rho": 0.5}}, "eva_config.rho = 0.5: expected a number in [1"),
    ({"init_lora_weights": "eva", "eva_config": {"tau": 1.5}}, "eva_config.tau = 1.5"),
    ({"init_lora_weights": "eva", "eva_config": {"rhoo": 2}}, "eva_config.rhoo is not an option of eva_config. "
                                                               "Did you mean 'rho'?"),
    ({"init_lora_weights": "eva", "eva_config": [2]}, "eva_config = [2]: expected a mapping"),
    ({"eva_config": {"rho": 2}}, "eva_config is given but init_lora_weights = True"),
    ({"init_lora_weights": "corda", "corda_config": {"corda_method": "xpm"}},
     "corda_config.corda_method = 'xpm': expected one of ['ipm', 'kpm']"),
    ({"init_lora_weights": "corda", "corda_config": {"cache_file": ""}}, "expected a file path or null"),
    ({"init_lora_weights": "lora_ga", "lora_ga_config": {"direction": "BA"}}, "lora_ga_config.direction = 'BA'"),
    ({"init_lora_weights": "lora_ga", "lora_ga_config": {"stable_gamma": 0}}, "lora_ga_config.stable_gamma = 0"),
    ({"init_lora_weights": "eva", "lora_bias": True}, "needs init_lora_weights true or false"),
    ({"init_lora_weights": "corda", "fused_cells": "per_hf_module"}, "per_hf_module needs init_lora_weights"),
    ({"init_lora_weights": "svd"}, "'eva', 'corda', 'lora_ga'"),
])
def test_data_driven_init_errors_name_key_and_value(kw, needle):
    with pytest.raises(PetConfigError) as err:
        make(**kw)
    assert needle in str(err.value)


def test_record_ranks_puts_exact_names_ahead_of_the_patterns():
    cfg = make(init_lora_weights="eva", lora_rank=4, lora_alpha=8, rank_pattern={"wq": 2})
    cfg.record_ranks({"model.layers.0.attention.wq": (3, 6.0), "model.layers.0.attention.wk": (4, 8),
                      "model.layers.1.attention.wq": (2, 8)})
    assert cfg.module_options("model.layers.0.attention.wq").rank == 3
    assert cfg.module_options("model.layers.0.attention.wq").alpha == 6.0
    assert cfg.module_options("model.layers.1.attention.wq").rank == 2  # the user's pattern already says 2
    assert list(cfg.rank_pattern) == [r"model\.layers\.0\.attention\.wq", "wq"]


@pytest.mark.parametrize("value,needle", [
    ([3, 3], "token id(s) [3] repeated"),
    ([-1], "expected a non-empty list of token ids"),
    ({"tok_embeddings": []}, "trainable_token_indices['tok_embeddings'] = []"),
    ("3", "expected a list of token ids or a mapping"),
])
def test_trainable_token_indices_errors(value, needle):
    with pytest.raises(PetConfigError) as err:
        make(trainable_token_indices=value)
    assert needle in str(err.value)
    with pytest.raises(PetConfigError, match="which modules_to_save trains whole"):
        make(trainable_token_indices={"tok_embeddings": [3]}, modules_to_save=["tok_embeddings"])
