"""Every shipped YAML loads, validates its pet_config, and builds at a shrunken size on CPU."""
import glob
import os
from fnmatch import fnmatch

import pytest

from mindformers.models.build_model import build_network
from mindformers.tools.register import MindFormerConfig
from mindformers_lora_ext import registry
from conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
SHRINK = dict(seq_length=16, hidden_size=32, num_layers=2, num_heads=2, vocab_size=64,
              multiple_of=16, compute_dtype="float32", param_init_type="float32",
              use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_validates_and_builds_shrunken(path):
    cfg = MindFormerConfig(path)
    pet = cfg.model.model_config.pet_config
    config_cls = registry.pet_type_config_class(pet.pet_type)
    assert config_cls is not None, f"{path}: pet_type {pet.pet_type!r} is not ours"
    config_cls.from_pet_config(pet)
    for key, value in SHRINK.items():
        cfg.model.model_config[key] = value
    net = build_network(cfg.model)
    globs = config_cls.from_pet_config(pet).adapter_globs()  # e.g. *.lora_A, *.vera_lambda_b
    assert net.trainable_params() and all(any(fnmatch(p.name, g) for g in globs) for p in net.trainable_params())
