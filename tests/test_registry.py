"""Registration API, entry-point discovery with fake distributions, plugin isolation."""
import json
import textwrap

import pytest

from mindformers.pet.pet_model import PET_TYPE_TO_CONFIG_MAPPING, PET_TYPE_TO_MODEL_MAPPING
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindpet.utils.constants import DELTA_LIST

from mindformers_lora_ext import registry
from mindformers_lora_ext.config import LoraExtConfig
from mindformers_lora_ext.registry import RegistrationError
from mindformers_lora_ext.tuners.lora import LoraExtModel
from conftest import run_fresh


class ToyConfig(LoraExtConfig):
    pet_type_name = "toy_lora"


@pytest.fixture
def clean_toy():
    yield
    registry._rollback("python-api")  # pylint: disable=protected-access


def test_builtin_plugin_registered_everything():
    regs = {(r.kind, r.name): r for r in registry.registered()}
    assert regs[("pet_type", "lora_ext")].obj is LoraExtModel
    assert regs[("pet_type", "lora_ext")].origin == "plugin 'mindformers_lora_ext' (mindformers-lora-ext)"
    assert ("wrapper", "CpuSafeTrainOneStepCell") in regs
    assert ("callback", "TrainingSummary") in regs
    assert MindFormerRegister.get_cls(MindFormerModuleType.WRAPPER, "CpuSafeTrainOneStepCell")
    assert "lora_ext" in DELTA_LIST


@pytest.mark.usefixtures("clean_toy")
def test_register_pet_type_wires_mindformers_and_is_idempotent():
    registry.register_pet_type("toy_lora", LoraExtModel, ToyConfig)
    registry.register_pet_type("toy_lora", LoraExtModel, ToyConfig)  # same again: no error
    assert PET_TYPE_TO_MODEL_MAPPING["toy_lora"] is LoraExtModel
    assert PET_TYPE_TO_CONFIG_MAPPING["toy_lora"] is ToyConfig
    assert "toy_lora" in DELTA_LIST
    with pytest.raises(RegistrationError, match="already registered by python-api"):
        registry.register_pet_type("toy_lora", type("Other", (LoraExtModel,), {}), ToyConfig)
    registry._rollback("python-api")  # pylint: disable=protected-access
    assert "toy_lora" not in PET_TYPE_TO_MODEL_MAPPING and "toy_lora" not in DELTA_LIST


@pytest.mark.parametrize("name,config,needle", [
    ("Bad-Name", ToyConfig, "must be lowercase"),
    ("lora", ToyConfig, "belongs to MindFormers itself"),
    ("slora", ToyConfig, "belongs to MindFormers itself"),
    ("toy2", dict, "must subclass mindformers.pet.pet_config.PetConfig"),
])
def test_register_pet_type_rejects(name, config, needle):
    with pytest.raises(RegistrationError, match=needle):
        registry.register_pet_type(name, LoraExtModel, config)


def test_register_callback_refuses_to_shadow_a_mindformers_class():
    class MFLossMonitor:  # same name as a stock callback
        pass
    with pytest.raises(RegistrationError, match="already exists in MindFormerRegister"):
        registry.register_callback(MFLossMonitor)


def _fake_dist(root, dist, module, entry_name, body):
    """A minimal installed distribution: <module>.py plus a dist-info with one entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n{entry_name} = {module}:register\n")


@pytest.mark.e2e
def test_third_party_entry_points_load_and_a_broken_one_is_isolated(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _fake_dist(site, "toy-adapters", "toy_adapters", "toy", """
        from mindformers_lora_ext import register_pet_type
        from mindformers_lora_ext.config import LoraExtConfig
        from mindformers_lora_ext.tuners.lora import LoraExtModel

        class ToyConfig(LoraExtConfig):
            pet_type_name = "toy_lora"

        def register():
            register_pet_type("toy_lora", LoraExtModel, ToyConfig)
    """)
    _fake_dist(site, "broken-adapters", "broken_adapters", "aaa_broken", """
        from mindformers_lora_ext import register_pet_type
        from mindformers_lora_ext.config import LoraExtConfig
        from mindformers_lora_ext.tuners.lora import LoraExtModel

        class HalfConfig(LoraExtConfig):
            pet_type_name = "half_done"

        def register():
            register_pet_type("half_done", LoraExtModel, HalfConfig)
            raise RuntimeError("boom in plugin")
    """)
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(site)!r})
        import mindformers  # the .pth hook runs the plugins here; nothing of ours imported by hand
        from mindformers.pet import is_supported_pet_type
        from mindformers_lora_ext import registry
        statuses = [(s.name, s.distribution, s.ok, s.error) for s in registry.plugin_statuses()]
        print(json.dumps({{"statuses": statuses,
                          "toy": is_supported_pet_type("toy_lora"),
                          "half": is_supported_pet_type("half_done"),
                          "ours": is_supported_pet_type("lora_ext")}}))
    """))
    proc = run_fresh([str(script)], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    names = [s[0] for s in result["statuses"]]
    assert names == sorted(names)  # deterministic order
    status = {s[0]: s for s in result["statuses"]}
    assert status["toy"][2] and status["mindformers_lora_ext"][2]
    assert not status["aaa_broken"][2] and "boom in plugin" in status["aaa_broken"][3]
    assert "'aaa_broken' (broken-adapters) failed to load" in proc.stderr
    assert result["toy"] and result["ours"]
    assert not result["half"]  # a failed plugin's registrations are rolled back
