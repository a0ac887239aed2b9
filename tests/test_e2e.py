"""End to end through the run_mindformer.py path in fresh interpreters (slow)."""
import json
import math
import os
import re

import pytest
import yaml

from conftest import RUN_MINDFORMER, TINY_CONFIG, run_fresh

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _write_config(tmp_path, **pet_overrides):
    with open(TINY_CONFIG, encoding="utf-8") as handle:
        cfg = yaml.safe_load(handle)
    cfg["model"]["model_config"]["pet_config"].update(pet_overrides)
    cfg["callbacks"].append({"type": "TrainingSummary", "check_frozen": True,
                             "summary_file": str(tmp_path / "summary.json")})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    path = tmp_path_factory.mktemp("data") / "train.mindrecord"
    return write_tiny_dataset(str(path), num_rows=64, seq_length=32, vocab_size=128)


def test_lora_ext_finetune_through_stock_main(tmp_path, dataset):
    config = _write_config(tmp_path)
    proc = run_fresh([RUN_MINDFORMER, "--config", str(config), "--train_dataset_dir", dataset,
                      "--output_dir", str(tmp_path / "out")], cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    printed = [float(m) for m in re.findall(r"loss:\[\s*([0-9.eE+-]+)/", log)]
    assert len(printed) == 32 and all(math.isfinite(v) for v in printed)  # MindFormers' loss lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = summary["losses"]
    assert losses == pytest.approx(printed, rel=1e-5)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.03, losses  # it learns
    adapters = sorted(summary["trainable_names"])
    assert adapters and all(re.fullmatch(r"model\.layers\.\d\.attention\.w[qkvo]\.lora_[AB]", n)
                            for n in adapters)
    assert sorted(summary["changed_trainable"]) == adapters  # every adapter moved ...
    assert summary["changed_frozen"] == []                    # ... and nothing else did
    assert summary["trainable_params"] == 2 * 4 * 2 * 8 * 64


def test_typo_in_pet_type_fails_before_training(tmp_path, dataset):
    config = _write_config(tmp_path, pet_type="lora_etx")
    proc = run_fresh([RUN_MINDFORMER, "--config", str(config), "--train_dataset_dir", dataset,
                      "--output_dir", str(tmp_path / "out")], cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "model.model_config.pet_config.pet_type = 'lora_etx' is not a registered pet type" in log
    assert "Did you mean 'lora_ext'?" in log
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
