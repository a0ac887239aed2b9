"""LoRA-family parameter-efficient fine-tuning methods as a plugin for MindFormers.

Importing this package is cheap (standard library only): the public functions below import
MindFormers on first use. Installing the package is enough for MindFormers to see our pet
types; see ``mindformers_lora_ext.registry`` for how plugins are found.
"""
__version__ = "0.1.0"

_PUBLIC = {
    "register_pet_type": "registry",
    "register_callback": "registry",
    "register_wrapper": "registry",
    "register_optimizer": "registry",
    "load_plugins": "registry",
    "registered": "registry",
    "ENTRY_POINT_GROUP": "registry",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    # Lazy so that the interpreter-start hook (``_boot``) can import this package for free.
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mindformers_lora_ext' has no attribute {name!r}")
    import importlib  # pylint: disable=import-outside-toplevel
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
