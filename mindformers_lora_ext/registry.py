"""Plugin discovery and the public registration API.

Plugins are setuptools entry points in the group ``mindformers_lora_ext.plugins``; each one
names a callable taking no argument that calls the ``register_*`` functions below. Our own
classes come in through the same group (``mindformers_lora_ext.builtin:register``).

Loading is deterministic (sorted by entry-point name, then distribution), idempotent (each
entry point runs once per process) and isolated (a plugin that raises is reported with its
name and its registrations are rolled back; the others still load).

This module imports only the standard library at import time: it is imported by the
interpreter-start hook from inside ``import mindformers``.
"""
import importlib.metadata
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ENTRY_POINT_GROUP = "mindformers_lora_ext.plugins"
KINDS = ("pet_type", "callback", "wrapper", "optimizer")
_MF_MODULE_TYPES = {"callback": "CALLBACK", "wrapper": "WRAPPER", "optimizer": "OPTIMIZER"}

logger = logging.getLogger("mindformers_lora_ext")

_PET_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class Registration:
    """One registered name: what it is, which class implements it, and who registered it."""
    kind: str
    name: str
    obj: object
    origin: str
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class PluginStatus:
    """Outcome of loading one entry point."""
    name: str
    value: str
    distribution: str
    ok: bool
    error: str = ""


_lock = threading.RLock()
_registrations: Dict[tuple, Registration] = {}
_plugins: Dict[tuple, PluginStatus] = {}
_current_origin: List[str] = []


class RegistrationError(ValueError):
    """A registration that conflicts with an existing one or is malformed."""


def _origin() -> str:
    return _current_origin[-1] if _current_origin else "python-api"


def _record(kind: str, name: str, obj: object, **extra) -> bool:
    """Store a registration; returns False when the identical one already exists."""
    key = (kind, name)
    existing = _registrations.get(key)
    if existing is not None:
        if existing.obj is obj and existing.extra == extra:
            return False
        raise RegistrationError(
            f"{kind} {name!r} is already registered by {existing.origin} "
            f"({qualname(existing.obj)}); {_origin()} tried to register {qualname(obj)}")
    _registrations[key] = Registration(kind, name, obj, _origin(), dict(extra))
    return True


def qualname(obj) -> str:
    """``module.QualName`` of a registered class or function."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_pet_type(name: str, model_cls, config_cls):
    """Make ``pet_config.pet_type: <name>`` build ``model_cls`` configured by ``config_cls``.

    ``config_cls`` must subclass MindFormers' ``PetConfig``; ``model_cls(config, base_model)``
    must return a cell whose ``construct`` runs the adapted base model (see
    :class:`mindformers_lora_ext.tuners.model.AdapterModel`).
    """
    from mindformers.pet.pet_config import PetConfig  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext import integration  # pylint: disable=import-outside-toplevel

    if not isinstance(name, str) or not _PET_TYPE_NAME.match(name):
        raise RegistrationError(
            f"pet type name {name!r} must be lowercase letters, digits and '_', starting with a letter")
    if name in integration.stock_pet_types():
        raise RegistrationError(
            f"pet type {name!r} belongs to MindFormers itself; choose another name")
    if not (isinstance(config_cls, type) and issubclass(config_cls, PetConfig)):
        raise RegistrationError(
            f"config class for pet type {name!r} must subclass mindformers.pet.pet_config.PetConfig, "
            f"got {config_cls!r}")
    if not callable(model_cls):
        raise RegistrationError(f"model class for pet type {name!r} is not callable: {model_cls!r}")
    with _lock:
        if _record("pet_type", name, model_cls, config_cls=config_cls):
            integration.install_pet_type(name, model_cls, config_cls)
    return model_cls


def _register_mf(kind: str, cls, name: Optional[str]):
    from mindformers.tools.register import (  # pylint: disable=import-outside-toplevel
        MindFormerModuleType, MindFormerRegister)

    module_type = getattr(MindFormerModuleType, _MF_MODULE_TYPES[kind])
    name = name or cls.__name__
    with _lock:
        if MindFormerRegister.is_exist(module_type, name) and (kind, name) not in _registrations:
            existing = MindFormerRegister.get_cls(module_type, name)
            if existing is not cls:
                raise RegistrationError(
                    f"{kind} {name!r} already exists in MindFormerRegister as {qualname(existing)}")
        if _record(kind, name, cls):
            MindFormerRegister.register_cls(cls, module_type=module_type, alias=name)
    return cls


def register_callback(cls, name: Optional[str] = None):
    """Register a MindSpore callback class for YAML ``callbacks: - type: <name>``."""
    return _register_mf("callback", cls, name)


def register_wrapper(cls, name: Optional[str] = None):
    """Register a train-one-step cell for YAML ``runner_wrapper: type: <name>``."""
    return _register_mf("wrapper", cls, name)


def register_optimizer(cls, name: Optional[str] = None):
    """Register an optimizer class for YAML ``optimizer: type: <name>``."""
    return _register_mf("optimizer", cls, name)


def _dist_name(ep) -> str:
    return getattr(getattr(ep, "dist", None), "name", None) or "?"


def _entry_points():
    eps = importlib.metadata.entry_points()
    if hasattr(eps, "select"):
        selected = eps.select(group=ENTRY_POINT_GROUP)
    else:  # Python 3.9 returns a dict of groups
        selected = eps.get(ENTRY_POINT_GROUP, [])
    found = {}
    for ep in selected:
        # The same distribution can be visible twice on sys.path (e.g. an editable install
        # plus a build dir): keep the first, as importlib does for the code itself.
        found.setdefault((ep.name, _dist_name(ep)), ep)
    return [found[key] for key in sorted(found)]


def _rollback(origin: str):
    from mindformers_lora_ext import integration  # pylint: disable=import-outside-toplevel
    for key, reg in list(_registrations.items()):
        if reg.origin == origin:
            del _registrations[key]
            if reg.kind == "pet_type":
                integration.uninstall_pet_type(reg.name)
            else:
                integration.unregister_from_mindformers(_MF_MODULE_TYPES[reg.kind], reg.name)


def load_plugins() -> List[PluginStatus]:
    """Load every entry point of the group once; returns the status of each, in load order."""
    with _lock:
        for ep in _entry_points():
            dist = _dist_name(ep)
            key = (ep.name, dist)
            if key in _plugins:
                continue
            origin = f"plugin {ep.name!r} ({dist})"
            _current_origin.append(origin)
            try:
                target = ep.load()
                if callable(target):
                    target()
                _plugins[key] = PluginStatus(ep.name, ep.value, dist, True)
            except Exception as exc:  # pylint: disable=broad-except
                _rollback(origin)
                message = f"{type(exc).__name__}: {exc}"
                _plugins[key] = PluginStatus(ep.name, ep.value, dist, False, message)
                logger.warning("mindformers-lora-ext: %s failed to load and was skipped: %s",
                               origin, message)
            finally:
                _current_origin.pop()
        return list(_plugins.values())


def registered(kind: Optional[str] = None) -> List[Registration]:
    """Registrations so far, sorted by kind then name; ``kind`` filters (one of ``KINDS``)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    with _lock:
        regs = [r for r in _registrations.values() if kind is None or r.kind == kind]
    return sorted(regs, key=lambda r: (KINDS.index(r.kind), r.name))


def pet_type_config_class(name: str):
    """The config class registered for pet type ``name``, or None."""
    reg = _registrations.get(("pet_type", name))
    return None if reg is None else reg.extra["config_cls"]


def plugin_statuses() -> List[PluginStatus]:
    """What :func:`load_plugins` found so far."""
    with _lock:
        return list(_plugins.values())
