"""Fold LoRA-family adapters into a MindSpore checkpoint, giving a plain base-model checkpoint.

The input is a checkpoint MindFormers saved for one of our LoRA pet types (base weights plus
``<cell>.lora_A``/``.lora_B``/... parameters), or a base checkpoint plus separate adapter
tensors. Each adapted ``<cell>.weight`` is replaced by its merged value (the variant's merge
math in tuners/lora.py) and the adapter parameters are dropped. For PiSSA/OLoRA the base
weights must be the residual ones saved with the adapter, not the original model.
"""
import os
from typing import Dict, Optional

import numpy as np
import mindspore as ms

from mindformers_lora_ext.tuners.base_layer import to_numpy
from mindformers_lora_ext.tuners.lora import merged_weight
from mindformers_lora_ext import _boot

ADAPTER_SUFFIXES = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector", "lora_active")


def _format(path):
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


def merge_checkpoint(src: str, out: str, pet_config,
                     adapter: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, int]:
    """Write ``out`` = checkpoint ``src`` with its LoRA adapters merged; returns counts.

    ``pet_config``: our LoRA-family config object (gives each cell's scaling and variant).
    ``adapter``: adapter tensors by parameter name (``<cell>.lora_A`` ...); default: the ones
    in ``src``. ``.ckpt`` and ``.safetensors`` are chosen by file extension. ``out`` is
    written to a temporary name and renamed, so a failure never leaves a partial file.
    """
    params = ms.load_checkpoint(src, format=_format(src))
    tensors = {name: to_numpy(p) for name, p in params.items()
               if name.rsplit(".", 1)[-1] in ADAPTER_SUFFIXES}
    tensors.update(adapter or {})
    cells = sorted(name[: -len(".lora_A")] for name in tensors if name.endswith(".lora_A"))
    if not cells:
        raise ValueError(f"{src}: no '<cell>.lora_A' tensor found; nothing to merge")
    merged = 0
    for cell in cells:
        if f"{cell}.weight" not in params:
            raise KeyError(f"{src} has no base weight {cell}.weight for adapter {cell}.lora_A")
        active = tensors.get(f"{cell}.lora_active")
        if active is not None and float(active) == 0.0:
            continue  # saved after merge(): the weight already holds the adapter
        _merge_cell(params, tensors, cell, pet_config.module_options(cell), pet_config.use_dora)
        merged += 1
    kept = [{"name": name, "data": p} for name, p in params.items()
            if name.rsplit(".", 1)[-1] not in ADAPTER_SUFFIXES]
    fmt = _format(out)
    # MindSpore appends the format's extension to a name without it: keep it at the end.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.{fmt}")
    try:
        ms.save_checkpoint(kept, tmp, format=fmt)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"merged_cells": merged, "tensors_written": len(kept)}


def _merge_cell(params, tensors, cell, spec, use_dora):
    weight = params[f"{cell}.weight"]
    arrays = {name.rsplit(".", 1)[-1]: value for name, value in tensors.items()
              if name.rsplit(".", 1)[0] == cell}
    out_dim, in_dim = arrays["lora_B"].shape[0], arrays["lora_A"].shape[1]
    data = to_numpy(weight)
    if data.shape == (out_dim, in_dim):  # MindFormers Linear/Dense default: [out, in]
        transposed = False
    elif data.shape == (in_dim, out_dim):
        transposed = True
    else:
        raise ValueError(f"{cell}.weight has shape {data.shape}; adapter expects "
                         f"({out_dim}, {in_dim}) from lora_B {arrays['lora_B'].shape} and "
                         f"lora_A {arrays['lora_A'].shape}")
    if arrays["lora_A"].shape[0] != spec.rank:
        raise ValueError(f"{cell}.lora_A has rank {arrays['lora_A'].shape[0]} but the pet_config "
                         f"gives rank {spec.rank} for {cell}: wrong config for this checkpoint?")
    folded = merged_weight(data.T if transposed else data, arrays, spec.scaling, use_dora)
    weight.set_data(ms.Tensor((folded.T if transposed else folded).astype(np.float32), weight.dtype))
    if "lora_B_bias" in arrays:
        bias = params.get(f"{cell}.bias")
        if bias is None:
            raise KeyError(f"{cell}.lora_B_bias needs a base bias {cell}.bias to merge into")
        new_bias = to_numpy(bias) + spec.scaling * arrays["lora_B_bias"]
        bias.set_data(ms.Tensor(new_bias.astype(np.float32), bias.dtype))


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
