"""End to end through the run_mindformer.py path in fresh interpreters (slow)."""
import json
import math
import os
import re

import numpy as np
import pytest
import yaml

from conftest import ROOT, RUN_MINDFORMER, TINY_CONFIG, run_fresh

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _write_config(tmp_path, base=TINY_CONFIG, calibration=None, **pet_overrides):
    """A run YAML on top of ``base`` (MindFormers merges base_config) adding TrainingSummary
    (and keeping the tiny config's DataDrivenInit, reading ``calibration`` if given: the callback
    list is replaced, not merged)."""
    data_init = []
    if os.path.basename(base)[:-5] in DATA_DRIVEN:
        data_init = [dict({"type": "DataDrivenInit", "batches": 4}, **({"dataset_dir": calibration} if calibration else {}))]
    cfg = {"base_config": [os.path.abspath(base)],
           "callbacks": [{"type": "MFLossMonitor"}, *data_init,
                         {"type": "TrainingSummary", "check_frozen": True,
                          "summary_file": str(tmp_path / "summary.json")}]}
    if pet_overrides:
        cfg["model"] = {"model_config": {"pet_config": pet_overrides}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path, config, dataset):
    proc = run_fresh([RUN_MINDFORMER, "--config", str(config), "--train_dataset_dir", dataset,
                      "--output_dir", str(tmp_path / "out")], cwd=str(tmp_path))
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    path = tmp_path_factory.mktemp("data") / "train.mindrecord"
    return write_tiny_dataset(str(path), num_rows=64, seq_length=32, vocab_size=128)


DATA_DRIVEN = ("eva", "corda", "lora_ga")
# eva's tiny config runs through the stock main in test_msrun.py (2 workers)
TINY = {name: os.path.join(ROOT, "configs", "tiny", f"{name}.yaml")
        for name in ("lora_ext", "dora", "rslora", "pissa", "olora", "loraplus", "vera", "loha", "lokr", "corda",
                     "lora_ga")}
LORA_PARAMS = 2 * 4 * 2 * 8 * 64  # layers x targets x (A + B) x rank x hidden
DORA_PARAMS = 2 * 4 * 64          # one magnitude per output feature
# per type: (trainable attributes of each target cell, trainable element count)
EXPECTED = {
    "dora": ("lora_A|lora_B|lora_magnitude_vector", LORA_PARAMS + DORA_PARAMS),
    "vera": ("vera_lambda_b|vera_lambda_d", 2 * 4 * (256 + 64)),  # r + out per target
    "loha": ("hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b", 2 * 4 * 2 * 8 * (64 + 64)),  # 2 r (out + in)
    "lokr": ("lokr_w1|lokr_w2", 2 * 4 * (16 * 16 + 4 * 4)),  # decompose_factor 16: w1 16x16, w2 4x4
}


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_finetunes_through_stock_main(tmp_path, dataset, name):
    calibration = dataset if name == "lora_ga" else None  # a calibration MindRecord (here: the same rows)
    proc, log = _train(tmp_path, _write_config(tmp_path, TINY[name], calibration), dataset)
    assert proc.returncode == 0, log[-4000:]
    printed = [float(m) for m in re.findall(r"loss:\[\s*([0-9.eE+-]+)/", log)]
    assert len(printed) == 32 and all(math.isfinite(v) for v in printed)  # MindFormers' loss lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = summary["losses"]
    assert losses == pytest.approx(printed, rel=1e-5)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.03, losses  # it learns
    adapters = sorted(summary["trainable_names"])
    kinds, count = EXPECTED.get(name, ("lora_A|lora_B", LORA_PARAMS))
    assert adapters and all(re.fullmatch(rf"model\.layers\.\d\.attention\.w[qkvo]\.({kinds})", n)
                            for n in adapters)
    if name in DATA_DRIVEN:  # the statistics pass ran before the first step, and its cost was reported
        source = calibration or "the training dataset"
        assert f"DataDrivenInit: {name} from up to 4 batches of {source}" in log
        assert re.search(rf"DataDrivenInit: {name}: 4 batches x 1 rank\(s\) in [0-9.]+ s", log), log[-3000:]
        assert re.search(r"pass took [0-9.]+ s = [0-9.]+ training steps", log)
    assert sorted(summary["changed_trainable"]) == adapters  # every adapter moved ...
    assert summary["changed_frozen"] == []                    # ... and nothing else did (VeRA's
    assert summary["trainable_params"] == count               # vera_A / vera_B included)


def test_typo_in_pet_type_fails_before_training(tmp_path, dataset):
    proc, log = _train(tmp_path, _write_config(tmp_path, pet_type="lora_etx"), dataset)
    assert proc.returncode != 0
    assert "model.model_config.pet_config.pet_type = 'lora_etx' is not a registered pet type" in log
    assert "Did you mean 'lora_ext'?" in log
    assert not re.search(r"loss:\[", log) and not (tmp_path / "summary.json").exists()


def test_training_with_merge_on_load_fails_before_the_first_step(tmp_path, dataset):
    proc, log = _train(tmp_path, _write_config(tmp_path, merge_on_load=True), dataset)
    assert proc.returncode != 0
    assert "model.model_config.pet_config.merge_on_load is true: it serves eval/predict" in log
    assert not re.search(r"loss:\[", log) and not (tmp_path / "summary.json").exists()


def test_cli_plugins_lists_our_registrations(tmp_path):
    proc = run_fresh(["-m", "mindformers_lora_ext.cli", "plugins"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "plugin mindformers_lora_ext = mindformers_lora_ext.builtin:register (mindformers-lora-ext): ok" in out
    assert re.search(r"pet_type\s+lora_ext\s+mindformers_lora_ext\.tuners\.lora\.LoraExtModel", out)
    assert re.search(r"wrapper\s+CpuSafeTrainOneStepCell", out)


def test_demo_command(tmp_path):
    proc = run_fresh(["-m", "mindformers_lora_ext.cli", "demo", "--steps", "16",
                      "--output-dir", str(tmp_path / "demo")], cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "demo done: loss" in proc.stdout and "frozen params changed: 0" in proc.stdout
    assert os.path.isfile(tmp_path / "demo" / "summary.json")


def test_fused_kernel_matches_the_composition_through_stock_main(tmp_path, dataset):
    """lora_ext with lora_dropout 0: the fused CPU kernel and the MindSpore composition train
    the same trajectory through the run_mindformer.py path."""
    losses = {}
    for fused in (True, False):
        run = tmp_path / str(fused)
        run.mkdir()
        proc, log = _train(run, _write_config(run, use_fused_kernel=fused), dataset)
        assert proc.returncode == 0, log[-4000:]
        assert "fused LoRA kernel unavailable" not in log  # the fused run really is fused
        losses[fused] = json.loads((run / "summary.json").read_text())["losses"]
    assert len(losses[True]) == 32
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-4, atol=2e-4)
