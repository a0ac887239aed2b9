"""Config classes, one per pet type. All validation of ``pet_config`` lives here.

A config is built from the YAML ``model.model_config.pet_config`` mapping. Every key is
checked: an unknown key (a typo, or a stock-``lora`` key we do not implement) is an error with
a did-you-mean, never silently ignored, and every value is checked for type and range.
"""
import copy
import difflib
import numbers
import re
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
    attribute names of their trainable adapter parameters in ``ADAPTER_PARAMETERS``.
    """

    pet_type_name: str = ""
    ADAPTER_PARAMETERS: tuple = ()
    DEFAULTS: Dict[str, Any] = {
        "target_modules": None,
        "exclude_layers": None,
        "param_init_type": None,
        "compute_dtype": None,
        "freeze_include": None,
        "freeze_exclude": None,
    }

    def __init__(self, **kwargs):
        kwargs.pop("pet_type", None)
        unknown = sorted(set(kwargs) - set(self.DEFAULTS))
        if unknown:
            raise PetConfigError(self._unknown_key_message(unknown[0]))
        values = dict(self.DEFAULTS)
        values.update(kwargs)
        super().__init__(pet_type=self.pet_type_name)
        for name, value in self._validate(values).items():
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
        if key in _STOCK_LORA_HINTS:
            return (f"{_key(key)} is a key of MindFormers' stock 'lora', not of "
                    f"{self.pet_type_name!r}: {_STOCK_LORA_HINTS[key]}. Remove it. "
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
        for name in ("param_init_type", "compute_dtype"):
            if values[name] is not None:
                _check_choice(name, values[name], DTYPES)
        for name in ("freeze_include", "freeze_exclude"):
            values[name] = _check_name_list(name, values[name])
        # PetModel freezes by globs before we recompute the trainable set exactly; giving it
        # our adapter globs keeps its result right too (and mcore models need a non-empty list).
        exclude = values["freeze_exclude"] or []
        values["freeze_exclude"] = exclude + [g for g in self.adapter_globs() if g not in exclude]
        return values

    def adapter_globs(self) -> List[str]:
        """Name globs of the adapter parameters, for mindpet's glob-based freezing."""
        return [f"*.{param}" for param in self.ADAPTER_PARAMETERS]


def _check_pattern(name, value):
    """A cell selector: None, a regex string (or 'all-linear' for target_modules), or a name list."""
    is_target = name == "target_modules"
    if not isinstance(value, str):
        return _check_name_list(name, value, allow_none=not is_target)
    if is_target and not value:
        raise PetConfigError(f"{_key(name)} = '': expected a regex, a list or '{ALL_LINEAR}'")
    if is_target and value == ALL_LINEAR:
        return value
    try:
        re.compile(value)
    except re.error as exc:
        raise PetConfigError(f"{_key(name)} = {value!r} is not a valid regex: {exc}") from exc
    return value


class LoraExtConfig(AdapterConfig):
    """``pet_type: lora_ext``: y = base(x) + s * B(A(dropout(x))), s = lora_alpha / lora_rank.

    Keys: ``lora_rank`` (int >= 1, default 8), ``lora_alpha`` (> 0, default 16),
    ``lora_dropout`` (in [0, 1), default 0.0), plus the targeting keys of AdapterConfig.
    """

    pet_type_name = "lora_ext"
    ADAPTER_PARAMETERS = ("lora_A", "lora_B")
    DEFAULTS = dict(AdapterConfig.DEFAULTS, lora_rank=8, lora_alpha=16, lora_dropout=0.0)

    def _validate(self, values):
        values = super()._validate(values)
        values["lora_rank"] = _check_int("lora_rank", values["lora_rank"], 1)
        values["lora_alpha"] = _check_real("lora_alpha", values["lora_alpha"], 0, float("inf"),
                                           low_open=True, high_open=True)
        values["lora_dropout"] = _check_real("lora_dropout", values["lora_dropout"], 0, 1,
                                             high_open=True)
        return values

    def module_options(self, name: str) -> Dict[str, Union[int, float]]:
        """Rank, alpha and dropout for the target cell ``name``."""
        del name  # one setting for every module until rank_pattern/alpha_pattern exist
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout}


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
