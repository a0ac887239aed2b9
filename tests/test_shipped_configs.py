"""Every shipped YAML loads, validates its pet_config, and builds at a shrunken size on CPU.

Legacy models (``use_legacy: True``, Llama) and mcore models (``use_legacy: False``: Qwen3,
Qwen3-MoE, DeepSeek-V3) are shrunk with their own key names. Building constructs the network
through MindFormers' ``build_network`` (no forward, so no CPU stand-ins are needed), then checks
that the cells that got adapters are the ones the pet_config names and that only adapter
parameters train.
"""
import glob
import inspect
import os
import re
from fnmatch import fnmatch

import pytest

from mindformers.core.context.validators import execute_validator
from mindformers.models.build_model import build_network
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister
from mindformers_lora_ext import registry
from mindformers_lora_ext.config import ALL_LINEAR
from conftest import ROOT, mindformers_context

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))

# legacy (use_legacy: True) LlamaConfig keys
LEGACY_SHRINK = dict(seq_length=16, hidden_size=32, num_layers=2, num_heads=2, vocab_size=64,
                     multiple_of=16, compute_dtype="float32", param_init_type="float32",
                     use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True)
# mcore (use_legacy: False) keys, HF names as MindFormers' Qwen3/Qwen3-MoE/DeepseekV3 configs take
# them. A key is set only when the YAML or the model's config class gives it a non-null value, so
# e.g. a dense Qwen3 gets no expert count. 4 query heads over 2 kv heads keep GQA; 4 experts, top-2.
MCORE_SHRINK = dict(
    num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=64, vocab_size=64, max_position_embeddings=16,
    # MoE (Qwen3-MoE: num_experts; DeepSeek-V3: n_routed_experts, its expert groups, its first
    # dense layers, its shared experts' size)
    num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1, first_k_dense_replace=1,
    # MLA (DeepSeek-V3)
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    # pipeline layout of the full-size configs (offset lists are per pipeline stage)
    offset=0, pp_interleave_num=1, router_dense_type="float32")
# MindFormers' own keys, which every mcore model config takes
MCORE_ALWAYS = dict(seq_length=16, params_dtype="float32", compute_dtype="float32",
                    layernorm_compute_dtype="float32", softmax_compute_dtype="float32",
                    rotary_dtype="float32")


def shrink(model_config, use_legacy):
    """Shrink ``model_config`` in place (legacy or mcore key names)."""
    if use_legacy:
        model_config.update(LEGACY_SHRINK)
        return
    config_cls = MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, model_config.model_type)
    signature = inspect.signature(config_cls.__init__).parameters
    defaults = {name: param.default for name, param in signature.items()}
    for key, value in MCORE_SHRINK.items():
        # null in the YAML (or as the class default) switches a feature off, e.g. q_lora_rank: keep it
        if model_config.get(key, defaults.get(key)) is not None:
            model_config[key] = value
    always = dict(MCORE_ALWAYS)
    if model_config.get("use_attn_mask_compression"):
        del always["seq_length"]  # MindFormers wants > 2048 with its compressed 2048x2048 mask
    model_config.update(always)


def _matches(name, spec):
    """The README's rule, stated independently of tuners/targeting.py: a regex matches the whole
    name, a list item the name or its trailing dotted components."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == item or name.endswith("." + item) for item in spec)


def _adapted_cells(network, globs):
    """Names of the cells holding trainable parameters, checked to be adapter parameters
    (``<cell>.<adapter attribute>``; for mcore, the name of the cell's base weight minus
    ``.weight``)."""
    trainable = network.trainable_params()
    assert trainable, "nothing trains"
    frozen_wrongly = [p.name for p in trainable if not any(fnmatch(p.name, g) for g in globs)]
    assert not frozen_wrongly, f"non-adapter parameters train: {frozen_wrongly[:8]}"
    return sorted({p.name.rsplit(".", 1)[0] for p in trainable})


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_validates_and_builds_shrunken(path):
    cfg = MindFormerConfig(path)
    execute_validator(cfg)  # build_context's checks of the top-level keys (run_mode, modes, ...)
    pet = cfg.model.model_config.pet_config
    config_cls = registry.pet_type_config_class(pet.pet_type)
    assert config_cls is not None, f"{path}: pet_type {pet.pet_type!r} is not ours"
    pet_config = config_cls.from_pet_config(pet)
    use_legacy = cfg.get("use_legacy", True)
    assert isinstance(use_legacy, bool), f"{path}: use_legacy = {use_legacy!r}"
    with mindformers_context(use_legacy):
        shrink(cfg.model.model_config, use_legacy)
        net = build_network(cfg.model)
    size = sum(p.size for p in net.get_parameters())
    assert size < 500_000, f"{path}: the shrunken network still has {size} parameters: a key not shrunk?"
    cells = _adapted_cells(net, pet_config.adapter_globs())  # e.g. *.lora_A, *.vera_lambda_b
    targets, excluded = pet_config.target_modules, pet_config.exclude_layers
    if targets != ALL_LINEAR:
        wrong = [c for c in cells if not _matches(c, targets) or _matches(c, excluded)]
        assert not wrong, f"adapted cells outside target_modules {targets!r}: {wrong}"
    if isinstance(targets, list):  # every named projection got adapters somewhere
        unused = [t for t in targets if not any(_matches(c, [t]) for c in cells)]
        assert not unused, f"target_modules entries {unused} adapted no cell; adapted: {cells}"
