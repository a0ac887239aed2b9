"""Config classes, one per pet type. All validation of ``pet_config`` lives here.

A config is built from the YAML ``model.model_config.pet_config`` mapping. Every key is
checked: an unknown key (a typo, or a stock-``lora`` key we do not implement) is an error with
a did-you-mean, never silently ignored, and every value is checked for type and range.
"""
import copy
import difflib
import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
from typing import Any, Dict, List, Union

from mindformers.pet.pet_config import PetConfig
from mindformers_lora_ext import _boot

KEY_PREFIX = "model.model_config.pet_config"
ALL_LINEAR = "all-linear"
DTYPES = ("float32", "float16", "bfloat16")

# Keys of MindFormers' stock LoraConfig that mean something else (or nothing) here.
_STOCK_LORA_HINTS = {
    "lora_a_init": "our A init is kaiming-uniform (as in HF PEFT)",
    "lora_b_init": "our B init is zeros (as in HF PEFT)",
}
# HF PEFT key names whose MindFormers-side name differs.
_PEFT_KEY_HINTS = {
    "r": "lora_rank",
    "bias": "lora_bias",
}


class PetConfigError(ValueError):
    """A ``pet_config`` key or value that is not accepted; the message names both."""


def _key(name):
    return f"{KEY_PREFIX}.{name}"


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name, value, minimum):
    if not _is_int(value) or value < minimum:
        raise PetConfigError(f"{_key(name)} = {value!r}: expected an integer >= {minimum}")
    return int(value)


def _check_real(name, value, low, high, low_open=False, high_open=False):
    ok = _is_real(value) and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise PetConfigError(f"{_key(name)} = {value!r}: expected a number in {lo}{low}, {high}{hi}")
    return float(value)


def _check_name_list(name, value, allow_none=True):
    """None, or a non-empty list of non-empty strings."""
    if value is None and allow_none:
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise PetConfigError(f"{_key(name)} = {value!r}: expected a non-empty list of strings"
                         + (" or null" if allow_none else ""))


def _check_choice(name, value, choices):
    if value not in choices:
        raise PetConfigError(f"{_key(name)} = {value!r}: expected one of {list(choices)}")
    return value


class AdapterConfig(PetConfig):
    """Base of our pet configs: the targeting and freezing keys every method shares.

    Subclasses set ``pet_type_name``, extend ``DEFAULTS`` and ``_validate``, and list the
    attribute names of their trainable adapter parameters in ``ADAPTER_PARAMETERS``. A pet
    type that is a preset of another (``dora`` = ``lora_ext`` with ``use_dora: true``) lists
    the keys it fixes in ``REQUIRED`` as key -> (description, predicate).
    """

    pet_type_name: str = ""
    ADAPTER_PARAMETERS: tuple = ()
    REQUIRED: Dict[str, tuple] = {}
    # key -> why it is not accepted / what it is spelled here (for unknown-key errors)
    KEY_HINTS: Dict[str, str] = {}
    DEFAULTS: Dict[str, Any] = {
        "target_modules": None,
        "exclude_layers": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "param_init_type": None,
        "compute_dtype": None,
        "freeze_include": None,
        "freeze_exclude": None,
        "adapter_path": None,
        "merge_on_load": False,
    }

    def __init__(self, **kwargs):
        kwargs.pop("pet_type", None)
        # A key of another pet type set to null counts as not given: a YAML that inherits another
        # type's pet_config through base_config (MindFormers merges dicts and cannot delete a
        # key) cancels the inherited keys this way (configs/tiny/vera.yaml).
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in self.DEFAULTS}
        unknown = sorted(set(kwargs) - set(self.DEFAULTS))
        if unknown:
            raise PetConfigError(self._unknown_key_message(unknown[0]))
        values = dict(self.DEFAULTS)
        values.update(kwargs)
        super().__init__(pet_type=self.pet_type_name)
        values = self._validate(values)
        for name, (description, accepts) in self.REQUIRED.items():
            if not accepts(values[name]):
                raise PetConfigError(
                    f"{_key(name)} = {kwargs[name]!r} contradicts pet_type {self.pet_type_name!r}, "
                    f"which means {name}: {description}. Drop the key, or pick another pet_type.")
        for name, value in values.items():
            setattr(self, name, value)

    def __deepcopy__(self, memo=None):
        # DictConfig's deepcopy builds an empty instance first, which validation refuses.
        return type(self)(**copy.deepcopy(dict(self), memo))

    @classmethod
    def from_pet_config(cls, config):
        """Build from the YAML mapping (or return ``config`` if it already is one of ours)."""
        if isinstance(config, cls):
            return config
        data = dict(config)
        pet_type = data.pop("pet_type", cls.pet_type_name)
        if pet_type != cls.pet_type_name:
            raise PetConfigError(f"{_key('pet_type')} = {pet_type!r} does not match config class "
                                 f"{cls.__name__} (pet type {cls.pet_type_name!r})")
        return cls(**data)

    def _unknown_key_message(self, key):
        known = sorted(set(self.DEFAULTS))
        if key in self.KEY_HINTS:
            return (f"{_key(key)} is not an option of pet type {self.pet_type_name!r}: "
                    f"{self.KEY_HINTS[key]}. Accepted keys: {', '.join(known)}")
        if key in _STOCK_LORA_HINTS:
            return (f"{_key(key)} is a key of MindFormers' stock 'lora', not of "
                    f"{self.pet_type_name!r}: {_STOCK_LORA_HINTS[key]}. Remove it. "
                    f"Accepted keys: {', '.join(known)}")
        if key in _PEFT_KEY_HINTS and _PEFT_KEY_HINTS[key] in known:
            return (f"{_key(key)}: HF PEFT's {key!r} is spelled {_PEFT_KEY_HINTS[key]!r} here. "
                    f"Accepted keys: {', '.join(known)}")
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (f"{_key(key)} is not an option of pet type {self.pet_type_name!r}.{hint} "
                f"Accepted keys: {', '.join(known)}")

    def _validate(self, values: Dict[str, Any]) -> Dict[str, Any]:
        if values["target_modules"] is None:
            raise PetConfigError(
                f"{_key('target_modules')} is required: a regex matched against full cell names "
                f"(e.g. '.*wq|.*wk|.*wv|.*wo'), a list of cell-name suffixes (e.g. [wq, wv]), "
                f"or '{ALL_LINEAR}'")
        values["target_modules"] = _check_pattern("target_modules", values["target_modules"])
        values["exclude_layers"] = _check_pattern("exclude_layers", values["exclude_layers"])
        values["layers_to_transform"] = _check_layers(values["layers_to_transform"])
        pattern = values["layers_pattern"]
        if pattern is not None:
            if values["layers_to_transform"] is None:
                raise PetConfigError(f"{_key('layers_pattern')} = {pattern!r} only applies together "
                                     f"with {_key('layers_to_transform')}, which is not set")
            values["layers_pattern"] = _check_name_list(
                "layers_pattern", [pattern] if isinstance(pattern, str) else pattern)
        values["modules_to_save"] = _check_name_list("modules_to_save", values["modules_to_save"])
        for name in ("param_init_type", "compute_dtype"):
            if values[name] is not None:
                _check_choice(name, values[name], DTYPES)
        for name in ("freeze_include", "freeze_exclude"):
            values[name] = _check_name_list(name, values[name])
        values["adapter_path"] = _check_adapter_path(values["adapter_path"])
        values["merge_on_load"] = _check_bool("merge_on_load", values["merge_on_load"])
        # PetModel freezes by globs before we recompute the trainable set exactly; giving it
        # our adapter globs keeps its result right too (and mcore models need a non-empty list).
        exclude = values["freeze_exclude"] or []
        values["freeze_exclude"] = exclude + [g for g in self.adapter_globs() if g not in exclude]
        return values

    def adapter_globs(self) -> List[str]:
        """Name globs of the adapter parameters, for mindpet's glob-based freezing."""
        return [f"*.{param}" for param in self.ADAPTER_PARAMETERS]

    def file_shared_tensors(self) -> tuple:
        """Names of the frozen model-level tensors adapter files hold (VeRA's projections)."""
        return ()


def _check_adapter_path(value):
    """An adapter directory (or a checkpoint root holding ``latest`` / ``step_<N>``)."""
    if value is None or value == "":
        return None
    from mindformers_lora_ext.adapter_files import (  # pylint: disable=import-outside-toplevel
        AdapterFileError, resolve_adapter_dir)
    if not isinstance(value, str):
        raise PetConfigError(f"{_key('adapter_path')} = {value!r}: expected a directory path")
    try:
        resolve_adapter_dir(value)
    except (AdapterFileError, OSError) as exc:
        raise PetConfigError(f"{_key('adapter_path')} = {value!r}: {exc}") from exc
    return value


def _check_pattern(name, value):
    """A cell selector: None, a regex string (or 'all-linear' for target_modules), or a name list."""
    is_target = name == "target_modules"
    if not isinstance(value, str):
        return _check_name_list(name, value, allow_none=not is_target)
    if is_target and not value:
        raise PetConfigError(f"{_key(name)} = '': expected a regex, a list or '{ALL_LINEAR}'")
    if is_target and value == ALL_LINEAR:
        return value
    _check_regex(name, value)
    return value


def _check_regex(name, value):
    try:
        re.compile(value)
    except re.error as exc:
        raise PetConfigError(f"{_key(name)} = {value!r} is not a valid regex: {exc}") from exc


def _check_layers(value):
    """``layers_to_transform``: None, an index, or a non-empty list of distinct indices >= 0."""
    items = [value] if _is_int(value) else value
    if value is None:
        return None
    if isinstance(items, (list, tuple)) and items and all(_is_int(i) and i >= 0 for i in items) \
            and len(set(items)) == len(items):
        return sorted(int(i) for i in items)
    raise PetConfigError(f"{_key('layers_to_transform')} = {value!r}: expected a layer index >= 0 "
                         f"or a non-empty list of distinct indices")


def _check_pattern_dict(name, value, check_value):
    """``rank_pattern`` / ``alpha_pattern``: {regex: value}, as in HF PEFT."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PetConfigError(f"{_key(name)} = {value!r}: expected a mapping of regex -> value")
    out = {}
    for pattern, item in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise PetConfigError(f"{_key(name)} key {pattern!r}: expected a non-empty regex string")
        _check_regex(f"{name}[{pattern!r}]", pattern)
        out[pattern] = check_value(f"{name}[{pattern!r}]", item)
    return out


def pattern_value(patterns: Dict[str, Any], name: str, default):
    """The value of the first key of ``patterns`` matching cell ``name`` (HF PEFT's rule: the
    key must match a trailing run of whole name components), else ``default``."""
    for pattern, value in patterns.items():
        if name == pattern or re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            return value
    return default


INIT_SCHEMES = ("true", "false", "kaiming", "gaussian", "pissa", "pissa_niter_<N>", "olora", "eva", "corda",
                "lora_ga")
# initialisations from the training data (data_init/): run by the DataDrivenInit callback
DATA_DRIVEN_INITS = ("eva", "corda", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def _check_init(value):
    """``init_lora_weights`` -> True | False | 'gaussian' | 'pissa' | 'pissa_niter_N' | 'olora' |
    'eva' | 'corda' | 'lora_ga'."""
    if value is True or value is False:
        return value
    if value == "kaiming":
        return True
    if value in ("gaussian", "pissa", "olora") + DATA_DRIVEN_INITS \
            or (isinstance(value, str) and _PISSA_NITER.fullmatch(value)):
        return value
    raise PetConfigError(f"{_key('init_lora_weights')} = {value!r}: expected one of "
                         f"{list(INIT_SCHEMES)} (N a positive integer)")


def pissa_niter(init) -> Union[int, None]:
    """Subspace iterations of fast PiSSA (``pissa_niter_4`` -> 4); None for exact SVD or not PiSSA."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise PetConfigError(f"{_key(name)} = {value!r}: expected true or false")
    return value


@dataclass(frozen=True)
class LoraSpec:
    """What one adapted cell gets: rank r, scaling s, dropout p, init scheme, variant flags;
    ``rows``: the rank its A and B are allocated with (EVA: round(r * rho), so a redistributed
    rank fits; the rows past the rank in use stay zero), default r."""

    rank: int
    alpha: float
    scaling: float
    dropout: float
    init: Union[bool, str]
    use_dora: bool
    lora_bias: bool
    use_fused_kernel: Union[bool, str] = "auto"
    rows: int = 0
    use_rslora: bool = False

    @property
    def allocated(self) -> int:
        """Rows of A (and columns of B)."""
        return max(self.rows, self.rank)


class LoraExtConfig(AdapterConfig):
    """``pet_type: lora_ext``: y = base(x) + s * B(A(dropout(x))), HF PEFT's LoraConfig knobs.

    Keys (PEFT meaning): ``lora_rank`` (PEFT ``r``, int >= 1, default 8), ``lora_alpha`` (> 0,
    default 16), ``lora_dropout`` ([0, 1)), ``use_rslora`` (s = alpha/sqrt(r) instead of
    alpha/r), ``use_dora``, ``init_lora_weights`` (true/kaiming, false, gaussian, pissa,
    pissa_niter_N, olora), ``rank_pattern`` / ``alpha_pattern`` ({regex: value}), ``lora_bias``
    (a trainable bias on B), ``fused_cells`` (shared: one adapter per MindFormers cell, also for a
    cell fusing several HF modules such as mcore ``linear_qkv`` = q/k/v and ``linear_fc1`` =
    gate/up; per_hf_module: one adapter per HF module inside such cells, as HF PEFT trains them,
    each of rank ``lora_rank`` and scaling from it), ``trainable_token_indices`` (train only these
    rows of an embedding table: a list of token ids for the model's input embedding, or
    {embedding cell: [ids]}; see tuners/trainable_tokens.py), ``eva_config`` / ``corda_config`` /
    ``lora_ga_config`` (the options of ``init_lora_weights`` eva / corda / lora_ga, HF PEFT's
    EvaConfig / CordaConfig / LoraGAConfig fields, see data_init/), plus the targeting keys of
    AdapterConfig.
    """

    pet_type_name = "lora_ext"
    ADAPTER_PARAMETERS = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector", "trainable_tokens_delta")
    DEFAULTS = dict(AdapterConfig.DEFAULTS, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                    use_rslora=False, use_dora=False, init_lora_weights=True, rank_pattern=None,
                    alpha_pattern=None, lora_bias=False, use_fused_kernel="auto", fused_cells="shared",
                    trainable_token_indices=None, eva_config=None, corda_config=None, lora_ga_config=None)

    def _validate(self, values):
        values = super()._validate(values)
        values["lora_rank"] = _check_int("lora_rank", values["lora_rank"], 1)
        values["lora_alpha"] = _check_alpha("lora_alpha", values["lora_alpha"])
        values["lora_dropout"] = _check_real("lora_dropout", values["lora_dropout"], 0, 1,
                                             high_open=True)
        for name in ("use_rslora", "use_dora", "lora_bias"):
            values[name] = _check_bool(name, values[name])
        values["init_lora_weights"] = _check_init(values["init_lora_weights"])
        values["rank_pattern"] = _check_pattern_dict(
            "rank_pattern", values["rank_pattern"], lambda k, v: _check_int(k, v, 1))
        values["alpha_pattern"] = _check_pattern_dict("alpha_pattern", values["alpha_pattern"],
                                                      _check_alpha)
        values["use_fused_kernel"] = _check_use_fused(values["use_fused_kernel"])
        values["fused_cells"] = _check_choice("fused_cells", values["fused_cells"], FUSED_CELLS)
        values["trainable_token_indices"] = _check_token_indices(values["trainable_token_indices"],
                                                                 values["modules_to_save"])
        for init, name in (("eva", "eva_config"), ("corda", "corda_config"), ("lora_ga", "lora_ga_config")):
            values[name] = _check_subconfig(name, values[name], init, values["init_lora_weights"])
        if values["fused_cells"] == "per_hf_module" and values["init_lora_weights"] not in (True, "gaussian"):
            raise PetConfigError(
                f"{_key('fused_cells')} = per_hf_module needs init_lora_weights true or gaussian (B starts "
                f"at zero, so each module's adapter starts apart), got {values['init_lora_weights']!r}")
        if values["use_fused_kernel"] is True and values["use_dora"] and values["lora_dropout"] == 0:
            raise PetConfigError(f"{_key('use_fused_kernel')} = true with use_dora needs lora_dropout > 0: "
                                 f"DoRA's kernel is its dropout correction (the fused LoRA matmul computes "
                                 f"plain LoRA), so there is nothing to fuse at lora_dropout 0 (use auto)")
        if values["lora_bias"] and values["use_dora"]:
            raise PetConfigError(f"{_key('lora_bias')} = true is not supported with use_dora "
                                 f"(as in HF PEFT): DoRA rescales the whole output")
        if values["lora_bias"] and values["init_lora_weights"] not in (True, False):
            raise PetConfigError(
                f"{_key('lora_bias')} = true needs init_lora_weights true or false (as in HF "
                f"PEFT), got {values['init_lora_weights']!r}")
        return values

    def peft_fields(self, names) -> dict:
        """The LoraConfig-specific fields of ``adapter_config.json`` for the adapted cells of
        ``names`` (an hf_map.HfMap)."""
        rank_pattern, alpha_pattern = _resolved_patterns(self, names, self.lora_rank, self.lora_alpha)
        # EVA may switch cells off (rank 0): name each adapted module, as PEFT's EVA does
        targets = _hf_targets(names, full=self.init_lora_weights == "eva")
        fields = {"peft_type": "LORA", "r": self.lora_rank, "lora_alpha": self.lora_alpha,
                  "lora_dropout": self.lora_dropout, "target_modules": targets,
                  "bias": "none", "fan_in_fan_out": False, "init_lora_weights": self.init_lora_weights,
                  "use_rslora": self.use_rslora, "use_dora": self.use_dora, "lora_bias": self.lora_bias,
                  "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
        for name in _SUBCONFIGS:
            if getattr(self, name) is not None:
                fields[name] = dict(getattr(self, name))
        if self.trainable_token_indices is not None:
            fields["trainable_token_indices"] = _hf_token_indices(self.trainable_token_indices, names)
        return fields

    def record_ranks(self, ranks: Dict[str, tuple]) -> None:
        """Record per-cell (rank, alpha) that differ from what the patterns give (EVA's
        redistribution, or a loaded EVA adapter's) as exact-name entries ahead of
        ``rank_pattern`` / ``alpha_pattern``, so files and later builds see them."""
        rank_pattern, alpha_pattern = {}, {}
        for name, (rank, alpha) in ranks.items():
            current = self.module_options(name)
            if rank and rank != current.rank:
                rank_pattern[re.escape(name)] = rank
            if rank and alpha != current.alpha:
                alpha_pattern[re.escape(name)] = alpha
        self.rank_pattern = dict(rank_pattern, **{k: v for k, v in self.rank_pattern.items() if k not in rank_pattern})
        self.alpha_pattern = dict(alpha_pattern, **{k: v for k, v in self.alpha_pattern.items()
                                                    if k not in alpha_pattern})

    def module_options(self, name: str) -> LoraSpec:
        """The LoRA settings of target cell ``name`` (rank_pattern/alpha_pattern applied)."""
        rank = pattern_value(self.rank_pattern, name, self.lora_rank)
        alpha = pattern_value(self.alpha_pattern, name, self.lora_alpha)
        rows = int(round(rank * self.eva_config["rho"])) if self.init_lora_weights == "eva" else rank
        return LoraSpec(rank=rank, alpha=alpha, scaling=lora_scaling(alpha, rank, self.use_rslora),
                        dropout=self.lora_dropout, init=self.init_lora_weights, use_dora=self.use_dora,
                        lora_bias=self.lora_bias, use_fused_kernel=self.use_fused_kernel, rows=rows,
                        use_rslora=self.use_rslora)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# The options of the data-driven inits: HF PEFT's EvaConfig / CordaConfig / LoraGAConfig fields,
# key -> (default, check(name, value) -> value).
def _bool_field(name, value):
    return _check_bool(name, value)


def _optional_path(name, value):
    if value is not None and (not isinstance(value, str) or not value):
        raise PetConfigError(f"{_key(name)} = {value!r}: expected a file path or null")
    return value


def _int_field(name, value):
    if not _is_int(value):
        raise PetConfigError(f"{_key(name)} = {value!r}: expected an integer")
    return int(value)


_SUBCONFIGS = {
    "eva_config": {
        "rho": (2.0, lambda n, v: _check_real(n, v, 1, float("inf"), high_open=True)),
        "tau": (0.99, lambda n, v: _check_real(n, v, 0, 1)),
        "use_label_mask": (True, _bool_field),
        "label_mask_value": (-100, _int_field),
        "whiten": (False, _bool_field),
        "adjust_scaling_factors": (True, _bool_field),
    },
    "corda_config": {
        "cache_file": (None, _optional_path),
        "covariance_file": (None, _optional_path),
        "corda_method": ("ipm", lambda n, v: _check_choice(n, v, ("ipm", "kpm"))),
        "verbose": (False, _bool_field),
        "use_float16_for_covariance": (False, _bool_field),
        # PEFT drops its temporary per-module fields; ours never outlive the pass: no effect here
        "prune_temporary_fields": (True, _bool_field),
    },
    "lora_ga_config": {
        "direction": ("ArB2r", lambda n, v: _check_choice(n, v, ("ArB2r", "A2rBr", "ArBr", "random"))),
        "scale": ("stable", lambda n, v: _check_choice(n, v, ("stable", "weight_svd", "gd_scale", "unit"))),
        "stable_gamma": (16, lambda n, v: _check_real(n, v, 0, float("inf"), low_open=True, high_open=True)),
    },
}


def _check_subconfig(name, value, init, chosen):
    """``eva_config`` / ``corda_config`` / ``lora_ga_config``: a mapping of its fields (defaults
    filled in) when ``init_lora_weights`` is ``init``, else absent."""
    if chosen != init:
        if value is not None:
            raise PetConfigError(f"{_key(name)} is given but init_lora_weights = {chosen!r}: it configures "
                                 f"init_lora_weights: {init} only. Drop it, or set init_lora_weights: {init}")
        return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise PetConfigError(f"{_key(name)} = {value!r}: expected a mapping of its options "
                             f"({', '.join(_SUBCONFIGS[name])})")
    fields = _SUBCONFIGS[name]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PetConfigError(f"{_key(name)}.{unknown[0]} is not an option of {name}.{hint} Accepted: "
                             f"{', '.join(fields)}")
    return {key: check(f"{name}.{key}", value[key]) if key in value else default
            for key, (default, check) in fields.items()}


def _hf_token_indices(value, names):
    """``trainable_token_indices`` for adapter_config.json: a list as is (PEFT: the input
    embedding), a mapping keyed by the HF module's last name (PEFT matches names by their end)."""
    if isinstance(value, list):
        return list(value)
    suffix = ".token_adapter.trainable_tokens_delta"
    modules = {mf.rpartition(".")[0]: hf[: -len(suffix)] for mf, hf in names.params.items() if hf.endswith(suffix)}
    out = {}
    for key, ids in value.items():
        found = [hf for cell, hf in modules.items() if cell == key or cell.endswith("." + key)]
        out[found[0].rsplit(".", 1)[-1] if found else key] = list(ids)
    return out


def _check_token_ids(name, ids):
    if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise PetConfigError(f"{_key(name)} = {ids!r}: expected a non-empty list of token ids (integers >= 0)")
    repeated = sorted({int(i) for i in ids if list(ids).count(i) > 1})
    if repeated:
        raise PetConfigError(f"{_key(name)} = {ids!r}: token id(s) {repeated} repeated; each row trains once")
    return [int(i) for i in ids]


def _check_token_indices(value, modules_to_save):
    """``trainable_token_indices`` (HF PEFT's): None, [ids] (the input embedding), or
    {embedding cell name (or a trailing part of it): [ids]}."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return _check_token_ids("trainable_token_indices", value)
    if not isinstance(value, dict) or not value:
        raise PetConfigError(f"{_key('trainable_token_indices')} = {value!r}: expected a list of token ids "
                             f"or a mapping {{embedding cell: [ids]}}")
    out = {}
    for cell, ids in value.items():
        if not isinstance(cell, str) or not cell:
            raise PetConfigError(f"{_key('trainable_token_indices')} key {cell!r}: expected an embedding cell name")
        if cell in (modules_to_save or []):
            raise PetConfigError(f"{_key('trainable_token_indices')} names {cell!r}, which modules_to_save trains "
                                 f"whole: train the cell whole or some of its rows, not both")
        out[cell] = _check_token_ids(f"trainable_token_indices[{cell!r}]", ids)
    return out


def _check_use_fused(value):
    """``use_fused_kernel``: auto (default), true or false."""
    from mindformers_lora_ext.kernels.dispatch import check_use_fused  # pylint: disable=import-outside-toplevel
    try:
        return check_use_fused(value)
    except ValueError as exc:
        raise PetConfigError(f"{_key('use_fused_kernel')} = {value!r}: expected auto, true or false") from exc


def _check_alpha(name, value):
    return _check_real(name, value, 0, float("inf"), low_open=True, high_open=True)


FUSED_CELLS = ("shared", "per_hf_module")


class DoraConfig(LoraExtConfig):
    """``pet_type: dora``: ``lora_ext`` with ``use_dora: true``."""

    pet_type_name = "dora"
    DEFAULTS = dict(LoraExtConfig.DEFAULTS, use_dora=True)
    REQUIRED = {"use_dora": ("true", lambda v: v is True)}


class RsLoraConfig(LoraExtConfig):
    """``pet_type: rslora``: ``lora_ext`` with ``use_rslora: true`` (s = alpha / sqrt(r))."""

    pet_type_name = "rslora"
    DEFAULTS = dict(LoraExtConfig.DEFAULTS, use_rslora=True)
    REQUIRED = {"use_rslora": ("true", lambda v: v is True)}


class PissaConfig(LoraExtConfig):
    """``pet_type: pissa``: ``lora_ext`` with ``init_lora_weights: pissa`` (or pissa_niter_N)."""

    pet_type_name = "pissa"
    DEFAULTS = dict(LoraExtConfig.DEFAULTS, init_lora_weights="pissa")
    REQUIRED = {"init_lora_weights": ("pissa or pissa_niter_<N>",
                                      lambda v: v == "pissa" or pissa_niter(v) is not None)}


class OloraConfig(LoraExtConfig):
    """``pet_type: olora``: ``lora_ext`` with ``init_lora_weights: olora``."""

    pet_type_name = "olora"
    DEFAULTS = dict(LoraExtConfig.DEFAULTS, init_lora_weights="olora")
    REQUIRED = {"init_lora_weights": ("olora", lambda v: v == "olora")}


LORA_PRESETS = (LoraExtConfig, DoraConfig, RsLoraConfig, PissaConfig, OloraConfig)


# --------------------------------------------------------------------------------------------
# Structurally different adapters: VeRA, LoHa, LoKr (HF PEFT's VeraConfig / LoHaConfig /
# LoKrConfig option names and meanings; PEFT's ``exclude_modules`` is ``exclude_layers`` here).

_LORA_TYPES = "the LoRA pet types (lora_ext, dora, rslora, pissa, olora)"
_COMMON_HINTS = {
    "exclude_modules": "HF PEFT's 'exclude_modules' is spelled 'exclude_layers' here",
    "bias": "only HF PEFT's bias='none' is supported (base biases stay frozen): drop the key",
    "fan_in_fan_out": "not needed: the adapter reads the base cell's own weight layout",
    "use_effective_conv2d": "only linear cells are adapted here (no Conv layers): drop the key",
    "use_dora": f"an option of {_LORA_TYPES} only",
    "use_rslora": f"an option of {_LORA_TYPES} only",
    "init_lora_weights": f"an option of {_LORA_TYPES}; this method's initialisation key is 'init_weights'",
    "lora_bias": f"an option of {_LORA_TYPES} only",
    "lora_rank": "the rank is spelled 'r' here, as in HF PEFT",
    "trainable_token_indices": f"an option of {_LORA_TYPES} only (as of HF PEFT's LoraConfig)",
}


def _check_finite(name, value):
    if not _is_real(value) or not math.isfinite(value):
        raise PetConfigError(f"{_key(name)} = {value!r}: expected a finite number")
    return float(value)


def _check_dropout(name, value):
    return _check_real(name, value, 0, 1, high_open=True)


def _resolved_patterns(config, names, rank, alpha):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` resolved per adapted cell of ``names`` (an
    hf_map.HfMap): full HF module name -> value, only where it differs from the default ``rank``
    / ``alpha`` (PEFT matches a full name exactly, so our regexes need no translation); every HF
    module of a fused cell gets the cell's value."""
    rank_pattern, alpha_pattern = {}, {}
    for name, modules in names.hf_modules().items():
        spec = config.module_options(name)
        for module in modules:
            if spec.rank != rank:
                rank_pattern[module] = spec.rank
            if spec.alpha != alpha:
                alpha_pattern[module] = spec.alpha
    return rank_pattern, alpha_pattern


def _hf_targets(names, full=False):
    """PEFT's ``target_modules``: the last name components of the HF modules of ``names`` (their
    full names with ``full``)."""
    return sorted({m if full else m.rsplit(".", 1)[-1] for modules in names.hf_modules().values() for m in modules})


@dataclass(frozen=True)
class VeraSpec:
    """What one VeRA cell gets: rank r, input dropout, lambda_d's initial value, init scheme."""

    rank: int
    dropout: float
    d_initial: float
    init_weights: bool


class VeraConfig(AdapterConfig):
    """``pet_type: vera`` (HF PEFT's VeraConfig): h = base(x) + b * (B (d * (A dropout(x)))).

    A [r, in_max] and B [out_max, r] are frozen random projections shared by every target
    (sized to the largest target, sliced per cell), made from ``projection_prng_key``; the
    trainable vectors are d [r] (``vera_lambda_d``, starts at ``d_initial``) and b [out]
    (``vera_lambda_b``, starts at 0). Keys: ``r`` (default 256), ``projection_prng_key`` (int
    >= 0, default 0), ``save_projection`` (store A and B in adapter files, default true as in
    PEFT), ``vera_dropout`` ([0, 1)), ``d_initial`` (default 0.1), ``init_weights`` (true; false:
    b = 1 and d ~ N(0, 1), the adapter starts non-zero), plus the targeting keys.
    """

    pet_type_name = "vera"
    PEFT_TYPE = "VERA"
    ADAPTER_PARAMETERS = ("vera_lambda_b", "vera_lambda_d")
    PEFT_TENSOR_SUFFIXES = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}
    DEFAULTS = dict(AdapterConfig.DEFAULTS, r=256, projection_prng_key=0, save_projection=True,
                    vera_dropout=0.0, d_initial=0.1, init_weights=True)
    KEY_HINTS = dict(_COMMON_HINTS,
                     lora_alpha="VeRA has no alpha: its scale is learned (vera_lambda_b, vera_lambda_d)",
                     alpha="VeRA has no alpha: its scale is learned (vera_lambda_b, vera_lambda_d)",
                     lora_dropout="the input dropout is spelled 'vera_dropout' here, as in HF PEFT",
                     rank_pattern="VeRA shares one rank across all targets (HF PEFT has no rank_pattern for it)",
                     alpha_pattern="VeRA has no alpha")

    def _validate(self, values):
        values = super()._validate(values)
        values["r"] = _check_int("r", values["r"], 1)
        values["projection_prng_key"] = _check_int("projection_prng_key", values["projection_prng_key"], 0)
        for name in ("save_projection", "init_weights"):
            values[name] = _check_bool(name, values[name])
        values["vera_dropout"] = _check_dropout("vera_dropout", values["vera_dropout"])
        values["d_initial"] = _check_finite("d_initial", values["d_initial"])
        return values

    def file_shared_tensors(self) -> tuple:
        """``vera_A`` / ``vera_B`` unless ``save_projection`` is false (PEFT's rule)."""
        return ("vera_A", "vera_B") if self.save_projection else ()

    def module_options(self, name: str) -> VeraSpec:  # pylint: disable=unused-argument
        """VeRA's settings are the same for every target."""
        return VeraSpec(rank=self.r, dropout=self.vera_dropout, d_initial=self.d_initial,
                        init_weights=self.init_weights)

    def peft_fields(self, names) -> dict:
        """The VeraConfig-specific fields of ``adapter_config.json``."""
        return {"peft_type": self.PEFT_TYPE, "r": self.r, "target_modules": _hf_targets(names),
                "projection_prng_key": self.projection_prng_key, "save_projection": self.save_projection,
                "vera_dropout": self.vera_dropout, "d_initial": self.d_initial, "fan_in_fan_out": False,
                "bias": "none", "init_weights": self.init_weights}

    @classmethod
    def pet_fields_from_peft(cls, data: dict) -> dict:
        """Our keys for the method-specific fields of a PEFT VeraConfig dict."""
        return {"r": data.get("r", 256), "projection_prng_key": data.get("projection_prng_key", 0),
                "save_projection": bool(data.get("save_projection", True)),
                "vera_dropout": data.get("vera_dropout", 0.0), "d_initial": data.get("d_initial", 0.1),
                "init_weights": bool(data.get("init_weights", True))}


@dataclass(frozen=True)
class LycorisSpec:
    """What one LoHa / LoKr cell gets (LoKr also uses the decompose fields)."""

    rank: int
    alpha: float
    scaling: float
    rank_dropout: float
    module_dropout: float
    init_weights: Union[bool, str]
    rank_dropout_scale: bool = True
    decompose_both: bool = False
    decompose_factor: int = -1


class _LycorisConfig(AdapterConfig):
    """Keys LoHa and LoKr share (HF PEFT's LycorisConfig): ``r``, ``alpha`` (scaling alpha/r),
    ``rank_dropout`` (training: each output row of the update kept with probability 1 - p),
    ``module_dropout`` (training: the whole update skipped with probability p), ``init_weights``,
    ``rank_pattern`` / ``alpha_pattern``."""

    INIT_CHOICES: tuple = (True, False)
    DEFAULTS = dict(AdapterConfig.DEFAULTS, r=8, alpha=8, rank_dropout=0.0, module_dropout=0.0,
                    init_weights=True, rank_pattern=None, alpha_pattern=None)
    KEY_HINTS = dict(_COMMON_HINTS,
                     lora_alpha="alpha is spelled 'alpha' here, as in HF PEFT",
                     lora_dropout="LyCORIS adapters have no input dropout; see 'rank_dropout' and "
                                  "'module_dropout' (HF PEFT's names)")

    def _validate(self, values):
        values = super()._validate(values)
        values["r"] = _check_int("r", values["r"], 1)
        values["alpha"] = _check_alpha("alpha", values["alpha"])
        for name in ("rank_dropout", "module_dropout"):
            values[name] = _check_dropout(name, values[name])
        if values["init_weights"] not in self.INIT_CHOICES or not isinstance(values["init_weights"], (bool, str)):
            raise PetConfigError(f"{_key('init_weights')} = {values['init_weights']!r}: expected one of "
                                 f"{[str(c).lower() if isinstance(c, bool) else c for c in self.INIT_CHOICES]}")
        values["rank_pattern"] = _check_pattern_dict(
            "rank_pattern", values["rank_pattern"], lambda k, v: _check_int(k, v, 1))
        values["alpha_pattern"] = _check_pattern_dict("alpha_pattern", values["alpha_pattern"], _check_alpha)
        return values

    def _spec_fields(self, name):
        rank = pattern_value(self.rank_pattern, name, self.r)
        alpha = pattern_value(self.alpha_pattern, name, self.alpha)
        return dict(rank=rank, alpha=alpha, scaling=alpha / rank, rank_dropout=self.rank_dropout,
                    module_dropout=self.module_dropout, init_weights=self.init_weights)

    def module_options(self, name: str) -> LycorisSpec:
        """The settings of target cell ``name`` (rank_pattern / alpha_pattern applied)."""
        return LycorisSpec(**self._spec_fields(name))

    def peft_fields(self, names) -> dict:
        """The method-specific fields of ``adapter_config.json`` (patterns resolved per module,
        with full HF module names, as for LoRA)."""
        rank_pattern, alpha_pattern = _resolved_patterns(self, names, self.r, self.alpha)
        return {"peft_type": self.PEFT_TYPE, "r": self.r, "alpha": self.alpha,
                "target_modules": _hf_targets(names), "exclude_modules": None,
                "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                "use_effective_conv2d": False, "init_weights": self.init_weights,
                "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}

    @classmethod
    def pet_fields_from_peft(cls, data: dict) -> dict:
        return {"r": data.get("r", 8), "alpha": data.get("alpha", 8),
                "rank_dropout": data.get("rank_dropout", 0.0),
                "module_dropout": data.get("module_dropout", 0.0),
                "init_weights": data.get("init_weights", True)}


class LohaConfig(_LycorisConfig):
    """``pet_type: loha`` (HF PEFT's LoHaConfig): dW = ((w1_a w1_b) * (w2_a w2_b)) * alpha / r, a
    Hadamard product of two rank-r products; w1_a, w2_a [out, r], w1_b, w2_b [r, in]. Init
    (``init_weights: true``): w2_b = 0, the others kaiming-uniform, so dW starts at 0; false:
    all four random. ``rank_dropout`` rescales the kept rows by 1/mean (as PEFT's LoHa does)."""

    pet_type_name = "loha"
    PEFT_TYPE = "LOHA"
    ADAPTER_PARAMETERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    PEFT_TENSOR_SUFFIXES = {p: p for p in ADAPTER_PARAMETERS}


class LokrConfig(_LycorisConfig):
    """``pet_type: lokr`` (HF PEFT's LoKrConfig): dW = kron(w1, w2) * alpha / r.

    With in = in_m * in_n and out = out_l * out_k from :func:`lokr_factorization` of each dim
    (``decompose_factor``), w1 is [out_l, in_m] and w2 [out_k, in_n]. w2 is stored as the
    rank-r product w2_a [out_k, r] @ w2_b [r, in_n] when r < max(out_k, in_n) / 2, else whole;
    w1 likewise (w1_a, w1_b) only with ``decompose_both`` and r < max(out_l, in_m) / 2.
    ``init_weights``: true (w1 / w1_a = 0, the rest kaiming-uniform), ``lycoris`` (w2 / w2_b = 0
    instead), false (all random). ``rank_dropout_scale``: rescale the kept rows by 1/mean.
    """

    pet_type_name = "lokr"
    PEFT_TYPE = "LOKR"
    INIT_CHOICES = (True, False, "lycoris")
    ADAPTER_PARAMETERS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    PEFT_TENSOR_SUFFIXES = {p: p for p in ADAPTER_PARAMETERS}
    DEFAULTS = dict(_LycorisConfig.DEFAULTS, decompose_both=False, decompose_factor=-1,
                    rank_dropout_scale=False)

    def _validate(self, values):
        values = super()._validate(values)
        for name in ("decompose_both", "rank_dropout_scale"):
            values[name] = _check_bool(name, values[name])
        factor = values["decompose_factor"]
        if not _is_int(factor) or (factor != -1 and factor < 1):
            raise PetConfigError(f"{_key('decompose_factor')} = {factor!r}: expected -1 (split each "
                                 f"dimension near its square root) or an integer >= 1")
        values["decompose_factor"] = int(factor)
        return values

    def module_options(self, name: str) -> LycorisSpec:
        return LycorisSpec(**self._spec_fields(name), rank_dropout_scale=self.rank_dropout_scale,
                           decompose_both=self.decompose_both, decompose_factor=self.decompose_factor)

    def peft_fields(self, names) -> dict:
        return dict(super().peft_fields(names), decompose_both=self.decompose_both,
                    decompose_factor=self.decompose_factor, rank_dropout_scale=self.rank_dropout_scale)

    @classmethod
    def pet_fields_from_peft(cls, data: dict) -> dict:
        return dict(super().pet_fields_from_peft(data), decompose_both=bool(data.get("decompose_both", False)),
                    decompose_factor=data.get("decompose_factor", -1),
                    rank_dropout_scale=bool(data.get("rank_dropout_scale", False)))


def lokr_factorization(dimension: int, factor: int = -1):
    """HF PEFT's (LyCORIS') split of a dimension into (m, n), m * n = dimension, for LoKr.

    ``factor`` > 0 dividing ``dimension``: (factor, dimension // factor), in that order.
    Otherwise m walks up the divisors of ``dimension`` while m < n and (``factor`` > 0) m <=
    ``factor``; the last pair reached is returned smaller first. With -1 that is the divisor pair
    nearest the square root (128 -> (8, 16), 256 -> (16, 16)); a prime gives (1, dimension).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 2
    while m < n and candidate <= dimension:
        if dimension % candidate == 0:
            if candidate > limit:
                break
            m, n = candidate, dimension // candidate
        candidate += 1
    return (n, m) if m > n else (m, n)


# pet types that are not LoRA presets (each has its own HF PEFT peft_type)
STRUCTURED_METHODS = (VeraConfig, LohaConfig, LokrConfig)


# --------------------------------------------------------------------------------------------
# AdaLoRA (HF PEFT's AdaLoraConfig names and meanings).

@dataclass(frozen=True)
class AdaLoraSpec:
    """What one AdaLoRA cell gets: its current rank, input dropout, and the output scale
    s / (init_r + 1e-5) with s = lora_alpha (init_r when lora_alpha is 0)."""

    rank: int
    dropout: float
    scale: float
    init_r: int = 0


class AdaLoraConfig(AdapterConfig):
    """``pet_type: adalora``: SVD-form LoRA with a rank budget (see tuners/adalora.py).

    Keys: ``init_r`` (12), ``target_r`` (8, <= init_r), ``tinit`` (0), ``tfinal`` (0), ``deltaT``
    (1), ``beta1`` / ``beta2`` (0.85, in [0, 1)), ``orth_reg_weight`` (0.5, >= 0), ``total_step``
    (required: the number of training steps), ``rank_pattern`` (cell name -> list of kept
    flags, written by the allocator; a loaded adapter is built at these ranks), ``lora_alpha``
    (8; 0 means init_r), ``lora_dropout``, plus the targeting keys. Needs the callback
    ``AdaLoraRankAllocator`` and ``runner_wrapper: {type: CpuSafeTrainOneStepCell}``.
    """

    pet_type_name = "adalora"
    PEFT_TYPE = "ADALORA"
    ADAPTER_PARAMETERS = ("lora_A", "lora_B", "lora_E")
    DEFAULTS = dict(AdapterConfig.DEFAULTS, init_r=12, target_r=8, tinit=0, tfinal=0, deltaT=1,
                    beta1=0.85, beta2=0.85, orth_reg_weight=0.5, total_step=None, rank_pattern=None,
                    lora_alpha=8, lora_dropout=0.0)
    KEY_HINTS = dict(_COMMON_HINTS, r="AdaLoRA's ranks are 'init_r' (start) and 'target_r' (average at the end)",
                     lora_rank="AdaLoRA's ranks are 'init_r' and 'target_r'")

    def _validate(self, values):
        values = super()._validate(values)
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            values[name] = _check_int(name, values[name], low)
        if values["target_r"] > values["init_r"]:
            raise PetConfigError(f"{_key('target_r')} = {values['target_r']} exceeds init_r = "
                                 f"{values['init_r']}: the budget only shrinks")
        for name in ("beta1", "beta2"):
            values[name] = _check_real(name, values[name], 0, 1, high_open=True)
        values["orth_reg_weight"] = _check_real("orth_reg_weight", values["orth_reg_weight"], 0, float("inf"),
                                                high_open=True)
        values["lora_alpha"] = _check_real("lora_alpha", values["lora_alpha"], 0, float("inf"), high_open=True)
        values["lora_dropout"] = _check_dropout("lora_dropout", values["lora_dropout"])
        if values["total_step"] is None:
            raise PetConfigError(f"{_key('total_step')} is required for AdaLoRA: the number of training "
                                 f"steps (the budget schedule ends at total_step - tfinal)")
        values["total_step"] = _check_int("total_step", values["total_step"], 1)
        if values["total_step"] - values["tinit"] - values["tfinal"] <= 0:
            raise PetConfigError(
                f"{_key('total_step')} = {values['total_step']} leaves no budgeting phase: it must exceed "
                f"tinit + tfinal = {values['tinit'] + values['tfinal']}")
        pattern = values["rank_pattern"]
        if pattern is None and values["adapter_path"]:  # build cells at the saved adapter's ranks
            from mindformers_lora_ext import adapter_files  # pylint: disable=import-outside-toplevel
            saved, _ = adapter_files.read_adapter_dir(adapter_files.resolve_adapter_dir(values["adapter_path"]))
            pattern = self.pet_fields_from_peft(saved).get("rank_pattern")
        if pattern is not None:
            ok = isinstance(pattern, dict) and all(
                isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) == values["init_r"]
                and all(isinstance(b, bool) for b in v) for k, v in pattern.items())
            if not ok:
                raise PetConfigError(f"{_key('rank_pattern')}: expected cell name -> list of init_r = "
                                     f"{values['init_r']} true/false flags, as the allocator writes it")
            values["rank_pattern"] = {k: list(v) for k, v in pattern.items()}
        return values

    def peft_fields(self, names) -> dict:
        """The AdaLoraConfig fields of ``adapter_config.json`` (rank_pattern keys are
        ``<hf module>.lora_E``, as PEFT writes them). A cell fusing several HF modules is refused
        (hf_map.HfMapError): its rank budget is one mask for all of them."""
        return {"peft_type": self.PEFT_TYPE, "r": self.init_r, "init_r": self.init_r,
                "target_r": self.target_r, "tinit": self.tinit, "tfinal": self.tfinal,
                "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
                "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step,
                "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": _hf_targets(names), "bias": "none", "fan_in_fan_out": False,
                "rank_pattern": ({f"{names.module(k)}.lora_E": v for k, v in self.rank_pattern.items()}
                                 if self.rank_pattern else None)}

    @classmethod
    def pet_fields_from_peft(cls, data: dict, mf_module=None) -> dict:
        """Our keys for a PEFT AdaLoraConfig dict (``mf_module``: HF module name -> our cell name,
        legacy Llama's table by default)."""
        from mindformers_lora_ext.naming import mf_module_name  # pylint: disable=import-outside-toplevel
        mf_module = mf_module or mf_module_name
        pattern = data.get("rank_pattern")
        if pattern:
            pattern = {mf_module(k[: -len(".lora_E")] if k.endswith(".lora_E") else k): list(v)
                       for k, v in pattern.items()}
        fields = {k: data[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                       "orth_reg_weight", "total_step", "lora_alpha", "lora_dropout")
                  if data.get(k) is not None}
        return dict(fields, rank_pattern=pattern or None)

    def peft_arrays_out(self, arrays, names):
        """Our adapter arrays -> PEFT's ``lora_A`` / ``lora_B`` / ``lora_E`` keys (HF module names
        from ``names``, an hf_map.HfMap): pruned triplets dropped, and lambda times (kept + eps) /
        (init_r + eps) because PEFT rescales a reloaded, pruned cell by its kept rank; so PEFT
        computes what we trained."""
        out = {}
        for cell, mask in self._cell_masks(arrays):
            if mask is not None and not any(mask):
                continue  # pruned to rank 0: no tensors (and no adapter when reloaded)
            a, b, e = (arrays[f"{cell}.{k}"] for k in ("lora_A", "lora_B", "lora_E"))
            if mask is not None and len(mask) == e.shape[0]:
                keep = np.asarray(mask, bool)
                a, b, e = a[keep], b[:, keep], e[keep]
            if mask is not None:
                e = (e.astype(np.float64) * ((e.shape[0] + 1e-5) / (self.init_r + 1e-5))).astype(e.dtype)
            prefix = f"base_model.model.{names.module(cell)}"
            out.update({f"{prefix}.lora_A": a, f"{prefix}.lora_B": b, f"{prefix}.lora_E": e})
        return out

    def peft_arrays_in(self, tensors, names):
        """Inverse of :meth:`peft_arrays_out` (for cells already built at their pruned ranks)."""
        from mindformers_lora_ext.naming import mf_module_name  # pylint: disable=import-outside-toplevel
        cells = names.mf_cells() if names is not None else {}
        out = {}
        for key, value in tensors.items():
            if not key.startswith("base_model.model."):
                raise ValueError(f"tensor key {key!r} is not a PEFT AdaLoRA key")
            module, _, attr = key[len("base_model.model."):].rpartition(".")
            cell = cells.get(module) or mf_module_name(module)
            if attr == "lora_E" and (self.rank_pattern or {}).get(cell) is not None:
                value = (value.astype(np.float64) * ((self.init_r + 1e-5) / (value.shape[0] + 1e-5))
                         ).astype(value.dtype)
            out[f"{cell}.{attr}"] = value
        return out

    def _cell_masks(self, arrays):
        cells = sorted(n[: -len(".lora_E")] for n in arrays if n.endswith(".lora_E"))
        return [(c, (self.rank_pattern or {}).get(c)) for c in cells]

    def module_options(self, name: str) -> AdaLoraSpec:
        """Rank of cell ``name`` (its kept triplets under ``rank_pattern``, else init_r)."""
        mask = (self.rank_pattern or {}).get(name)
        alpha = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return AdaLoraSpec(rank=sum(mask) if mask else self.init_r, dropout=self.lora_dropout,
                           scale=alpha / (self.init_r + 1e-5), init_r=self.init_r)


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
