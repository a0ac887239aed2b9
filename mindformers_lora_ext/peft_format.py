"""HF PEFT's adapter format for our pet types: config fields and tensor names, both ways.

HF module names come from an :class:`hf_map.HfMap` (the model's own mapping; legacy Llama's
table when none is given): a MindFormers cell fusing several HF modules (mcore ``linear_qkv``,
``linear_fc1``, routed experts) is written as one PEFT adapter per HF module, split by output
rows, and fused back on read. Our own metadata goes to adapter_files' sidecar, not to
adapter_config.json, so PEFT loads our directories without a warning.

Tensor keys (PEFT's ``get_peft_model_state_dict`` layout, HF module names):
``base_model.model.<hf module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r],
``.lora_B.bias`` [out] (``lora_bias``), ``.lora_magnitude_vector`` [out] (DoRA);
VeRA ``.vera_lambda_b`` [out], ``.vera_lambda_d`` [r] and the model-level ``base_model.vera_A``
[r, in_max], ``base_model.vera_B`` [out_max, r] (``save_projection``); LoHa ``.hada_w1_a``
[out, r], ``.hada_w1_b`` [r, in], ``.hada_w2_a``, ``.hada_w2_b``; LoKr ``.lokr_w1`` (or
``.lokr_w1_a``, ``.lokr_w1_b``), ``.lokr_w2`` (or ``.lokr_w2_a``, ``.lokr_w2_b``) -- PEFT's names,
shapes and orientations, our parameter attributes carry the same names.
``modules_to_save`` cells as ``base_model.model.<hf module>.<attr>`` (whole tensors); trainable
token rows as ``base_model.model.<hf embedding>.token_adapter.trainable_tokens_delta`` [n, h]
(names through the HfMap's ``params``).
Our parameters ``<cell>.lora_active`` / ``<cell>.adapter_active`` are run state, not saved.
"""
import json
import os
from typing import Dict

import numpy as np

from mindformers_lora_ext.adapter_files import (HF_MAP_KEY, META_NAME, NOT_PEFT_KEY, PET_TYPE_KEY, AdapterFileError,
                                                read_adapter_dir, resolve_adapter_dir, split_config,
                                                write_adapter_dir, write_text_atomic)
from mindformers_lora_ext.hf_map import HfMap, HfMapError, legacy_map
from mindformers_lora_ext.naming import (MF_TO_HF_LLAMA, hf_module_name, hf_parameter_name,
                                         mf_module_name, mf_parameter_name)

PEFT_PREFIX = "base_model.model."
TOKEN_ADAPTER = ".token_adapter."  # PEFT's trainable token rows: <embedding>.token_adapter.trainable_tokens_delta
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


def _names(names, cells) -> HfMap:
    return names if isinstance(names, HfMap) else legacy_map(list(cells))


def to_peft_tensors(arrays: Dict[str, np.ndarray], config=None, names: HfMap = None) -> Dict[str, np.ndarray]:
    """Our parameter name -> array, as PEFT keys -> arrays (``names``: the HF map; legacy Llama's
    table if None). A fused cell's tensors are split into one per HF module; a config with
    ``peft_arrays_out`` (AdaLoRA's) converts its own."""
    hook = _hook(config, "peft_arrays_out")
    if hook:
        return hook(arrays, _names(names, {n.rpartition(".")[0] for n in arrays}))
    if names is None:
        return {peft_key(name): value for name, value in arrays.items()}
    _structured_methods()
    out = {}
    for name, value in arrays.items():
        cell, _, attr = name.rpartition(".")
        if name in _MODEL_LEVEL:
            out[_MODEL_LEVEL[name]] = value
        elif attr in _TO_PEFT and cell in names.cells:
            for module, part in names.split(cell, attr, value).items():
                out[f"{PEFT_PREFIX}{module}.{_TO_PEFT[attr]}"] = part
        else:
            out[PEFT_PREFIX + names.hf_parameter(name)] = value
    return out


def from_peft_tensors(tensors: Dict[str, np.ndarray], config=None, names: HfMap = None) -> Dict[str, np.ndarray]:
    """PEFT key -> array, renamed to our parameter names and fused per cell (inverse of
    :func:`to_peft_tensors`); an HF module no cell of ``names`` computes keeps its legacy name
    (so the model's load reports it as unexpected)."""
    hook = _hook(config, "peft_arrays_in")
    if hook:
        return hook(tensors, names)
    if names is None:
        return {mf_param_name(key): value for key, value in tensors.items()}
    _structured_methods()
    cells = names.mf_cells()
    out, parts = {}, {}
    for key, value in tensors.items():
        if key in _MODEL_LEVEL_FROM_PEFT:
            out[_MODEL_LEVEL_FROM_PEFT[key]] = value
            continue
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"tensor key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter key")
        rest = key[len(PEFT_PREFIX):]
        suffix = next((sfx for sfx in _FROM_PEFT if rest.endswith("." + sfx)), None)
        module = rest[: -len(suffix) - 1] if suffix else None
        if module in cells:
            parts.setdefault((cells[module], _FROM_PEFT[suffix]), {})[module] = value
        elif suffix:
            out[f"{mf_module_name(module)}.{_FROM_PEFT[suffix]}"] = value
        else:
            out[names.mf_parameter(rest)] = value
    for (cell, attr), by_module in parts.items():
        out[f"{cell}.{attr}"] = names.fuse(cell, attr, by_module)
    return out


def _common_fields(config, names: HfMap) -> dict:
    """The ``adapter_config.json`` fields every PEFT config shares, plus ours (``mindformers_*``,
    which adapter_files writes to its sidecar)."""
    saved = config.modules_to_save
    saved_hf = None
    if saved:
        whole = [hf for hf in names.params.values() if TOKEN_ADAPTER not in hf]
        saved_hf = sorted({hf.rpartition(".")[0] for hf in whole}) if whole else [hf_module_name(n) for n in saved]
    return {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "modules_to_save": saved_hf,
        "inference_mode": True,
        PET_TYPE_KEY: config.pet_type,
        HF_MAP_KEY: names.to_json(),
    }


def peft_config_dict(config, names) -> dict:
    """The PEFT config (``LoraConfig``, ``VeraConfig``, ``LoHaConfig``, ``LoKrConfig`` or
    ``AdaLoraConfig`` fields) for our ``config`` adapting the cells of ``names`` (an HfMap, or a
    list of legacy Llama cell names): the shared fields plus the config class's ``peft_fields``
    (real HF module names, patterns resolved per module)."""
    names = _names(names, names)
    return dict(_common_fields(config, names), **config.peft_fields(names))


def hf_map_of(data: dict):
    """The HfMap a directory's config recorded (ours), or None (HF PEFT's, or ours before it)."""
    return HfMap.from_json(data[HF_MAP_KEY]) if data.get(HF_MAP_KEY) else None


def mf_module_namer(names):
    """HF module name (full, or a last component such as ``q_proj``) -> our cell name (full, or
    a last component such as ``linear_qkv``), through ``names`` (None: legacy Llama's table)."""
    if names is None:
        return _mf_module
    cells = names.mf_cells()
    leaves = {}
    for module, cell in cells.items():
        leaves.setdefault(module.rsplit(".", 1)[-1], set()).add(cell.rsplit(".", 1)[-1])

    def namer(name):
        if name in cells:
            return cells[name]
        if len(leaves.get(name, ())) == 1:
            return next(iter(leaves[name]))
        return _mf_module(name)
    return namer


def _per_cell(pattern: dict, module, key: str) -> dict:
    """A PEFT rank/alpha pattern in our cell names; modules of one fused cell must agree."""
    out, seen = {}, {}
    for hf, value in (pattern or {}).items():
        cell = module(hf)
        if cell in out and out[cell] != value:
            raise ValueError(f"adapter_config.json {key}: {seen[cell]} = {out[cell]} but {hf} = {value}, "
                             f"and MindFormers computes both in one cell {cell!r}, which takes one value")
        out[cell], seen[cell] = value, hf
    return out


def _mf_module(name):
    """A PEFT module name (full, or a last component such as ``q_proj``) in MindFormers' names."""
    return _HF_LEAF_TO_MF.get(name, mf_module_name(name))


def _structured_from_peft(data: dict, config_cls, module) -> dict:
    """Our ``pet_config`` mapping for a PEFT VeRA / LoHa / LoKr config dict."""
    peft_type = data["peft_type"]
    if data.get("fan_in_fan_out"):
        raise ValueError(f"adapter_config.json fan_in_fan_out = true (GPT-2 Conv1D layout) is not "
                         f"supported for {peft_type}: our weights are [out, in]")
    if data.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json bias = {data['bias']!r}: only 'none' is supported")
    ours = PET_TYPE_KEY in data
    if peft_type == "VERA" and not ours and not data.get("save_projection", True):
        raise ValueError("adapter_config.json is an HF PEFT VeRA adapter saved with save_projection = "
                         "false: its vera_A / vera_B come from torch's random generator, which is not "
                         "reproduced here. Re-save it in PEFT with save_projection=True.")

    def names(value):
        return sorted({module(t) for t in value}) if isinstance(value, list) else value

    fields = config_cls.pet_fields_from_peft(data, module) if config_cls.PEFT_TYPE == "ADALORA" \
        else config_cls.pet_fields_from_peft(data)
    pet = dict(fields, pet_type=data.get(PET_TYPE_KEY, config_cls.pet_type_name))
    pet.update({
        "target_modules": names(data.get("target_modules")),
        "exclude_layers": names(data.get("exclude_modules")),
        "layers_to_transform": data.get("layers_to_transform"),
        "layers_pattern": data.get("layers_pattern"),
        "modules_to_save": [module(m) for m in data["modules_to_save"]] if data.get("modules_to_save") else None,
    })
    for key in ("rank_pattern", "alpha_pattern"):
        if key in config_cls.DEFAULTS and pet.get(key) is None:  # else the class converted it (AdaLoRA)
            pet[key] = _per_cell(data.get(key), module, key)
    return {k: v for k, v in pet.items() if v is not None}


def pet_config_from_peft(data: dict, names: HfMap = None) -> dict:
    """Our ``pet_config`` mapping for a PEFT config dict (ours or HF PEFT's): ``LoraConfig``,
    ``VeraConfig``, ``LoHaConfig``, ``LoKrConfig`` or ``AdaLoraConfig``; HF module names through
    ``names`` (default: the map the directory recorded, else legacy Llama's table)."""
    from mindformers_lora_ext.config import AdaLoraConfig  # pylint: disable=import-outside-toplevel
    names = names if names is not None else hf_map_of(data)
    module = mf_module_namer(names)
    by_type = {cls.PEFT_TYPE: cls for cls in _structured_methods() + (AdaLoraConfig,)}
    if data.get("peft_type") in by_type:
        return _structured_from_peft(data, by_type[data["peft_type"]], module)
    if data.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json peft_type = {data.get('peft_type')!r}: expected one of "
                         f"{['LORA'] + sorted(by_type)}")
    if data.get("fan_in_fan_out"):
        raise ValueError("adapter_config.json fan_in_fan_out = true (GPT-2 Conv1D layout) is not "
                         "supported: our weights are [out, in]")
    if data.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json bias = {data['bias']!r}: only 'none' is supported")

    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = sorted({module(t) for t in targets})
    pet = {
        "pet_type": data.get(PET_TYPE_KEY, "lora_ext"),
        "lora_rank": data["r"],
        "lora_alpha": data.get("lora_alpha", 8),
        "lora_dropout": data.get("lora_dropout", 0.0),
        "target_modules": targets,
        "use_rslora": bool(data.get("use_rslora", False)),
        "use_dora": bool(data.get("use_dora", False)),
        "lora_bias": bool(data.get("lora_bias", False)),
        "init_lora_weights": data.get("init_lora_weights", True),
        "rank_pattern": _per_cell(data.get("rank_pattern"), module, "rank_pattern"),
        "alpha_pattern": _per_cell(data.get("alpha_pattern"), module, "alpha_pattern"),
        "layers_to_transform": data.get("layers_to_transform"),
        "layers_pattern": data.get("layers_pattern"),
        "modules_to_save": [module(m) for m in data["modules_to_save"]] if data.get("modules_to_save") else None,
        "trainable_token_indices": _token_indices_from_peft(data.get("trainable_token_indices"), names),
    }
    init = pet["init_lora_weights"]
    for name, method in (("eva_config", "eva"), ("corda_config", "corda"), ("lora_ga_config", "lora_ga")):
        if init == method and data.get(name) is not None:
            pet[name] = dict(data[name])
    if names is not None and any(cell.per_module for cell in names.cells.values()):
        pet["fused_cells"] = "per_hf_module"
    return {k: v for k, v in pet.items() if v is not None}


def _token_indices_from_peft(value, names):
    """PEFT's ``trainable_token_indices`` in our terms: a list stays (the input embedding); dict
    keys (HF module names, matched by their end as PEFT does) become our embedding cells."""
    if not isinstance(value, dict):
        return value
    cells = {hf[: -len(TOKEN_ADAPTER + "trainable_tokens_delta")]: mf.rpartition(".")[0]
             for mf, hf in (names.params.items() if names is not None else ()) if TOKEN_ADAPTER in hf}
    out = {}
    for key, ids in value.items():
        found = [cell for hf, cell in cells.items() if hf == key or hf.endswith("." + key)]
        out[found[0] if len(found) == 1 else _mf_module(key)] = list(ids)
    return out


_WARNED = set()


def save_adapter(model, directory: str, extra=None) -> str:
    """Write ``model``'s adapter (an AdapterModel) to ``directory`` in PEFT's layout, atomically;
    one that PEFT cannot hold exactly in MindFormers' names, with the reason (adapter_files)."""
    pet, arrays = model.config.pet_config, model.adapter_state_dict()
    try:
        names = model.hf_map()
        return write_adapter_dir(directory, to_peft_tensors(arrays, pet, names), peft_config_dict(pet, names), extra)
    except HfMapError as exc:
        reason = str(exc)
    if reason not in _WARNED:
        _WARNED.add(reason)
        from mindformers.tools.logger import logger  # pylint: disable=import-outside-toplevel
        logger.warning("mindformers-lora-ext: adapters are saved in MindFormers' names, not as an HF PEFT "
                       "directory: %s", reason)
    config = dict(peft_config_dict(pet, model.adapter_names), **{NOT_PEFT_KEY: reason, HF_MAP_KEY: None})
    return write_adapter_dir(directory, to_peft_tensors(arrays, pet), config, extra)


def check_peft(config: dict, directory: str) -> None:
    """Raise naming the reason if ``directory`` (its read config) is not an HF PEFT adapter."""
    if config.get(NOT_PEFT_KEY):
        raise AdapterFileError(f"{directory} cannot be exported to HF PEFT: {config[NOT_PEFT_KEY]}")


def load_adapter(model, path: str) -> str:
    """Load the adapter at ``path`` (a directory, or a checkpoint root) into ``model``; returns
    the directory read. Every tensor must match by name and shape (after fusing per cell)."""
    directory = resolve_adapter_dir(path)
    config, tensors = read_adapter_dir(directory)
    if config.get("peft_type") == "VERA" and PET_TYPE_KEY not in config \
            and _MODEL_LEVEL["vera_A"] not in tensors:
        raise AdapterFileError(f"{directory}: an HF PEFT VeRA adapter without its projections "
                               f"(saved with save_projection = false): its vera_A / vera_B come from "
                               f"torch's random generator, which is not reproduced here")
    try:
        names = None if config.get(NOT_PEFT_KEY) else model.hf_map()
        arrays = from_peft_tensors(tensors, model.config.pet_config, names)
    except HfMapError as exc:
        raise AdapterFileError(f"{directory}: {exc}") from exc
    file_config = None
    if getattr(model.config.pet_config, "init_lora_weights", None) == "eva":  # ranks and alphas per cell
        from mindformers_lora_ext.registry import pet_type_config_class  # pylint: disable=import-outside-toplevel
        pet = pet_config_from_peft(config, names if names is not None else None)
        file_config = pet_type_config_class(pet["pet_type"])(**{k: v for k, v in pet.items() if k != "pet_type"})
    model.load_adapter_state_dict(arrays, source=os.path.abspath(directory), file_config=file_config)
    return directory


def write_adapter_config(path: str, config, names) -> None:
    """Write ``adapter_config.json`` (and our sidecar beside it) atomically: PetModel's
    ``save_pet_config`` hook."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    peft, ours = split_config(peft_config_dict(config, names))
    write_text_atomic(path, json.dumps(peft, indent=2, sort_keys=True))
    write_text_atomic(os.path.join(directory, META_NAME), json.dumps(ours, indent=1, sort_keys=True))
