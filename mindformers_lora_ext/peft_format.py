"""HF PEFT's adapter format for our pet types: config fields and tensor names, both ways.

Tensor keys (PEFT's ``get_peft_model_state_dict`` layout, HF Llama module names):
``base_model.model.<hf module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` [out] (``lora_bias``), ``.lora_magnitude_vector`` [out] (DoRA);
VeRA ``.vera_lambda_b`` [out], ``.vera_lambda_d`` [r] and the model-level ``base_model.vera_A``
[r, in_max], ``base_model.vera_B`` [out_max, r] (``save_projection``); LoHa ``.hada_w1_a``
[out, r], ``.hada_w1_b`` [r, in], ``.hada_w2_a``, ``.hada_w2_b``; LoKr ``.lokr_w1`` (or
``.lokr_w1_a``, ``.lokr_w1_b``), ``.lokr_w2`` (or ``.lokr_w2_a``, ``.lokr_w2_b``) -- PEFT's names,
shapes and orientations, our parameter attributes carry the same names.
``modules_to_save`` cells as ``base_model.model.<hf module>.<attr>`` (whole tensors).
Our parameters ``<cell>.lora_active`` / ``<cell>.adapter_active`` are run state, not saved.
"""
import json
import os
from typing import Dict

import numpy as np

from mindformers_lora_ext.adapter_files import (AdapterFileError, read_adapter_dir, resolve_adapter_dir,
                                                write_adapter_dir, write_text_atomic)
from mindformers_lora_ext.naming import (MF_TO_HF_LLAMA, hf_module_name, hf_parameter_name,
                                         mf_module_name, mf_parameter_name)

PEFT_PREFIX = "base_model.model."
# our attribute -> PEFT's key suffix
_TO_PEFT = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias",
            "lora_magnitude_vector": "lora_magnitude_vector"}
_FROM_PEFT = {v: k for k, v in _TO_PEFT.items()}
# model-level tensors (not under a cell): our parameter name -> PEFT key
_MODEL_LEVEL = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
_MODEL_LEVEL_FROM_PEFT = {v: k for k, v in _MODEL_LEVEL.items()}
# PEFT target_modules entries are last components: q_proj -> wq, gate_proj -> w1, ...
_HF_LEAF_TO_MF = {hf.rsplit(".", 1)[-1]: mf.rsplit(".", 1)[-1] for mf, hf in MF_TO_HF_LLAMA.items()}


def _structured_methods():
    """VeRA / LoHa / LoKr config classes (imported on first use: config imports MindFormers).
    Their tensor suffixes (PEFT's own attribute names) join the LoRA ones on first call."""
    from mindformers_lora_ext.config import STRUCTURED_METHODS  # pylint: disable=import-outside-toplevel
    if not _FROM_PEFT.keys() >= {v for cls in STRUCTURED_METHODS for v in cls.PEFT_TENSOR_SUFFIXES.values()}:
        for cls in STRUCTURED_METHODS:
            _TO_PEFT.update(cls.PEFT_TENSOR_SUFFIXES)
            _FROM_PEFT.update({v: k for k, v in cls.PEFT_TENSOR_SUFFIXES.items()})
    return STRUCTURED_METHODS


def peft_key(mf_param: str) -> str:
    """``model.layers.0.attention.wq.lora_A`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    if mf_param in _MODEL_LEVEL:
        return _MODEL_LEVEL[mf_param]
    _structured_methods()
    cell, _, attr = mf_param.rpartition(".")
    if attr in _TO_PEFT:
        return f"{PEFT_PREFIX}{hf_module_name(cell)}.{_TO_PEFT[attr]}"
    return PEFT_PREFIX + hf_parameter_name(mf_param)


def mf_param_name(key: str) -> str:
    """Inverse of :func:`peft_key`."""
    if key in _MODEL_LEVEL_FROM_PEFT:
        return _MODEL_LEVEL_FROM_PEFT[key]
    _structured_methods()
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"tensor key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter key")
    rest = key[len(PEFT_PREFIX):]
    for suffix, attr in _FROM_PEFT.items():
        if rest.endswith("." + suffix):
            return f"{mf_module_name(rest[: -len(suffix) - 1])}.{attr}"
    return mf_parameter_name(rest)


def _hook(config, name):
    return getattr(config, name) if callable(getattr(type(config), name, None)) else None


def to_peft_tensors(arrays: Dict[str, np.ndarray], config=None) -> Dict[str, np.ndarray]:
    """Our parameter name -> array, renamed to PEFT keys (a config with ``peft_arrays_out``,
    AdaLoRA's, converts its own)."""
    hook = _hook(config, "peft_arrays_out")
    if hook:
        return hook(arrays)
    return {peft_key(name): value for name, value in arrays.items()}


def from_peft_tensors(tensors: Dict[str, np.ndarray], config=None) -> Dict[str, np.ndarray]:
    """PEFT key -> array, renamed to our parameter names (inverse of :func:`to_peft_tensors`)."""
    hook = _hook(config, "peft_arrays_in")
    if hook:
        return hook(tensors)
    return {mf_param_name(key): value for key, value in tensors.items()}


def _common_fields(config, adapter_names) -> dict:
    """The ``adapter_config.json`` fields every PEFT config shares."""
    saved = config.modules_to_save
    return {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "modules_to_save": [hf_module_name(n) for n in saved] if saved else None,
        "inference_mode": True,
        # ours, ignored by PEFT: the pet type that wrote it
        "mindformers_pet_type": config.pet_type,
    }


def peft_config_dict(config, adapter_names) -> dict:
    """The PEFT config (``LoraConfig``, ``VeraConfig``, ``LoHaConfig``, ``LoKrConfig`` or
    ``AdaLoraConfig`` fields) for our ``config`` adapting ``adapter_names``: the shared fields
    plus the config class's ``peft_fields`` (real HF module names, patterns resolved per module).
    """
    return dict(_common_fields(config, adapter_names), **config.peft_fields(adapter_names))


def _mf_module(name):
    """A PEFT module name (full, or a last component such as ``q_proj``) in MindFormers' names."""
    return _HF_LEAF_TO_MF.get(name, mf_module_name(name))


def _structured_from_peft(data: dict, config_cls) -> dict:
    """Our ``pet_config`` mapping for a PEFT VeRA / LoHa / LoKr config dict."""
    peft_type = data["peft_type"]
    if data.get("fan_in_fan_out"):
        raise ValueError(f"adapter_config.json fan_in_fan_out = true (GPT-2 Conv1D layout) is not "
                         f"supported for {peft_type}: our weights are [out, in]")
    if data.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json bias = {data['bias']!r}: only 'none' is supported")
    ours = "mindformers_pet_type" in data
    if peft_type == "VERA" and not ours and not data.get("save_projection", True):
        raise ValueError("adapter_config.json is an HF PEFT VeRA adapter saved with save_projection = "
                         "false: its vera_A / vera_B come from torch's random generator, which is not "
                         "reproduced here. Re-save it in PEFT with save_projection=True.")

    def names(value):
        return sorted({_mf_module(t) for t in value}) if isinstance(value, list) else value

    pet = dict(config_cls.pet_fields_from_peft(data), pet_type=data.get("mindformers_pet_type",
                                                                         config_cls.pet_type_name))
    pet.update({
        "target_modules": names(data.get("target_modules")),
        "exclude_layers": names(data.get("exclude_modules")),
        "layers_to_transform": data.get("layers_to_transform"),
        "layers_pattern": data.get("layers_pattern"),
        "modules_to_save": [_mf_module(m) for m in data["modules_to_save"]] if data.get("modules_to_save") else None,
    })
    for key in ("rank_pattern", "alpha_pattern"):
        if key in config_cls.DEFAULTS and pet.get(key) is None:  # else the class converted it (AdaLoRA)
            pet[key] = {_mf_module(k): v for k, v in (data.get(key) or {}).items()}
    return {k: v for k, v in pet.items() if v is not None}


def pet_config_from_peft(data: dict) -> dict:
    """Our ``pet_config`` mapping for a PEFT config dict (ours or HF PEFT's): ``LoraConfig``,
    ``VeraConfig``, ``LoHaConfig`` or ``LoKrConfig``."""
    from mindformers_lora_ext.config import AdaLoraConfig  # pylint: disable=import-outside-toplevel
    by_type = {cls.PEFT_TYPE: cls for cls in _structured_methods() + (AdaLoraConfig,)}
    if data.get("peft_type") in by_type:
        return _structured_from_peft(data, by_type[data["peft_type"]])
    if data.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json peft_type = {data.get('peft_type')!r}: expected one of "
                         f"{['LORA'] + sorted(by_type)}")
    if data.get("fan_in_fan_out"):
        raise ValueError("adapter_config.json fan_in_fan_out = true (GPT-2 Conv1D layout) is not "
                         "supported: our weights are [out, in]")
    if data.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json bias = {data['bias']!r}: only 'none' is supported")

    module = _mf_module
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
    return write_adapter_dir(directory, to_peft_tensors(model.adapter_state_dict(), model.config.pet_config),
                             config, extra)


def load_adapter(model, path: str) -> str:
    """Load the adapter at ``path`` (a directory, or a checkpoint root) into ``model``; returns
    the directory read. Every tensor must match by name and shape."""
    directory = resolve_adapter_dir(path)
    config, tensors = read_adapter_dir(directory)
    if config.get("peft_type") == "VERA" and "mindformers_pet_type" not in config \
            and _MODEL_LEVEL["vera_A"] not in tensors:
        raise AdapterFileError(f"{directory}: an HF PEFT VeRA adapter without its projections "
                               f"(saved with save_projection = false): its vera_A / vera_B come from "
                               f"torch's random generator, which is not reproduced here")
    model.load_adapter_state_dict(from_peft_tensors(tensors, model.config.pet_config),
                                  source=os.path.abspath(directory))
    return directory


def write_adapter_config(path: str, config, adapter_names) -> None:
    """Write ``adapter_config.json`` atomically (PetModel's ``save_pet_config`` hook)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(peft_config_dict(config, adapter_names), indent=2, sort_keys=True))
