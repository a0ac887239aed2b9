"""HF PEFT's adapter format for our LoRA family: config fields and tensor names, both ways.

Tensor keys (PEFT's ``get_peft_model_state_dict`` layout, HF Llama module names):
``base_model.model.<hf module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` [out] (``lora_bias``), ``.lora_magnitude_vector`` [out] (DoRA);
``modules_to_save`` cells as ``base_model.model.<hf module>.<attr>`` (whole tensors).
Our parameter ``<cell>.lora_active`` is run state, not saved.
"""
import json
import os
from typing import Dict

import numpy as np

from mindformers_lora_ext.adapter_files import (read_adapter_dir, resolve_adapter_dir,
                                                write_adapter_dir, write_text_atomic)
from mindformers_lora_ext.naming import (MF_TO_HF_LLAMA, hf_module_name, hf_parameter_name,
                                         mf_module_name, mf_parameter_name)

PEFT_PREFIX = "base_model.model."
# our attribute -> PEFT's key suffix
_TO_PEFT = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias",
            "lora_magnitude_vector": "lora_magnitude_vector"}
_FROM_PEFT = {v: k for k, v in _TO_PEFT.items()}
# PEFT target_modules entries are last components: q_proj -> wq, gate_proj -> w1, ...
_HF_LEAF_TO_MF = {hf.rsplit(".", 1)[-1]: mf.rsplit(".", 1)[-1] for mf, hf in MF_TO_HF_LLAMA.items()}


def peft_key(mf_param: str) -> str:
    """``model.layers.0.attention.wq.lora_A`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    cell, _, attr = mf_param.rpartition(".")
    if attr in _TO_PEFT:
        return f"{PEFT_PREFIX}{hf_module_name(cell)}.{_TO_PEFT[attr]}"
    return PEFT_PREFIX + hf_parameter_name(mf_param)


def mf_param_name(key: str) -> str:
    """Inverse of :func:`peft_key`."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"tensor key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter key")
    rest = key[len(PEFT_PREFIX):]
    for suffix, attr in _FROM_PEFT.items():
        if rest.endswith("." + suffix):
            return f"{mf_module_name(rest[: -len(suffix) - 1])}.{attr}"
    return mf_parameter_name(rest)


def to_peft_tensors(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Our parameter name -> array, renamed to PEFT keys."""
    return {peft_key(name): value for name, value in arrays.items()}


def from_peft_tensors(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """PEFT key -> array, renamed to our parameter names."""
    return {mf_param_name(key): value for key, value in tensors.items()}


def peft_config_dict(config, adapter_names) -> dict:
    """The PEFT ``LoraConfig`` fields for a LoRA-family config adapting ``adapter_names``.

    ``target_modules`` lists real module names (HF Llama names where known), as PEFT needs.
    ``rank_pattern`` / ``alpha_pattern`` are resolved per adapted module and written with full
    HF module names (PEFT matches a full name exactly), so regexes need no translation.
    """
    targets = sorted({hf_module_name(n).rsplit(".", 1)[-1] for n in adapter_names})
    rank_pattern, alpha_pattern = {}, {}
    for name in adapter_names:
        spec = config.module_options(name)
        if spec.rank != config.lora_rank:
            rank_pattern[hf_module_name(name)] = spec.rank
        if spec.alpha != config.lora_alpha:
            alpha_pattern[hf_module_name(name)] = spec.alpha
    saved = config.modules_to_save
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": config.init_lora_weights,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "modules_to_save": [hf_module_name(n) for n in saved] if saved else None,
        "inference_mode": True,
        # ours, ignored by PEFT: the pet type that wrote it
        "mindformers_pet_type": config.pet_type,
    }


def pet_config_from_peft(data: dict) -> dict:
    """Our ``pet_config`` mapping for a PEFT ``LoraConfig`` dict (ours or HF PEFT's)."""
    if data.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json peft_type = {data.get('peft_type')!r}: only 'LORA' "
                         f"adapters are LoRA-family adapters")
    if data.get("fan_in_fan_out"):
        raise ValueError("adapter_config.json fan_in_fan_out = true (GPT-2 Conv1D layout) is not "
                         "supported: our weights are [out, in]")
    if data.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json bias = {data['bias']!r}: only 'none' is supported")

    def module(name):
        return _HF_LEAF_TO_MF.get(name, mf_module_name(name))

    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = sorted({module(t) for t in targets})
    pet = {
        "pet_type": data.get("mindformers_pet_type", "lora_ext"),
        "lora_rank": data["r"],
        "lora_alpha": data.get("lora_alpha", 8),
        "lora_dropout": data.get("lora_dropout", 0.0),
        "target_modules": targets,
        "use_rslora": bool(data.get("use_rslora", False)),
        "use_dora": bool(data.get("use_dora", False)),
        "lora_bias": bool(data.get("lora_bias", False)),
        "init_lora_weights": data.get("init_lora_weights", True),
        "rank_pattern": {module(k): v for k, v in (data.get("rank_pattern") or {}).items()},
        "alpha_pattern": {module(k): v for k, v in (data.get("alpha_pattern") or {}).items()},
        "layers_to_transform": data.get("layers_to_transform"),
        "layers_pattern": data.get("layers_pattern"),
        "modules_to_save": [module(m) for m in data["modules_to_save"]] if data.get("modules_to_save") else None,
    }
    return {k: v for k, v in pet.items() if v is not None}


def save_adapter(model, directory: str, extra=None) -> str:
    """Write ``model``'s adapter (an AdapterModel) to ``directory`` in PEFT's layout, atomically."""
    config = peft_config_dict(model.config.pet_config, model.adapter_names)
    return write_adapter_dir(directory, to_peft_tensors(model.adapter_state_dict()), config, extra)


def load_adapter(model, path: str) -> str:
    """Load the adapter at ``path`` (a directory, or a checkpoint root) into ``model``; returns
    the directory read. Every tensor must match by name and shape."""
    directory = resolve_adapter_dir(path)
    _, tensors = read_adapter_dir(directory)
    model.load_adapter_state_dict(from_peft_tensors(tensors), source=os.path.abspath(directory))
    return directory


def write_adapter_config(path: str, config, adapter_names) -> None:
    """Write ``adapter_config.json`` atomically (PetModel's ``save_pet_config`` hook)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(peft_config_dict(config, adapter_names), indent=2, sort_keys=True))
