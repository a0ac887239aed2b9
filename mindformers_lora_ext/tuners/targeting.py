"""Which cells of a network an adapter replaces, and the replacement itself.

Matching follows HF PEFT: a string ``target_modules`` is a regex that must match the whole
cell name (``model.layers.0.attention.wq``); a list matches names equal to, or ending in
``.<item>``; ``all-linear`` takes every supported linear cell except the output head.
``exclude_layers`` uses the same rules and wins over ``target_modules``. MoE routed experts
are matched by virtual projection names (see :func:`find_targets`).
"""
import re
from typing import Callable, Dict, List, Sequence, Union

from mindspore import nn

from mindformers_lora_ext.config import ALL_LINEAR, KEY_PREFIX
from mindformers_lora_ext.tuners.base_layer import EXPERT_PROJECTIONS, expert_types, parallel_linear_types
from mindformers_lora_ext import _boot

# Output heads that ``all-linear`` leaves alone, as PEFT does for the output embedding.
OUTPUT_HEADS = ("lm_head", "output_layer")
# Where ``layers_to_transform`` looks for the block index when ``layers_pattern`` is unset.
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "blocks", "layer")


def supported_linear_types() -> tuple:
    """Cell types our adapters can wrap (mcore's subclasses LinearNoTP etc. included)."""
    from mindformers.modules.layers import Linear  # pylint: disable=import-outside-toplevel
    return (nn.Dense, Linear) + parallel_linear_types()


def linear_cell_names(network: nn.Cell) -> List[str]:
    """Names of every supported linear cell of ``network`` (routed experts by their virtual
    projection names), in traversal order."""
    types, experts = supported_linear_types(), expert_types()
    names = []
    for name, cell in network.cells_and_names():
        if name and isinstance(cell, experts):
            names += [f"{name}.{proj}" for proj in EXPERT_PROJECTIONS]
        elif name and isinstance(cell, types):
            names.append(name)
    return names


def _matches(name: str, spec: Union[str, Sequence[str], None]) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == item or name.endswith("." + item) for item in spec)


def find_targets(network: nn.Cell, target_modules, exclude_layers=None, layers_to_transform=None,
                 layers_pattern=None) -> List[str]:
    """Names of the cells to adapt, in traversal order.

    MoE routed experts (tuners/experts.py) take part through their virtual projection names
    ``<experts>.linear_fc1`` / ``<experts>.linear_fc2``: a pattern matching one of them, or the
    experts cell itself (then both), adds those names; ``all-linear`` takes them too. The router
    is never adapted. ``layers_to_transform`` (layer indices) keeps only cells under
    ``.<pattern>.<index>.`` (``layers_pattern``, default HF PEFT's layers/h/blocks/layer).
    Raises ValueError if a matched cell is not a supported linear type, a requested layer
    index has no target, or nothing matched.
    """
    types = supported_linear_types()
    experts = expert_types()
    targets: List[str] = []
    for name, cell in network.cells_and_names():
        if not name or any(name.startswith(t + ".") for t in targets):
            continue
        if isinstance(cell, experts):
            targets += _expert_targets(name, target_modules, exclude_layers)
            continue
        if target_modules == ALL_LINEAR:
            hit = isinstance(cell, types) and name.rsplit(".", 1)[-1] not in OUTPUT_HEADS
        else:
            hit = _matches(name, target_modules)
        if not hit or _matches(name, exclude_layers):
            continue
        if not isinstance(cell, types):
            router = " The MoE router is never adapted." if name.rsplit(".", 1)[-1] == "router" else ""
            raise ValueError(
                f"{KEY_PREFIX}.target_modules = {target_modules!r} matches cell {name!r} of type "
                f"{type(cell).__name__}, which is not a supported linear type "
                f"({', '.join(t.__name__ for t in types + experts)}).{router} Narrow the pattern.")
        targets.append(name)
    if layers_to_transform is not None:
        targets = _in_layers(targets, layers_to_transform, layers_pattern)
    if not targets:
        raise ValueError(
            f"{KEY_PREFIX}.target_modules = {target_modules!r} (exclude_layers = {exclude_layers!r}) "
            f"matches no cell of {type(network).__name__}. {_linear_sample(network)}")
    return targets


def _expert_targets(name, target_modules, exclude_layers) -> List[str]:
    """The virtual projection names of experts cell ``name`` that the patterns select."""
    whole = target_modules == ALL_LINEAR or _matches(name, target_modules)
    return [f"{name}.{proj}" for proj in EXPERT_PROJECTIONS
            if (whole or _matches(f"{name}.{proj}", target_modules))
            and not _matches(name, exclude_layers) and not _matches(f"{name}.{proj}", exclude_layers)]


def _linear_sample(network):
    sample = linear_cell_names(network)
    shown = ", ".join(sample[:8]) + (", ..." if len(sample) > 8 else "")
    return f"Its {len(sample)} linear cells include: {shown}"


def layer_index(name: str, layers_pattern=None):
    """The block index in ``name`` (``model.layers.3.attention.wq`` -> 3), or None."""
    for pattern in layers_pattern or DEFAULT_LAYERS_PATTERNS:
        match = re.match(rf"(?:.*\.)?{re.escape(pattern)}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def _in_layers(targets, layers, layers_pattern):
    by_layer = {}
    for name in targets:
        by_layer.setdefault(layer_index(name, layers_pattern), []).append(name)
    missing = [i for i in layers if i not in by_layer]
    if missing:
        found = sorted(i for i in by_layer if i is not None)
        raise ValueError(
            f"{KEY_PREFIX}.layers_to_transform = {layers!r}: layer(s) {missing} have no target "
            f"(layers_pattern = {layers_pattern or list(DEFAULT_LAYERS_PATTERNS)!r}; "
            f"target layers found: {found})")
    return [name for name in targets if layer_index(name, layers_pattern) in layers]


def find_cells(network: nn.Cell, key: str, suffixes: Sequence[str]) -> Dict[str, nn.Cell]:
    """Cells whose name equals or ends in ``.<suffix>`` (e.g. ``modules_to_save``); every
    suffix must match at least one cell."""
    cells = {name: cell for name, cell in network.cells_and_names() if name and _matches(name, suffixes)}
    for item in suffixes:
        if not any(_matches(name, [item]) for name in cells):
            raise ValueError(f"{KEY_PREFIX}.{key} entry {item!r} matches no cell of "
                             f"{type(network).__name__}. {_linear_sample(network)}")
    return cells


def checkpoint_prefix(path: str, cell: nn.Cell, attr: str = "weight") -> str:
    """The prefix ``cell``'s parameters carry in checkpoints: the name of its ``attr`` Parameter
    (its weight; ``weight1`` for routed experts) minus the last component, else ``path`` (its
    cell path, for a weight named without a prefix, as in a cell built on its own).

    They differ where a parent cell was built with ``auto_prefix=False``: mcore Qwen3's
    ``model.decoder.layers.0.mlp.linear_fc1`` holds ``decoder.layers.0.mlp.linear_fc1.weight``.
    Adapter parameters take this prefix so run checkpoints, merges and adapter files name a
    cell the way its base weight does.
    """
    name = getattr(getattr(cell, attr, None), "name", "") or ""
    return name.rpartition(".")[0] or path


def replace_cells(network: nn.Cell, names: Sequence[str],
                  make: Callable[[str, nn.Cell], nn.Cell]) -> Dict[str, nn.Cell]:
    """Replace each named cell by ``make(name, cell)``; returns name -> new cell.

    Parameter names are left alone (``insert_child_to_cell`` does not prefix them), so the base
    weights keep the names their checkpoints use; the new cell names its own parameters.
    """
    cells = dict(network.cells_and_names())
    replaced = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = cells[parent_name] if parent_name else network
        new = make(name, cells[name])
        # pylint: disable=protected-access
        parent._cells[child] = new
        replaced[name] = new
    return replaced


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
