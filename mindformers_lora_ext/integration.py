"""The only places where we touch MindFormers (and mindpet) internals.

Each point is narrow, documented here, and pinned by ``tests/test_integration_points.py``,
which fails if MindFormers changes under it:

1. ``mindformers.pet.pet_model.PET_TYPE_TO_MODEL_MAPPING`` / ``PET_TYPE_TO_CONFIG_MAPPING``:
   we add our pet types, so ``is_supported_pet_type`` and ``PetModel`` accept them.
2. ``mindpet.utils.constants.DELTA_LIST``: ``PetModel`` calls mindpet's ``freeze_delta`` with
   the pet type, which refuses names not in this list. We append ours; the freeze it then does
   is recomputed exactly by :func:`finalize_trainable` (see 3).
3. ``mindformers.pet.get_pet_model`` (looked up there at call time by ``build_network``):
   wrapped so that (a) a ``pet_type`` nobody registered is an error instead of MindFormers'
   silent full fine-tune (``MINDFORMERS_LORA_EXT_STRICT=0`` restores the stock behaviour),
   (b) our pet configs are validated and handed to ``PetModel`` as config objects, so
   ``PetModel`` no longer pops ``pet_type`` out of the live YAML dict (a second build in one
   process keeps its adapter), and (c) after ``PetModel`` is built, exactly the adapter
   parameters (plus the user's ``freeze_exclude``) are trainable.

Behaviour we rely on without patching anything: eval and predict build the network under
``no_init_parameters``, call ``set_train(False)``, load ``--load_checkpoint``, and call
``set_train(False)`` again (``Model.eval`` / ``generate``) before the first forward.
``merge_on_load`` folds at that second call (``AdapterModel.add_flags_recursive``, the public
Cell method ``set_train`` goes through); ``tests/test_serving.py`` fails if this changes.
"""
import difflib
import os

STRICT_ENV = "MINDFORMERS_LORA_EXT_STRICT"
PET_TYPE_KEY = "model.model_config.pet_config.pet_type"


class UnknownPetTypeError(ValueError):
    """``pet_type`` names no registered method."""


def _pet_model_module():
    from mindformers.pet import pet_model  # pylint: disable=import-outside-toplevel
    return pet_model


def _delta_list():
    from mindpet.utils import constants  # pylint: disable=import-outside-toplevel
    return constants.DELTA_LIST


def stock_pet_types():
    """Pet types MindFormers itself provides (``slora`` is special-cased in get_pet_model)."""
    from mindformers.pet.constants import PetType  # pylint: disable=import-outside-toplevel
    return {t.value for t in PetType} | {"slora"}


def known_pet_types():
    """Every pet type ``get_pet_model`` can build now, sorted."""
    return sorted(set(_pet_model_module().PET_TYPE_TO_MODEL_MAPPING) | {"slora"})


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install_pet_type(name, model_cls, config_cls):
    """Integration points 1-3 for one pet type."""
    module = _pet_model_module()
    module.PET_TYPE_TO_MODEL_MAPPING[name] = model_cls
    module.PET_TYPE_TO_CONFIG_MAPPING[name] = config_cls
    delta = _delta_list()
    if name not in delta:
        delta.append(name)
    install_get_pet_model_wrapper()


def uninstall_pet_type(name):
    module = _pet_model_module()
    module.PET_TYPE_TO_MODEL_MAPPING.pop(name, None)
    module.PET_TYPE_TO_CONFIG_MAPPING.pop(name, None)
    delta = _delta_list()
    while name in delta:
        delta.remove(name)


def unregister_from_mindformers(module_type_name, name):
    """Undo ``MindFormerRegister.register_cls`` for one name (used when a plugin fails)."""
    from mindformers.tools.register import (  # pylint: disable=import-outside-toplevel
        MindFormerModuleType, MindFormerRegister)
    MindFormerRegister.registry.get(getattr(MindFormerModuleType, module_type_name), {}).pop(name, None)


def check_pet_type(pet_type):
    """Raise :class:`UnknownPetTypeError` for a pet type nobody registered."""
    known = known_pet_types()
    if pet_type in known:
        return
    if pet_type is None or pet_type == "":
        raise UnknownPetTypeError(
            f"{PET_TYPE_KEY} is missing: a pet_config needs a pet_type. Known pet types: "
            f"{', '.join(known)}. (Set {STRICT_ENV}=0 to get MindFormers' stock behaviour, "
            f"which trains the whole model.)")
    close = difflib.get_close_matches(str(pet_type), known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownPetTypeError(
        f"{PET_TYPE_KEY} = {pet_type!r} is not a registered pet type.{hint} Known pet types: "
        f"{', '.join(known)}. Stock MindFormers would silently fine-tune ALL parameters here; "
        f"set {STRICT_ENV}=0 to accept that.")


def _wrapped_get_pet_model(original):
    def get_pet_model(base_model, config):
        from mindformers_lora_ext import registry  # pylint: disable=import-outside-toplevel
        pet_type = config.get("pet_type") if config is not None else None
        config_cls = registry.pet_type_config_class(pet_type) if isinstance(pet_type, str) else None
        if config_cls is None:
            if strict():
                check_pet_type(pet_type)
            return original(base_model, config)
        pet_config = config_cls.from_pet_config(config)
        model = original(base_model, pet_config)
        finalize_trainable(model)
        return model

    get_pet_model.__wrapped__ = original
    get_pet_model.__doc__ = original.__doc__
    get_pet_model.mindformers_lora_ext = True
    return get_pet_model


def install_get_pet_model_wrapper():
    """Wrap ``get_pet_model`` in ``mindformers.pet`` and its defining module, once."""
    import mindformers.pet  # pylint: disable=import-outside-toplevel
    module = _pet_model_module()
    current = module.get_pet_model
    if getattr(current, "mindformers_lora_ext", False):
        wrapped = current
    else:
        wrapped = _wrapped_get_pet_model(current)
    module.get_pet_model = wrapped
    mindformers.pet.get_pet_model = wrapped


def finalize_trainable(pet_model):
    """Make exactly the adapter parameters trainable in a built ``PetModel``.

    ``PetModel`` freezes with name globs (mindpet's ``freeze_delta``); our model classes know
    their adapter parameters by identity, so the result is recomputed here from them.
    """
    network = getattr(pet_model, "network", None)
    apply = getattr(network, "apply_trainable_mask", None)
    if apply is None:
        raise TypeError(
            f"pet model network {type(network).__name__} has no apply_trainable_mask(); "
            f"pet types registered with mindformers_lora_ext must build an AdapterModel")
    apply()
