"""Interpreter-start hook, run from ``mindformers_lora_ext_boot.pth``. Standard library only.

It puts a finder on ``sys.meta_path`` that waits for the top-level ``mindformers`` package:
once ``mindformers/__init__`` has run to the end, plugins are loaded
(:func:`mindformers_lora_ext.registry.load_plugins`). Until then nothing of ours or of
MindSpore is imported, so interpreters that never touch MindFormers (pip, for one) pay only
for this file.

It never raises: any failure becomes one line on stderr. ``MINDFORMERS_LORA_EXT_DISABLE=1``
turns it off; ``python -S`` skips ``.pth`` files altogether.
"""
import os
import sys

DISABLE_ENV = "MINDFORMERS_LORA_EXT_DISABLE"
_TARGET = "mindformers"


def _warn(message):
    try:
        sys.stderr.write(f"mindformers-lora-ext: {message}\n")
    except Exception:  # pylint: disable=broad-except
        pass


def _load_plugins():
    try:
        from mindformers_lora_ext import registry  # pylint: disable=import-outside-toplevel
        registry.load_plugins()
    except Exception as exc:  # pylint: disable=broad-except
        _warn(f"plugins not loaded ({type(exc).__name__}: {exc}); "
              f"set {DISABLE_ENV}=1 to silence this hook")


def _ours_initializing(exclude=None):
    """True while a module of ours (other than ``exclude``) is half-executed."""
    for name, module in list(sys.modules.items()):
        if name != exclude and (name == "mindformers_lora_ext" or name.startswith("mindformers_lora_ext.")):
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                return True
    return False


_deferred = False


def _after_mindformers_import():
    # Plugins import our modules. If one of ours is what imported mindformers, it is still
    # half-defined now: defer until it ends (it calls resume_after_import() last thing).
    global _deferred  # pylint: disable=global-statement
    if _ours_initializing():
        _deferred = True
        return
    _load_plugins()


def resume_after_import(module_name):
    """Last statement of each of our modules that imports mindformers at import time."""
    global _deferred  # pylint: disable=global-statement
    if _deferred and not _ours_initializing(exclude=module_name):
        _deferred = False
        _load_plugins()


class _LoaderProxy:
    """Runs the real loader of ``mindformers``, then loads plugins."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # Put the real loader back first, so that nothing after import sees this proxy.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _after_mindformers_import()


class _MindFormersFinder:
    """A one-shot ``sys.meta_path`` finder for the top-level ``mindformers`` package."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        cls.uninstall()
        try:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _LoaderProxy(spec.loader)
                    return spec
        except Exception as exc:  # pylint: disable=broad-except
            _warn(f"import hook failed ({type(exc).__name__}: {exc})")
        return None

    @classmethod
    def uninstall(cls):
        while cls in sys.meta_path:
            sys.meta_path.remove(cls)


def install():
    """Install the finder unless disabled or ``mindformers`` is already imported."""
    try:
        if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            return
        if _TARGET in sys.modules:
            _after_mindformers_import()
            return
        if _MindFormersFinder not in sys.meta_path:
            sys.meta_path.insert(0, _MindFormersFinder)
    except Exception as exc:  # pylint: disable=broad-except
        _warn(f"hook not installed ({type(exc).__name__}: {exc})")


install()
