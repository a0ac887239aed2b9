"""Fold adapters into base weights, giving plain base-model checkpoints.

Each adapted ``<cell>.weight`` (and ``<cell>.bias`` with ``lora_bias``) gets its merged value
from the method's merge math (LoRA variants: tuners/lora.py; VeRA, LoHa, LoKr: the ``*Math``
class of tuners/vera.py, loha.py, lokr.py); adapter tensors are dropped. Sources: a checkpoint
MindFormers saved for a run with one of our pet types (base + ``<cell>.lora_A`` ...), or a base
checkpoint plus adapter tensors (e.g. a PEFT adapter directory). For PiSSA/OLoRA the base
weights must be the residual ones saved with the adapter, not the original model. VeRA
projections missing from the tensors (``save_projection: false``) are regenerated from
``projection_prng_key``.
"""
import json
import os
import struct
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import mindspore as ms
from safetensors import safe_open

from mindformers_lora_ext.config import (AdaLoraConfig, LohaConfig, LokrConfig, LoraExtConfig, VeraConfig,
                                         lora_scaling)
from mindformers_lora_ext.tuners.adalora import AdaLoraMath
from mindformers_lora_ext.tuners.additive import GATE
from mindformers_lora_ext.tuners.base_layer import EXPERT_PROJECTIONS, param_array
from mindformers_lora_ext.tuners.experts import expert_weights_oi, expert_weights_stored, fold_experts
from mindformers_lora_ext.tuners.loha import LohaMath
from mindformers_lora_ext.tuners.lokr import LokrMath
from mindformers_lora_ext.tuners.lora import Dora, Lora, merged_weight
from mindformers_lora_ext.tuners.trainable_tokens import TABLE_ATTRS, merged_table, token_ids_of
from mindformers_lora_ext.tuners.vera import VeraMath, vera_projections
from mindformers_lora_ext import _boot

_ADDITIVE = ((VeraConfig, VeraMath), (LohaConfig, LohaMath), (LokrConfig, LokrMath),
             (AdaLoraConfig, AdaLoraMath))
GATES = ("lora_active", GATE)  # the frozen 0/1 merge gates: live-model state, not adapter tensors
TOKEN_ROWS = "trainable_tokens_delta"  # trainable embedding rows (tuners/trainable_tokens.py)
ADAPTER_SUFFIXES = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector", TOKEN_ROWS) + GATES \
    + tuple(name for _, math in _ADDITIVE for name in math.CELL_PARAMS + math.SHARED_PARAMS)


def is_adapter_tensor(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_SUFFIXES


def additive_math(pet_config):
    """The numpy merge math (a ``DeltaMath``) of a VeRA / LoHa / LoKr config; None for the LoRA
    family; NotImplementedError for any other pet type."""
    for config_cls, math in _ADDITIVE:
        if isinstance(pet_config, config_cls):
            return math
    if pet_config is None or isinstance(pet_config, LoraExtConfig):
        return None
    raise NotImplementedError(
        f"merging adapters of pet_type {getattr(pet_config, 'pet_type', None)!r} "
        f"({type(pet_config).__name__}) into base weights is not implemented: mindformers_lora_ext.merge "
        f"knows the LoRA family, vera, loha, lokr and adalora")


def _gated_off(tensors, cell, gate):
    active = tensors.get(f"{cell}.{gate}")
    return active is not None and float(np.asarray(active, np.float64)) == 0.0


def adapter_cells(tensors: Dict[str, np.ndarray], pet_config=None) -> list:
    """Cells with an adapter in ``tensors`` (by ``<cell>.lora_A``, or the method's tensors for
    a VeRA / LoHa / LoKr ``pet_config``), minus ones saved merged."""
    math = additive_math(pet_config)
    if math is not None:
        found = {name.rsplit(".", 1)[0] for name in tensors
                 if "." in name and name.rsplit(".", 1)[1] in math.CELL_PARAMS}
        return [cell for cell in sorted(found) if not _gated_off(tensors, cell, GATE)]
    cells = []
    for name in sorted(tensors):
        if name.endswith(".lora_A"):
            cell = name[: -len(".lora_A")]
            active = tensors.get(f"{cell}.lora_active")
            if active is None or float(np.asarray(active, np.float64)) != 0.0:
                cells.append(cell)
    return cells


def merge_cell(cell: str, weight: np.ndarray, bias: Optional[np.ndarray],
               tensors: Dict[str, np.ndarray], pet_config) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(merged weight, merged bias or None) for ``cell``, in the inputs' dtypes and layout.

    ``weight`` is [out, in] (MindFormers' default) or [in, out]; told apart by the adapter's
    shapes (a square weight is taken as [out, in]).
    """
    spec = pet_config.module_options(cell)
    arrays = {name.rsplit(".", 1)[-1]: np.asarray(value, np.float64) for name, value in tensors.items()
              if name.rsplit(".", 1)[0] == cell}
    out_dim, in_dim = arrays["lora_B"].shape[0], arrays["lora_A"].shape[1]
    stacked = getattr(pet_config, "fused_cells", "shared") == "per_hf_module"  # k per-module adapters
    rank = arrays["lora_A"].shape[0]
    scaling = spec.scaling
    if pet_config.init_lora_weights == "eva" and spec.rank < rank <= spec.allocated:
        arrays, rank, alpha = eva_in_use(arrays, spec, pet_config)  # a run checkpoint: A, B zero-padded
        scaling = lora_scaling(alpha, rank, spec.use_rslora) if rank else 0.0
    elif rank != spec.rank and not (stacked and rank % spec.rank == 0):
        raise ValueError(f"{cell}.lora_A has rank {arrays['lora_A'].shape[0]} but the pet_config "
                         f"gives rank {spec.rank} for {cell}: wrong config for this adapter?")
    if weight.shape == (out_dim, in_dim):
        transposed = False
    elif weight.shape == (in_dim, out_dim):
        transposed = True
    else:
        raise ValueError(f"{cell}.weight has shape {weight.shape}; adapter expects ({out_dim}, "
                         f"{in_dim}) from lora_B {arrays['lora_B'].shape} and lora_A {arrays['lora_A'].shape}")
    w64 = weight.astype(np.float64)
    folded = merged_weight(w64.T if transposed else w64, arrays, scaling, pet_config.use_dora)
    new_weight = (folded.T if transposed else folded).astype(weight.dtype)
    if "lora_B_bias" not in arrays:
        return new_weight, None
    if bias is None:
        raise KeyError(f"{cell}.lora_B_bias needs a base bias {cell}.bias to merge into")
    return new_weight, (bias.astype(np.float64) + scaling * arrays["lora_B_bias"]).astype(bias.dtype)


def eva_in_use(arrays, spec, pet_config):
    """An EVA cell as a run checkpoint holds it (A, B allocated at round(r * rho) rows, the rows
    past the rank k in use exactly zero, as they stay in training): (``arrays`` with A, B cut to
    k, k, the lora_alpha EVA gave the cell)."""
    rows = np.flatnonzero(np.any(np.asarray(arrays["lora_A"]) != 0, axis=1))
    rank = int(rows[-1]) + 1 if rows.size else 0
    arrays = dict(arrays, lora_A=arrays["lora_A"][:rank], lora_B=arrays["lora_B"][:, :rank])
    adjust = pet_config.eva_config["adjust_scaling_factors"]
    return arrays, rank, spec.alpha * rank / spec.rank if adjust and rank else spec.alpha


def token_rows_merged(get: Callable[[str], Optional[np.ndarray]], tensors: Dict[str, np.ndarray],
                      pet_config, source: str) -> Dict[str, np.ndarray]:
    """Embedding tables with their trained rows written in (``trainable_token_indices``)."""
    out = {}
    for name, delta in tensors.items():
        cell, _, attr = name.rpartition(".")
        if attr != TOKEN_ROWS:
            continue
        ids = token_ids_of(pet_config.trainable_token_indices, cell)
        table_name = next((f"{cell}.{a}" for a in TABLE_ATTRS if get(f"{cell}.{a}") is not None), None)
        if table_name is None:
            raise KeyError(f"{source} has no embedding table for {name} ({', '.join(TABLE_ATTRS)})")
        if len(ids) != delta.shape[0]:
            raise ValueError(f"{name} holds {delta.shape[0]} rows; trainable_token_indices gives {len(ids)} ids")
        out[table_name] = merged_table(get(table_name), np.asarray(delta), ids)
    return out


def expert_weight_name(cell: str) -> Optional[str]:
    """``<experts>.weight1`` for a routed-experts projection ``<experts>.linear_fc1`` (fc2:
    ``weight2``), else None."""
    parent, _, projection = cell.rpartition(".")
    return f"{parent}.{EXPERT_PROJECTIONS[projection]}" if parent and projection in EXPERT_PROJECTIONS else None


def merge_expert_cell(cell: str, stored: np.ndarray, tensors: Dict[str, np.ndarray], pet_config) -> np.ndarray:
    """The merged routed-experts weight (FFNGroupedGEMM's [E*in, out], in ``stored``'s dtype)
    for the adapter of projection ``cell`` (A [E, r, in], B [E, out, r], DoRA m [E, out])."""
    spec = pet_config.module_options(cell)
    arrays = {name.rsplit(".", 1)[-1]: np.asarray(value, np.float64) for name, value in tensors.items()
              if name.rsplit(".", 1)[0] == cell and name.rsplit(".", 1)[-1] not in GATES}
    experts, rank, in_dim = arrays["lora_A"].shape
    if rank != spec.rank or stored.shape != (experts * in_dim, arrays["lora_B"].shape[1]):
        raise ValueError(f"{cell}: adapter of {experts} experts, rank {rank}, in {in_dim}, out "
                         f"{arrays['lora_B'].shape[1]} does not fit base weight {stored.shape} at rank {spec.rank}")
    merged, _ = fold_experts(expert_weights_oi(stored.astype(np.float64), experts), arrays, spec.scaling,
                             Dora if pet_config.use_dora else Lora)
    return expert_weights_stored(merged).astype(stored.dtype)


def _oriented(cell, weight, out_dim, in_dim):
    """Whether ``weight`` is stored [in, out] (MindFormers' ``transpose_b=False``); a square
    weight, or one whose in-dim the adapter does not tell, is taken as [out, in] when it fits."""
    if weight.ndim == 2 and weight.shape[0] == out_dim and in_dim in (None, weight.shape[1]):
        return False
    if weight.ndim == 2 and weight.shape[1] == out_dim and in_dim in (None, weight.shape[0]):
        return True
    raise ValueError(f"{cell}.weight has shape {weight.shape}; the adapter expects ({out_dim}, "
                     f"{'in' if in_dim is None else in_dim})")


def _additive_merged_values(get, tensors, pet_config, math, source):
    cells = adapter_cells(tensors, pet_config)
    if not cells:
        raise ValueError(f"{source}: no '<cell>.{math.CELL_PARAMS[0]}' ({pet_config.pet_type}) adapter "
                         f"tensor found; nothing to merge")
    per_cell, weights = {}, {}
    for cell in cells:
        weight = get(f"{cell}.weight")
        if weight is None:
            raise KeyError(f"{source} has no base weight {cell}.weight for the {pet_config.pet_type} "
                           f"adapter of {cell}")
        arrays = {name.rsplit(".", 1)[-1]: np.asarray(value, np.float64) for name, value in tensors.items()
                  if name.rsplit(".", 1)[0] == cell and name.rsplit(".", 1)[-1] in math.CELL_PARAMS}
        transposed = _oriented(cell, weight, *math.out_in(arrays))
        per_cell[cell], weights[cell] = arrays, (weight, transposed)
    shared = {name: np.asarray(tensors[name], np.float64) for name in math.SHARED_PARAMS if name in tensors}
    if math.SHARED_PARAMS and len(shared) < len(math.SHARED_PARAMS):  # VeRA saved without projections
        dims = [w.shape[::-1] if t else w.shape for w, t in weights.values()]
        proj_a, proj_b = vera_projections(pet_config.projection_prng_key, pet_config.r,
                                          max(d[1] for d in dims), max(d[0] for d in dims))
        # the model held them in its adapter dtype (float16 / bfloat16 rounding included)
        dtype = np.asarray(tensors[f"{cells[0]}.{math.CELL_PARAMS[0]}"]).dtype
        shared = {"vera_A": proj_a.astype(dtype).astype(np.float64),
                  "vera_B": proj_b.astype(dtype).astype(np.float64)}
    out = {}
    for cell in cells:
        weight, transposed = weights[cell]
        w64 = weight.astype(np.float64)
        w64 = w64.T if transposed else w64
        spec = pet_config.module_options(cell)
        math.check_shapes(cell, per_cell[cell], spec, w64.shape)
        folded = math.merge(w64, dict(per_cell[cell], **shared), spec)
        out[f"{cell}.weight"] = (folded.T if transposed else folded).astype(weight.dtype)
    return out


def merged_values(get: Callable[[str], Optional[np.ndarray]], tensors: Dict[str, np.ndarray],
                  pet_config, source: str) -> Dict[str, np.ndarray]:
    """Base tensor name -> merged value for every adapted cell; ``get(name)`` reads a base tensor."""
    math = additive_math(pet_config)
    if math is not None:
        return _additive_merged_values(get, tensors, pet_config, math, source)
    cells = adapter_cells(tensors)
    if not cells and not any(n.endswith((".lora_A", "." + TOKEN_ROWS)) for n in tensors):
        raise ValueError(f"{source}: no '<cell>.lora_A' tensor found; nothing to merge")
    out = token_rows_merged(get, tensors, pet_config, source)
    for cell in cells:
        weight = get(f"{cell}.weight")
        expert_weight = expert_weight_name(cell) if weight is None else None
        if expert_weight is not None and get(expert_weight) is not None:
            out[expert_weight] = merge_expert_cell(cell, get(expert_weight), tensors, pet_config)
            continue
        if weight is None:
            raise KeyError(f"{source} has no base weight {cell}.weight for adapter {cell}.lora_A")
        new_weight, new_bias = merge_cell(cell, weight, get(f"{cell}.bias"), tensors, pet_config)
        out[f"{cell}.weight"] = new_weight
        if new_bias is not None:
            out[f"{cell}.bias"] = new_bias
    return out


def _format(path):
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


def save_mindspore_checkpoint(items: Iterable[Tuple[str, np.ndarray]], out: str) -> None:
    """Write (name, array) pairs as a MindSpore checkpoint (format by extension), atomically."""
    fmt = _format(out)
    data = [{"name": name, "data": ms.Tensor(value)} for name, value in items]
    # MindSpore appends the format's extension to a name without it: keep it at the end.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.{fmt}")
    try:
        ms.save_checkpoint(data, tmp, format=fmt)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def optimizer_state_names(names: Iterable[str]) -> set:
    """The names in a run checkpoint that hold an optimizer's per-parameter state, not a
    parameter: ``<state>.<name of another tensor in it>`` (MindFormers' AdamW saves
    ``adam_m.<param>`` / ``adam_v.<param>``, which end in ``.lora_A`` like the adapter itself)."""
    names = set(names)
    return {name for name in names if "." in name and name.split(".", 1)[1] in names}


def load_run_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """A MindSpore checkpoint (.ckpt / .safetensors) as name -> array in its own dtype, without
    optimizer state (:func:`optimizer_state_names`); step counters stay (they are no adapter)."""
    params = ms.load_checkpoint(path, format=_format(path))
    dropped = optimizer_state_names(params)
    return {name: param_array(p) for name, p in params.items() if name not in dropped}


def merge_checkpoint(src: str, out: str, pet_config,
                     adapter: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, int]:
    """Write ``out`` = MindSpore checkpoint ``src`` (.ckpt or .safetensors) with the adapters
    merged and adapter tensors and optimizer state dropped; ``adapter`` (our parameter names)
    overrides the adapter tensors in ``src``. Loads ``src`` whole. Returns counts."""
    params = load_run_checkpoint(src)
    tensors = {name: value for name, value in params.items() if is_adapter_tensor(name)}
    tensors.update(adapter or {})
    merged = merged_values(params.get, tensors, pet_config, src)
    kept = [(name, merged.get(name, value)) for name, value in params.items() if not is_adapter_tensor(name)]
    save_mindspore_checkpoint(kept, out)
    return {"merged_cells": len(adapter_cells(tensors, pet_config)), "tensors_written": len(kept)}


def merge_safetensors_streaming(base: str, out: str, adapter: Dict[str, np.ndarray], pet_config,
                                progress: Optional[Callable[[int], None]] = None) -> Dict[str, int]:
    """Like :func:`merge_checkpoint` for a ``.safetensors`` base, one tensor in memory at a time.

    Merging keeps every dtype and shape, so the output has the base's header byte for byte
    and each tensor is copied or replaced in place. ``progress(n_bytes)`` is called per tensor.
    """
    with open(base, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        header_bytes = handle.read(header_len)
    header = json.loads(header_bytes)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    with safe_open(base, framework="np") as reader:
        names = set(reader.keys())
        if any(is_adapter_tensor(n) for n in names):
            raise ValueError(f"{base} already holds adapter tensors: merge it with merge_checkpoint "
                             f"(its own adapter), or pass a plain base checkpoint")
        merged = merged_values(lambda n: reader.get_tensor(n) if n in names else None, adapter, pet_config, base)
        tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.tmp")
        try:
            with open(base, "rb") as src, open(tmp, "wb") as dst:
                dst.write(struct.pack("<Q", header_len) + header_bytes)
                start = 8 + header_len
                for name in order:
                    begin, end = header[name]["data_offsets"]
                    if name in merged:
                        blob = np.ascontiguousarray(merged[name]).tobytes()
                        assert len(blob) == end - begin, name  # same dtype and shape by construction
                    else:
                        src.seek(start + begin)
                        blob = src.read(end - begin)
                    dst.write(blob)
                    if progress:
                        progress(end - begin)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return {"merged_cells": len(adapter_cells(adapter, pet_config)), "tensors_written": len(order)}


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
