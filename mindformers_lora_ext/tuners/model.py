"""``AdapterModel``: what ``PetModel`` builds for our pet types.

It injects adapter cells into the base model, runs the base model, forwards MindFormers'
generation/conversion hooks to it, owns the exact trainable set, and writes the PEFT-style
``adapter_config.json`` that ``PetModel`` asks for. A data-driven ``init_lora_weights`` (eva, corda,
lora_ga) is pending from the build until the DataDrivenInit callback (or a loaded adapter)
settles it; compiling a training graph while it is pending is an error naming the callback.
"""
from fnmatch import fnmatch
from typing import Dict, List

import numpy as np
from mindspore import Tensor
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.logger import logger

from mindformers_lora_ext.config import DATA_DRIVEN_INITS, KEY_PREFIX
from mindformers_lora_ext.tuners.base_layer import param_array
from mindformers_lora_ext.tuners.targeting import checkpoint_prefix, find_cells, find_targets, replace_cells
from mindformers_lora_ext.tuners.trainable_tokens import TrainableTokens, check_not_tied, resolve_targets, table_of
from mindformers_lora_ext import _boot

# PetModel forwards these to its network (us); we forward them to the base model.
_DELEGATED = (
    "update_model_kwargs_before_generate", "prepare_inputs_for_generation",
    "prepare_inputs_for_predict_layout", "slice_incremental_inputs", "set_dynamic_inputs",
    "add_flags_custom", "to_embeddings", "convert_name", "convert_weight_dict",
    "convert_map_dict", "obtain_name_map", "get_gpt_transformer_config",
)


class AdapterModel(PreTrainedModel):
    """Base model with adapter cells in place of its target linear cells.

    Subclasses set ``LAYER`` (or override ``make_layer(name, base_cell) -> AdoptedLinear``).
    """

    def __init__(self, config, base_model):
        super().__init__(base_model.config, auto_prefix=False)
        self.config.pet_config = config
        targets = find_targets(base_model, config.target_modules, config.exclude_layers,
                               config.layers_to_transform, config.layers_pattern)
        saved = find_cells(base_model, "modules_to_save", config.modules_to_save or [])
        for name in saved:
            if any(t == name or t.startswith(name + ".") or name.startswith(t + ".") for t in targets):
                raise ValueError(f"{KEY_PREFIX}.modules_to_save cell {name!r} overlaps an adapter "
                                 f"target; a cell is either adapted or fully trained")
        tokens = getattr(config, "trainable_token_indices", None)
        token_targets = resolve_targets(base_model, tokens) if tokens else {}
        for name in token_targets:
            if name in saved or any(t == name or t.startswith(name + ".") for t in targets):
                raise ValueError(f"{KEY_PREFIX}.trainable_token_indices names {name!r}, which is also "
                                 f"adapted or in modules_to_save; a cell is trained one way")
        cells = dict(base_model.cells_and_names())
        order = list(targets)
        experts: Dict[str, List[str]] = {}  # routed-experts cell -> its targeted projections
        for path in [t for t in targets if t not in cells]:  # virtual <experts>.linear_fc1 names
            parent, _, projection = path.rpartition(".")
            experts.setdefault(parent, []).append(projection)
            targets.remove(path)
        self.prepare_targets(base_model, targets)
        # keyed, and their parameters named, by the base weight's prefix (see checkpoint_prefix)
        names = {path: checkpoint_prefix(path, cells[path]) for path in targets}
        names.update({path: checkpoint_prefix(path, cells[path], "weight1") for path in experts})
        layers = replace_cells(base_model, targets, lambda path, cell: self.make_layer(names[path], cell))
        for path, layer in replace_cells(base_model, list(experts), lambda path, cell: self.make_expert_layer(
                names[path], cell, experts[path])).items():
            layers.update({f"{path}.{proj}": cell for proj, cell in layer.projections.items()})
            names.update({f"{path}.{proj}": f"{names[path]}.{proj}" for proj in layer.projections})
        self._adapter_layers: Dict[str, object] = {names[path]: layers[path] for path in order if path in layers}
        for name, layer in self._adapter_layers.items():
            layer.name_parameters(name)
        logger.info("mindformers-lora-ext: %s", self.kernel_summary())
        self._token_layers: Dict[str, TrainableTokens] = {}  # trainable embedding rows, by table prefix
        for path, layer in replace_cells(base_model, list(token_targets),
                                         lambda path, cell: _token_layer(base_model, path, cell, token_targets[path])).items():
            prefix = layer.table.name.rpartition(".")[0] or path
            layer.name_parameters(prefix)
            self._token_layers[prefix] = layer
        self._modules_to_save: Dict[str, object] = saved
        self._hf_map = None
        self.network = base_model
        init = getattr(config, "init_lora_weights", None)
        # the data-driven init not yet run (a compile-time constant of the training graph)
        self.data_init_pending = init if init in DATA_DRIVEN_INITS else None
        self.collecting_statistics = False  # a statistics pass is compiling / running
        self._pending_message = (
            f"{KEY_PREFIX}.init_lora_weights = {init!r} initialises the adapters from the training data, "
            f"which has not happened: add the callback to the YAML (callbacks: - type: DataDrivenInit), or "
            f"load a trained adapter ({KEY_PREFIX}.adapter_path)")
        if config.adapter_path:
            from mindformers_lora_ext.peft_format import load_adapter  # pylint: disable=import-outside-toplevel
            loaded = load_adapter(self, config.adapter_path)
            logger.info("mindformers-lora-ext: loaded adapter %s", loaded)

    def kernel_summary(self) -> str:
        """Which of our CPU/Ascend kernels the adapted cells run: "n adapted cells: fused LoRA
        kernel on a, kernel dropout on b[, DoRA dropout kernel on c]" (the others run MindSpore's
        ops)."""
        from mindformers_lora_ext.kernels.layer import PhiloxDropout  # pylint: disable=import-outside-toplevel
        layers = list(self._adapter_layers.values())
        fused = sum(1 for layer in layers if getattr(layer, "fused", False))
        dropout = sum(1 for layer in layers if isinstance(getattr(layer, "lora_dropout", None), PhiloxDropout))
        summary = f"{len(layers)} adapted cells: fused LoRA kernel on {fused}, kernel dropout on {dropout}"
        dropped = sum(1 for layer in layers if getattr(layer, "dora_dropped", None) is not None)
        return summary + (f", DoRA dropout kernel on {dropped}" if dropped else "")

    def prepare_targets(self, base_model, targets: List[str]):
        """Called once with the target cell names before any is replaced (VeRA sizes its shared
        projections here); nothing by default."""

    def finish_data_init(self) -> None:
        """The data-driven init is settled (computed, or loaded): training may compile."""
        self.data_init_pending = None

    def ranks_changed(self) -> None:
        """Cells changed their rank in use (EVA; a cell at rank 0 has no HF module): the HF map
        is rebuilt on next use."""
        self._hf_map = None

    LAYER = None  # the adapter cell class: LAYER(base_cell, spec, param_init_type, compute_dtype)

    def hf_map(self):
        """The HF module names (and fused row layouts) of the adapted cells: an hf_map.HfMap,
        built on first use from the base model's own mapping; raises hf_map.HfMapError naming a
        cell that has no HF name."""
        if self._hf_map is None:
            from mindformers_lora_ext import hf_map  # pylint: disable=import-outside-toplevel
            outputs = {name: layer_outputs(layer) for name, layer in self._adapter_layers.items()
                       if getattr(layer, "effective_rank", 1)}  # EVA's rank-0 cells: no adapter
            params = [p.name for cell in self._modules_to_save.values() for p in cell.get_parameters()]
            tables = {layer.table.name: prefix for prefix, layer in self._token_layers.items()}
            names = hf_map.for_network(self.network, outputs, params + list(tables))
            for table, prefix in tables.items():  # PEFT keeps the rows under <embedding>.token_adapter
                module = (names.params.pop(table, None) or names.hf_parameter(table)).rpartition(".")[0]
                names.params[f"{prefix}.trainable_tokens_delta"] = f"{module}.token_adapter.trainable_tokens_delta"
            per_module = [n for n, layer in self._adapter_layers.items() if getattr(layer, "block_mask", None) is not None]
            self._hf_map = names.with_per_module(per_module) if per_module else names
        return self._hf_map

    def make_layer(self, name, base_cell):
        """The adapter cell replacing ``base_cell``; ``name`` is its checkpoint prefix."""
        config = self.config.pet_config
        return self.LAYER(base_cell, config.module_options(name), config.param_init_type,
                          config.compute_dtype)

    def make_expert_layer(self, name, base_cell, projections: List[str]):
        """The cell replacing MoE routed experts ``base_cell`` (checkpoint prefix ``name``) with
        adapters on ``projections`` (``linear_fc1`` / ``linear_fc2``); it exposes them as
        ``.projections`` {name: adapter layer}. Only methods that implement it adapt experts."""
        raise ValueError(
            f"{KEY_PREFIX}.pet_type {self.config.pet_config.pet_type!r} cannot adapt MoE routed experts "
            f"({name}: {', '.join(projections)}); the LoRA family (lora_ext, dora, rslora) can. Leave them "
            f"out with exclude_layers: [experts], or name the other cells only")

    def add_flags_recursive(self, **flags):
        """MindSpore's ``set_train`` reaches every cell through this; with ``merge_on_load`` it
        is where the adapters get folded (see :meth:`_merge_on_load_switch`)."""
        config = getattr(getattr(self, "config", None), "pet_config", None)
        if "training" in flags and getattr(config, "merge_on_load", False):
            self._merge_on_load_switch(bool(flags["training"]))
        return super().add_flags_recursive(**flags)

    def _merge_on_load_switch(self, training: bool):
        """``merge_on_load: true``: fold the adapters on the first switch to inference at which
        every weight they touch holds data, so the graph compiled next is the base model's.

        Eval and predict build the network under ``no_init_parameters``, call ``set_train(False)``,
        load ``--load_checkpoint`` and only then run: the switch before the load is skipped (the
        weights have no data yet), the one when eval/generate starts merges. A switch to training
        is refused: it would train adapters already folded away.
        """
        if training:
            raise ValueError(f"{KEY_PREFIX}.merge_on_load is true: it serves eval/predict with the "
                             f"adapters folded into the base weights, so training would update adapters "
                             f"that no longer act. Remove merge_on_load (or set it false) to train.")
        layers = list(self._adapter_layers.values())
        if all(layer.merged for layer in layers):
            return
        params = [layer.weight for layer in layers] + self.file_parameters()
        if any(p.has_init for p in params):  # not loaded yet: MindFormers loads after set_train
            return
        self.merge()
        logger.info("mindformers-lora-ext: merge_on_load folded %d adapters into the base weights",
                    len(layers))

    def merge(self):
        """Fold every adapter into its base weight, and trained token rows into their table
        (forward of a compiled graph is unchanged)."""
        for layer in list(self._adapter_layers.values()) + list(self._token_layers.values()):
            layer.merge()

    def unmerge(self):
        """Undo :meth:`merge` (to float rounding; token rows exactly)."""
        for layer in list(self._adapter_layers.values()) + list(self._token_layers.values()):
            layer.unmerge()

    @property
    def adapter_names(self) -> List[str]:
        """Checkpoint prefixes of the adapted cells (their base weights' names minus
        ``.weight``), in traversal order."""
        return list(self._adapter_layers)

    def adapter_parameters(self) -> list:
        """The adapters' own parameters (A, B, ...), in traversal order."""
        return [p for layer in self._adapter_layers.values() for p in layer.adapter_parameters()]

    def saved_parameters(self) -> list:
        """The trained parameters: adapter parameters, then those of ``modules_to_save`` (an adapter
        checkpoint holds these, plus :meth:`frozen_saved_parameters`)."""
        extra = [p for cell in self._modules_to_save.values() for p in cell.get_parameters()]
        tokens = [p for layer in self._token_layers.values() for p in layer.adapter_parameters()]
        return self.adapter_parameters() + tokens + extra

    def frozen_saved_parameters(self) -> list:
        """Frozen tensors that adapter files also hold (VeRA's projections with
        ``save_projection``); none by default. They are never made trainable."""
        return []

    def file_parameters(self) -> list:
        """What an adapter file holds: ``saved_parameters()`` + ``frozen_saved_parameters()``."""
        return self.saved_parameters() + self.frozen_saved_parameters()

    def _layer_of(self) -> Dict[int, tuple]:
        """id(adapter parameter) -> (its layer, attribute name), for layers that cut what files hold."""
        return {id(p): (layer, p.name.rsplit(".", 1)[-1]) for layer in self._adapter_layers.values()
                if hasattr(layer, "file_array") for p in layer.adapter_parameters()}

    def _switched_off(self) -> set:
        """ids of the parameters of cells an EVA init gave rank 0 (files leave them out, as PEFT)."""
        return {id(p) for layer in self._adapter_layers.values() if getattr(layer, "effective_rank", 1) == 0
                for p in layer.adapter_parameters()}

    def adapter_state_dict(self) -> Dict[str, np.ndarray]:
        """Saved parameter name -> array in the parameter's own dtype (bfloat16 included), as
        adapter files hold it (A, B at the rank in use)."""
        owners, off = self._layer_of(), self._switched_off()
        out = {}
        for param in self.file_parameters():
            if id(param) in off:
                continue
            value = param_array(param)
            if id(param) in owners:
                layer, attr = owners[id(param)]
                value = layer.file_array(attr, value)
            out[param.name] = value
        return out

    def load_adapter_state_dict(self, arrays: Dict[str, np.ndarray], source: str = "adapter", file_config=None):
        """Set every saved parameter from ``arrays``; a missing, unexpected or mis-shaped
        tensor is an error naming it, raised before anything is changed (but the ranks of
        :meth:`adopt_file_ranks`); ``file_config``: the file's pet config, if known."""
        self.adopt_file_ranks(arrays, file_config)
        owners, off = self._layer_of(), self._switched_off()
        params = {p.name: p for p in self.file_parameters() if id(p) not in off}
        missing = sorted(set(params) - set(arrays))
        unexpected = sorted(set(arrays) - set(params))
        if missing or unexpected:
            raise ValueError(f"{source} does not match this model: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        for name, param in params.items():
            shape = tuple(param.shape)
            if id(param) in owners:
                layer, attr = owners[id(param)]
                shape = layer.file_array(attr, np.zeros(shape, np.float32)).shape
            if tuple(arrays[name].shape) != shape:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(arrays[name].shape)}, "
                                 f"the model's parameter has {shape}")
        for name, param in params.items():
            value = np.asarray(arrays[name])
            if id(param) in owners:
                layer, attr = owners[id(param)]
                value = layer.padded(attr, value)
            param.set_data(Tensor(value, param.dtype))
        self.finish_data_init()

    def adopt_file_ranks(self, arrays: Dict[str, np.ndarray], file_config) -> None:
        """Before a load: take the ranks in use from the file's ``arrays`` where the model's
        cells allow several (EVA); nothing by default."""

    def apply_trainable_mask(self):
        """Exactly the saved parameters trainable, then the user's freeze globs on top.

        ``freeze_include`` / ``freeze_exclude`` keep mindpet's meaning, matched on parameter
        names: a name matching only include is frozen, only exclude is trained, both: untouched.
        """
        config = self.config.pet_config
        adapters = {id(p) for p in self.saved_parameters()}
        include = config.freeze_include
        # The config appends our adapter globs for PetModel's sake; they are not the user's.
        exclude = [g for g in config.freeze_exclude or [] if g not in config.adapter_globs()]
        for param in self.network.get_parameters():
            trainable = id(param) in adapters
            inc = bool(include) and any(fnmatch(param.name, g) for g in include)
            exc = bool(exclude) and any(fnmatch(param.name, g) for g in exclude)
            if inc and not exc:
                trainable = False
            elif exc and not inc:
                trainable = True
            param.requires_grad = trainable

    def save_pet_config(self, save_path: str):
        # pylint: disable=import-outside-toplevel
        from mindformers_lora_ext import peft_format
        from mindformers_lora_ext.hf_map import HfMapError
        try:
            peft_format.write_adapter_config(save_path, self.config.pet_config, self.hf_map())
        except HfMapError as exc:  # training goes on; exporting this adapter to HF PEFT cannot
            logger.warning("mindformers-lora-ext: no %s written: %s", save_path, exc)

    def construct(self, *inputs, **kwargs):
        if self.training and self.data_init_pending is not None and not self.collecting_statistics:
            raise ValueError(self._pending_message)
        return self.network(*inputs, **kwargs)


def _token_layer(network, path, cell, ids):
    check_not_tied(network, table_of(cell), path)
    return TrainableTokens(cell, ids)


def layer_outputs(layer) -> tuple:
    """(experts, output rows) of an adapter layer: routed experts' projections carry
    ``experts`` / ``out_dim``, linear cells ``out_channels``."""
    if getattr(layer, "experts", 0) and hasattr(layer, "out_dim"):
        return int(layer.experts), int(layer.out_dim)
    return 0, int(layer.out_channels)


def _delegate(name):
    def method(self, *args, **kwargs):
        return getattr(self.network, name)(*args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"Forwarded to the base model's ``{name}``."
    return method


for _name in _DELEGATED:
    setattr(AdapterModel, _name, _delegate(_name))


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
