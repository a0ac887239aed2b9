"""HF PEFT's adapter file format: ``adapter_config.json`` (safetensors weights: issue 4)."""
import json
import os
import tempfile

from mindformers_lora_ext.naming import hf_module_name


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
    }


def write_adapter_config(path: str, config, adapter_names) -> None:
    """Write ``adapter_config.json`` atomically (also over a read-only older file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".adapter_config.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(peft_config_dict(config, adapter_names), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
