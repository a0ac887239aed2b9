"""Each MindFormers internal we rely on (integration.py) is pinned here: a change breaks a test."""
import inspect

import importlib

build_model = importlib.import_module("mindformers.models.build_model")
from mindformers.pet import pet_model
from mindpet.graph import freeze_utils
from mindpet.utils import constants


def test_pet_dicts_exist_and_are_read_at_call_time():
    assert isinstance(pet_model.PET_TYPE_TO_MODEL_MAPPING, dict)
    assert isinstance(pet_model.PET_TYPE_TO_CONFIG_MAPPING, dict)
    pet_model.PET_TYPE_TO_MODEL_MAPPING["zz_probe"] = object
    try:
        assert pet_model.is_supported_pet_type("zz_probe")
    finally:
        del pet_model.PET_TYPE_TO_MODEL_MAPPING["zz_probe"]
    assert not pet_model.is_supported_pet_type("zz_probe")


def test_build_network_imports_get_pet_model_at_call_time():
    source = inspect.getsource(build_model.build_network)
    assert "from mindformers.pet import get_pet_model" in source
    import mindformers.pet
    assert getattr(mindformers.pet.get_pet_model, "mindformers_lora_ext", False)
    assert mindformers.pet.get_pet_model.__wrapped__.__module__ == "mindformers.pet.pet_model"


def test_petmodel_uses_config_objects_as_given_and_freezes_by_pet_type():
    source = inspect.getsource(pet_model.PetModel.__init__)
    assert 'config.pop("pet_type")' in source  # why we hand it config objects, not dicts
    assert "pet_type = config.pet_type" in source
    assert "freeze_pretrained_model(self.network, pet_type" in source
    assert "freeze_mcore_pretrained_model" in source


def test_freeze_delta_reads_the_shared_delta_list():
    assert freeze_utils.DELTA_LIST is constants.DELTA_LIST
    assert "mode.lower() in DELTA_LIST" in inspect.getsource(freeze_utils.freeze_delta)


def test_unknown_pet_type_is_silent_full_finetune_in_stock_get_pet_model():
    source = inspect.getsource(pet_model.get_pet_model.__wrapped__)
    assert "return base_model" in source  # the behaviour our strict mode turns into an error
