"""Which Hugging Face modules each adapted MindFormers cell computes, and with which output rows.

HF PEFT names adapters by HF module (``model.layers.0.self_attn.q_proj``). A MindFormers cell may
be one HF module renamed (legacy Llama ``attention.wq``), or several fused into one weight: mcore
``linear_qkv`` = q_proj, k_proj, v_proj and ``linear_fc1`` = gate_proj, up_proj, in the row layout
the model's own HF converter writes (q/k/v interleaved per kv group or contiguous, gate/up
interleaved or not, per its config flags); MoE routed experts are E HF modules per projection.

The map is read from MindFormers itself where it states it: an mcore model's ``weight_mapping``
(HF -> MF name pieces, checked both ways with its ``convert_name``), ``concat_mapping`` (which
split cells a fused one joins) and ``convert_hf_weight`` (the fusion, run on row indices to read
its layout); routed experts by the class's ``ExpertsConvertOp`` run the same way. Legacy Llama,
which states no such metadata, uses ``naming.MF_TO_HF_LLAMA``. A cell that none of these map is an
error naming it, raised when the map is built, never a directory PEFT would reject.

Tensors split by rows (``ROW_SPLIT``: B, its bias, DoRA's magnitude, LoHa's w*_a) take each module's
rows; the input side (``SHARED``: A, LoHa's w*_b) is the same for every module of a cell. A fused
cell built with ``fused_cells: per_hf_module`` holds one adapter per module stacked: A is
[k*r, in] (module i's A in rows i*r..), B is [out, k*r] with module i's B in its rows and
columns i*r.. and zeros elsewhere, so splitting and fusing are exact both ways.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from mindformers_lora_ext.naming import hf_module_name, hf_parameter_name, mf_parameter_name

# attributes whose first axis (after the expert axis) is the cell's output rows
ROW_SPLIT = ("lora_B", "lora_B_bias", "lora_magnitude_vector", "hada_w1_a", "hada_w2_a")
# attributes that act on the cell's input and are therefore the same for each HF module
SHARED = ("lora_A", "hada_w1_b", "hada_w2_b")
_EXPERT = "{}"  # the expert index in an expert module's name


class HfMapError(ValueError):
    """A cell that has no HF module name, or a tensor that cannot be split or fused exactly."""


@dataclass(frozen=True)
class CellMap:
    """HF modules computed by one cell: ``modules[i]`` owns output rows ``rows[i]`` (None: one
    module owning every row). ``experts`` > 0: routed experts, tensors carry a leading expert axis
    and each module name holds ``{}`` for the expert index."""

    modules: tuple
    rows: Optional[tuple] = None
    experts: int = 0
    per_module: bool = False  # stacked per-module adapters (fused_cells: per_hf_module)

    @property
    def fused(self) -> bool:
        return self.rows is not None

    def names(self) -> List[str]:
        """Every HF module name (experts expanded)."""
        if not self.experts:
            return list(self.modules)
        return [m.format(e) for e in range(self.experts) for m in self.modules]

    def to_json(self) -> dict:
        out = {"modules": list(self.modules)}
        if self.rows is not None:
            out["rows"] = [_runs(r) for r in self.rows]
        if self.experts:
            out["experts"] = self.experts
        if self.per_module:
            out["per_module"] = True
        return out

    @classmethod
    def from_json(cls, data: dict) -> "CellMap":
        rows = tuple(_unruns(r) for r in data["rows"]) if data.get("rows") is not None else None
        return cls(tuple(data["modules"]), rows, int(data.get("experts", 0)), bool(data.get("per_module")))


def _runs(rows) -> List[List[int]]:
    """Row indices as arithmetic runs [start, count, step]: q/k/v per kv group and gate/up
    interleaved by row are a few runs each, so an 8B model's map stays small in JSON."""
    out: List[List[int]] = []
    for row in map(int, rows):
        if out:
            start, count, step = out[-1]
            if count == 1 and row != start:
                out[-1] = [start, 2, row - start]
                continue
            if row == start + count * step:
                out[-1][1] += 1
                continue
        out.append([row, 1, 1])
    return out


def _unruns(runs) -> tuple:
    return tuple(start + i * step for start, count, step in runs for i in range(count))


class HfMap:
    """MindFormers cell prefix (its base weight's name minus ``.weight``) -> :class:`CellMap`."""

    def __init__(self, cells: Dict[str, CellMap], family: str, params: Optional[Dict[str, str]] = None):
        self.cells = dict(cells)
        self.family = family
        self.params = dict(params or {})  # whole saved parameters (modules_to_save): MF name -> HF name

    # ------------------------------------------------------------------ names
    def cell(self, name: str) -> CellMap:
        if name not in self.cells:
            raise HfMapError(f"cell {name!r} has no HF module name in the {self.family} map")
        return self.cells[name]

    def module(self, name: str) -> str:
        """The one HF module of an unfused, non-expert cell (or of any other name: renamed by the
        legacy table, e.g. ``modules_to_save`` cells)."""
        cell = self.cells.get(name)
        if cell is None:
            return hf_module_name(name)
        if cell.fused or cell.experts:
            raise HfMapError(f"cell {name!r} computes several HF modules ({', '.join(cell.names()[:4])}"
                             f"{', ...' if len(cell.names()) > 4 else ''}): it has no single HF name")
        return cell.modules[0]

    def hf_parameter(self, mf_param: str) -> str:
        """HF name of a whole saved parameter (``modules_to_save``)."""
        return self.params[mf_param] if mf_param in self.params else hf_parameter_name(mf_param)

    def mf_parameter(self, hf_param: str) -> str:
        """Inverse of :meth:`hf_parameter`."""
        for mf, hf in self.params.items():
            if hf == hf_param:
                return mf
        return mf_parameter_name(hf_param)

    def with_per_module(self, names) -> "HfMap":
        """A copy in which the fused, non-expert cells among ``names`` hold per-module adapters."""
        cells = {n: dataclasses.replace(c, per_module=True) if n in names and c.fused and not c.experts else c
                 for n, c in self.cells.items()}
        return HfMap(cells, self.family, self.params)

    def hf_modules(self) -> Dict[str, List[str]]:
        """Cell -> every HF module it computes."""
        return {name: cell.names() for name, cell in self.cells.items()}

    def mf_cells(self) -> Dict[str, str]:
        """HF module -> the cell computing it."""
        return {module: name for name, cell in self.cells.items() for module in cell.names()}

    # ---------------------------------------------------------------- tensors
    def split(self, name: str, attr: str, array: np.ndarray) -> Dict[str, np.ndarray]:
        """One cell tensor -> {HF module: its part}: rows for ``ROW_SPLIT``, a copy of the whole for
        ``SHARED`` (per-module cells: each module's own block); any other attribute of a fused
        cell cannot be split exactly (error naming it)."""
        cell = self.cell(name)
        if not cell.fused and not cell.experts:
            return {cell.modules[0]: array}
        if cell.fused and attr not in ROW_SPLIT + SHARED:
            raise HfMapError(f"{name}.{attr}: cell {name!r} fuses {', '.join(cell.modules)}, and a "
                             f"{attr!r} tensor does not split by output rows into one adapter per HF module")
        per_expert = [array[e] for e in range(cell.experts)] if cell.experts else [array]
        out = {}
        for e, part in enumerate(per_expert):
            for i, module in enumerate(cell.modules):
                value = part[np.asarray(cell.rows[i])] if cell.fused and attr in ROW_SPLIT else part
                if cell.per_module and attr in ("lora_A", "lora_B"):
                    rank = part.shape[0 if attr == "lora_A" else 1] // len(cell.modules)
                    block = slice(i * rank, (i + 1) * rank)
                    value = value[block] if attr == "lora_A" else value[:, block]
                out[module.format(e) if cell.experts else module] = np.ascontiguousarray(value)
        return out

    def fuse(self, name: str, attr: str, parts: Dict[str, np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`split`. ``SHARED`` parts must be equal (else :class:`HfMapError` naming
        ``fused_cells: per_hf_module``); a module of a fused cell that ``parts`` lacks (an HF
        adapter on q_proj and v_proj only) gets zero B rows (and a zero A block per module)."""
        cell = self.cell(name)
        if not cell.fused and not cell.experts:
            return parts[cell.modules[0]]
        per_expert = []
        for e in range(max(cell.experts, 1)):
            names = [m.format(e) if cell.experts else m for m in cell.modules]
            present = [n for n in names if n in parts]
            if not present:
                raise HfMapError(f"{attr} of {name!r}: none of its HF modules {names} has one")
            if cell.per_module and attr in ("lora_A", "lora_B"):
                per_expert.append(self._stack(cell, name, attr, names, parts))
            elif cell.fused and attr in ROW_SPLIT:
                first = parts[present[0]]
                out = np.zeros((sum(len(r) for r in cell.rows),) + first.shape[1:], first.dtype)
                for rows, module in zip(cell.rows, names):
                    if module in parts:
                        out[np.asarray(rows)] = parts[module]
                    elif attr == "lora_magnitude_vector":
                        raise HfMapError(f"DoRA magnitude of {module} is missing, but MindFormers computes it "
                                         f"in one cell {name!r} with {', '.join(present)}: the DoRA magnitude "
                                         f"of its rows is unknown (adapt all of {', '.join(names)})")
                per_expert.append(out)
            else:
                values = [parts[n] for n in present]
                for other, value in zip(present[1:], values[1:]):
                    if value.shape != values[0].shape or not np.array_equal(value, values[0]):
                        raise HfMapError(
                            f"{attr} of {present[0]} and {other} differ, but MindFormers computes both in "
                            f"one cell {name!r} with one {attr}: a single fused adapter cannot hold them; "
                            f"build it with pet_config fused_cells: per_hf_module (one adapter per HF module)")
                per_expert.append(values[0])
        return np.stack(per_expert) if cell.experts else per_expert[0]

    @staticmethod
    def _stack(cell, name, attr, names, parts) -> np.ndarray:
        """Per-module A's stacked [k*r, in], or B's placed block-diagonally [out, k*r]."""
        ranks = {parts[n].shape[0 if attr == "lora_A" else 1] for n in names if n in parts}
        if len(ranks) != 1:
            raise HfMapError(f"{attr} of {', '.join(n for n in names if n in parts)} have ranks {sorted(ranks)}; "
                             f"one cell {name!r} with per-module adapters takes one rank for all of them")
        rank, k = ranks.pop(), len(names)
        first = next(parts[n] for n in names if n in parts)
        if attr == "lora_A":
            out = np.zeros((k * rank, first.shape[1]), first.dtype)
            for i, module in enumerate(names):
                if module in parts:
                    out[i * rank:(i + 1) * rank] = parts[module]
            return out
        out = np.zeros((sum(len(r) for r in cell.rows), k * rank), first.dtype)
        for i, (rows, module) in enumerate(zip(cell.rows, names)):
            if module in parts:
                out[np.asarray(rows), i * rank:(i + 1) * rank] = parts[module]
        return out

    def block_mask(self, name: str, rank: int) -> Optional[np.ndarray]:
        """The 0/1 [out, k*rank] mask of a per-module cell's B (module i: its rows, columns
        i*rank..), None for any other cell."""
        cell = self.cell(name)
        if not cell.per_module:
            return None
        mask = np.zeros((sum(len(r) for r in cell.rows), len(cell.modules) * rank), np.float32)
        for i, rows in enumerate(cell.rows):
            mask[np.asarray(rows), i * rank:(i + 1) * rank] = 1.0
        return mask

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict:
        out = {"family": self.family, "cells": {n: c.to_json() for n, c in self.cells.items()}}
        if self.params:
            out["params"] = dict(self.params)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "HfMap":
        return cls({n: CellMap.from_json(c) for n, c in data["cells"].items()}, data["family"],
                   data.get("params"))


def legacy_map(cells: List[str]) -> HfMap:
    """Legacy Llama (``naming.MF_TO_HF_LLAMA``): every cell is one HF module."""
    return HfMap({name: CellMap((hf_module_name(name),)) for name in cells}, "llama (legacy)")


# ---------------------------------------------------------------------------- mcore models

def find_hf_model(network):
    """The MindFormers model cell that states its HF mapping (``weight_mapping`` and
    ``convert_name``: mcore models), or None."""
    for _, cell in network.cells_and_names():
        if getattr(type(cell), "weight_mapping", None) and callable(getattr(cell, "convert_name", None)):
            return cell
    return None


def for_network(network, outputs: Dict[str, tuple], params=()) -> HfMap:
    """The map of ``network``'s adapted cells. ``outputs``: cell (checkpoint prefix; routed experts
    by their virtual ``<experts>.linear_fc1`` names) -> (experts, output rows), experts 0 for a
    plain cell; ``params``: names of whole saved parameters (``modules_to_save``)."""
    model = find_hf_model(network)
    if model is None:
        return legacy_map(list(outputs))
    family = type(model).__name__
    return HfMap({name: _mcore_cell(model, family, name, *shape) for name, shape in outputs.items()}, family,
                 {p: _hf_name(model, family, p) for p in params})


def _hf_name(model, family, mf_weight: str) -> str:
    """The HF weight name that ``model.convert_name`` turns into ``mf_weight``: its
    ``weight_mapping`` applied backwards, then checked forwards."""
    hf = mf_weight
    for hf_piece, mf_piece in reversed(type(model).weight_mapping):
        if mf_piece in hf:
            hf = hf.replace(mf_piece, hf_piece)
    if hf == mf_weight or model.convert_name(hf) != mf_weight:
        raise HfMapError(f"{family}: no HF name for {mf_weight!r} in its weight_mapping (tried {hf!r}, "
                         f"which converts to {model.convert_name(hf)!r}); export of this cell to HF PEFT "
                         f"is not supported")
    return hf


def _split_components(model) -> Dict[str, List[str]]:
    """Fused cell component -> the split cells it joins, from ``concat_mapping``
    (``linear_qkv`` -> [linear_q, linear_k, linear_v], ``linear_fc1`` -> [gating, hidden])."""
    joined: Dict[str, List[str]] = {}
    for split, fused in getattr(model, "concat_mapping", ()):
        joined.setdefault(fused.strip(".").rsplit(".", 1)[-1], []).append(split.strip(".").rsplit(".", 1)[-1])
    return joined


def _split_sizes(model, parts: List[str], out: int) -> List[int]:
    """Rows of each split cell of a fused weight with ``out`` rows (q/k/v by the attention heads)."""
    if len(parts) == 3:
        config = model.get_gpt_transformer_config()
        q = config.num_attention_heads * config.kv_channels
        kv = config.num_query_groups * config.kv_channels
        sizes = [q, kv, kv]
    else:
        sizes = [out // len(parts)] * len(parts)
    if sum(sizes) != out:
        raise HfMapError(f"fused weight of {out} rows does not split into {parts} of {sizes} rows")
    return sizes


def _mcore_cell(model, family, name: str, experts: int, out: int) -> CellMap:
    parent, _, component = name.rpartition(".")
    if experts:
        return _expert_cell(model, family, parent, component, experts, out)
    joined = _split_components(model).get(component)
    if not joined:
        return CellMap((_hf_name(model, family, name + ".weight")[: -len(".weight")],))
    splits = [f"{parent}.{part}.weight" for part in joined]
    sizes = _split_sizes(model, joined, out)
    ids, start = {}, 0
    for split, size in zip(splits, sizes):  # row indices through the model's own fusion
        ids[split] = np.arange(start, start + size, dtype=np.int64).reshape(size, 1)
        start += size
    order = _fused_order(model, family, name, splits, ids)
    if sorted(order.tolist()) != list(range(out)):
        raise HfMapError(f"{family}'s HF converter lays out {name!r} in no row permutation")
    position = np.argsort(order)  # HF row id -> its row in the fused weight
    rows, start = [], 0
    for size in sizes:
        rows.append(tuple(int(p) for p in position[start:start + size]))
        start += size
    modules = tuple(_hf_name(model, family, s)[: -len(".weight")] for s in splits)
    return CellMap(modules, tuple(rows))


def _fused_order(model, family, name, splits, ids) -> np.ndarray:
    """The HF row ids in the order MindFormers fuses them into ``name``'s weight: through the
    model's ``convert_hf_weight`` (it honours the layout flags), else the class's
    ``weight_converters`` op that writes that weight (QKVConvertOp, ConcatConvertOp)."""
    if callable(getattr(model, "convert_hf_weight", None)):
        fused = model.convert_hf_weight(ids)
        if len(fused) != 1:
            raise HfMapError(f"{family}.convert_hf_weight did not fuse {splits} into one weight: {sorted(fused)}")
        return np.asarray(next(iter(fused.values()))).reshape(-1)
    weight = name + ".weight"
    for op in getattr(type(model), "weight_converters", ()):
        if len(op.hf_names) == len(splits) and op.is_required_name(weight, mf_name=True):
            probe = dataclasses.replace(op)
            if callable(getattr(probe, "set_model_config", None)):
                probe.set_model_config(model.get_gpt_transformer_config())
            for field, value in (("hidden_size", 1), ("tensor_model_parallel_size", 1),
                                 ("optimizer_parallel_size", 1)):
                if hasattr(probe, field):
                    setattr(probe, field, value)
            return np.asarray(probe._hf_to_mf([ids[s] for s in splits])[0]).reshape(-1)  # pylint: disable=protected-access
    raise HfMapError(f"{family} states neither convert_hf_weight nor a weight_converters op writing "
                     f"{weight!r}: its fused layout is unknown, so it cannot be exported to HF PEFT")


def _expert_converter(model, family, projection: str):
    from mindformers.checkpoint.converter.convert_op import ExpertsConvertOp  # pylint: disable=import-outside-toplevel
    wanted = 2 if projection == "linear_fc1" else 1
    for op in getattr(type(model), "weight_converters", ()):
        if isinstance(op, ExpertsConvertOp) and len(op.hf_names) == wanted:
            return op
    raise HfMapError(f"{family} states no ExpertsConvertOp for the routed experts' {projection} in its "
                     f"weight_converters: no HF names for its expert adapters")


def _expert_cell(model, family, experts: str, projection: str, count: int, out: int) -> CellMap:
    """Routed experts' ``linear_fc1`` (gate/up) or ``linear_fc2`` (down): per expert, the HF
    modules and their rows in the expert's output, read from MindFormers' ExpertsConvertOp."""
    op = _expert_converter(model, family, projection)
    layer = experts.split(".layers.", 1)[1].split(".", 1)[0] if ".layers." in experts else None
    modules = []
    for hf in op.hf_names:  # "model.layers.{}.mlp.experts.{}.gate_proj.weight"
        if hf.count("{}") != 2 or layer is None:
            raise HfMapError(f"{family}: unexpected expert name pattern {hf!r} for {experts!r}")
        modules.append(hf.replace("{}", layer, 1)[: -len(".weight")])
    if len(modules) == 1:
        return CellMap(tuple(modules), None, count)
    size = out // len(modules)
    probe = dataclasses.replace(op, num_moe_experts=1, hidden_size=1, moe_ffn_hidden_size=size,
                                expert_parallel_size=1, optimizer_parallel_size=1)
    ids = [np.arange(i * size, (i + 1) * size, dtype=np.int64).reshape(size, 1) for i in range(len(modules))]
    order = np.asarray(probe._hf_to_mf(ids)[0]).reshape(-1)  # pylint: disable=protected-access
    if sorted(order.tolist()) != list(range(out)):
        raise HfMapError(f"{family}'s ExpertsConvertOp layout of {experts}.{projection} is not a permutation")
    position = np.argsort(order)
    rows = tuple(tuple(int(p) for p in position[i * size:(i + 1) * size]) for i in range(len(modules)))
    return CellMap(tuple(modules), rows, count)
