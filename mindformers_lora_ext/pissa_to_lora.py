"""PiSSA / OLoRA / CorDA / LoRA-GA adapter -> plain LoRA adapter for the original (not residual) base model.

PiSSA, OLoRA, CorDA and LoRA-GA start from A0, B0 taken out of W: training runs on the residual
W_res = W - s B0 A0, so their adapter only makes sense on W_res. Since
W_res + s B A = W + s [B, -B0] [A; A0], the same network is W plus a plain LoRA of rank 2r whose
A' = [A; A0] [2r, in] and B' = [B, -B0] [out, 2r], with the scaling s kept: alpha doubles
(rsLoRA: times sqrt 2) as the rank doubles. A DoRA magnitude is unchanged: the adapted weight
is the same matrix. This is what HF PEFT's ``path_initial_model_for_weight_conversion`` does.

Works on adapter directories (PEFT layout): the trained one and the initial one that
``AdapterCheckpoint`` writes to ``<output_dir>/initial`` at the start of such a run.
"""
import math
import os
from typing import Dict, Tuple

import numpy as np

from mindformers_lora_ext.adapter_files import read_adapter_dir, resolve_adapter_dir, write_adapter_dir

INITIAL_DIR = "initial"  # AdapterCheckpoint's copy of the adapter before the first step
# the init_lora_weights values that replace W by W - s B0 A0 (pissa_niter_<N> included)
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")


def is_convertible(init) -> bool:
    """True for an ``init_lora_weights`` that takes A0, B0 out of the base weight."""
    return isinstance(init, str) and init.startswith(CONVERTIBLE_INITS)


def converted_config(config: dict) -> dict:
    """The adapter_config.json of the rank-2r plain LoRA equivalent of a PiSSA/OLoRA ``config``."""
    if config.get("peft_type") != "LORA" or not is_convertible(config.get("init_lora_weights")):
        raise ValueError(f"adapter_config.json peft_type = {config.get('peft_type')!r}, init_lora_weights = "
                         f"{config.get('init_lora_weights')!r}: only a LoRA adapter initialised from the base "
                         f"weights (init_lora_weights pissa, pissa_niter_<N>, olora, corda, lora_ga) needs "
                         f"converting")
    alpha_factor = math.sqrt(2.0) if config.get("use_rslora") else 2.0
    out = dict(config)
    out.update(r=2 * config["r"], lora_alpha=alpha_factor * config["lora_alpha"], init_lora_weights=True,
               rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
               alpha_pattern={k: alpha_factor * v for k, v in (config.get("alpha_pattern") or {}).items()})
    if config.get("mindformers_pet_type") in CONVERTIBLE_INITS:  # presets that fix the init
        out["mindformers_pet_type"] = "lora_ext"
    for key in ("corda_config", "lora_ga_config"):  # their init is done: a plain LoRA has none
        out.pop(key, None)
    return out


def converted_tensors(trained: Dict[str, np.ndarray], initial: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """PEFT-keyed tensors of the rank-2r adapter: ``lora_A`` stacked over A0, ``lora_B`` next to
    -B0; every other tensor (DoRA magnitude, modules_to_save) as trained."""
    if sorted(trained) != sorted(initial):
        missing = sorted(set(trained) ^ set(initial))
        raise ValueError(f"the trained and the initial adapter hold different tensors (first: {missing[0]}): "
                         f"not the same run?")
    out = {}
    for key, value in trained.items():
        start = initial[key]
        if value.shape != start.shape:
            raise ValueError(f"tensor {key}: trained {value.shape}, initial {start.shape}: not the same run?")
        if key.endswith(".lora_A.weight"):
            out[key] = np.concatenate([value, start], axis=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = np.concatenate([value, -start], axis=1)
        else:
            out[key] = value
    return out


def convert_adapter_dir(adapter: str, out: str, initial: str = None) -> Tuple[str, str]:
    """Write the plain LoRA equivalent of the PiSSA/OLoRA adapter at ``adapter`` (a directory or
    a checkpoint root) to ``out``; ``initial`` defaults to ``<root>/initial`` next to the step
    directories. Returns (adapter dir read, initial dir read)."""
    directory = resolve_adapter_dir(adapter)
    if initial is None:  # beside the step directory (also when ``adapter`` is the root)
        initial = os.path.join(os.path.dirname(directory), INITIAL_DIR)
    if not os.path.isdir(initial):
        raise FileNotFoundError(f"no initial adapter at {initial}: AdapterCheckpoint writes it when a "
                                f"PiSSA/OLoRA run starts; give its path with --initial")
    config, trained = read_adapter_dir(directory)
    initial_config, start = read_adapter_dir(initial)
    if initial_config != config:
        raise ValueError(f"{initial} and {directory} have different adapter_config.json: not the same run?")
    write_adapter_dir(out, converted_tensors(trained, start), converted_config(config))
    return directory, initial
