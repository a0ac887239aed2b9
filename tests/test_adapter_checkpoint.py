"""AdapterCheckpoint through the run_mindformer.py path: saves, resume, merge; and its NaN guard."""
import json
import math
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import mindspore as ms

from conftest import ROOT, RUN_MINDFORMER, CallbackContext, run_fresh

DORA = os.path.join(ROOT, "configs", "tiny", "dora.yaml")


def _run(tmp, data, checkpoint_args, load_checkpoint):
    cfg = {"base_config": [DORA], "load_checkpoint": load_checkpoint,
           "callbacks": [{"type": "MFLossMonitor"},
                         dict({"type": "AdapterCheckpoint", "output_dir": str(tmp / "adapters")},
                              **checkpoint_args),
                         {"type": "TrainingSummary", "summary_file": str(tmp / "summary.json")}]}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_fresh([RUN_MINDFORMER, "--config", str(tmp / "run.yaml"), "--train_dataset_dir", data,
                      "--output_dir", str(tmp / "out")], cwd=str(tmp))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads((tmp / "summary.json").read_text())["losses"], log


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny Llama base checkpoint (.ckpt and .safetensors) and the config that built it."""
    from mindformers.models.build_model import build_model
    from mindformers.tools.register import MindFormerConfig
    tmp = tmp_path_factory.mktemp("base")
    cfg = MindFormerConfig(os.path.join(ROOT, "configs", "tiny", "lora_ext.yaml"))
    del cfg.model.model_config["pet_config"]
    ms.set_seed(42)
    net = build_model(cfg.model)
    ms.save_checkpoint(net, str(tmp / "base.ckpt"))
    ms.save_checkpoint(net, str(tmp / "base.safetensors"), format="safetensors")
    return SimpleNamespace(ckpt=str(tmp / "base.ckpt"), safetensors=str(tmp / "base.safetensors"),
                           net=net, config=cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    tmp = tmp_path_factory.mktemp("data")
    full = write_tiny_dataset(str(tmp / "full.mindrecord"), num_rows=64, seq_length=32, vocab_size=128)
    rest = write_tiny_dataset(str(tmp / "rest.mindrecord"), num_rows=32, seq_length=32, vocab_size=128,
                              skip_rows=32)
    return SimpleNamespace(full=full, rest=rest)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, base_model, data):
    """32 DoRA steps on the base checkpoint, adapters saved at 16 and 32, merged at the end."""
    tmp = tmp_path_factory.mktemp("run_a")
    losses, log = _run(tmp, data.full, {"save_steps": 16, "merge_on_end": True}, base_model.ckpt)
    return SimpleNamespace(tmp=tmp, losses=losses, log=log, adapters=tmp / "adapters")


@pytest.mark.slow
@pytest.mark.e2e
def test_saves_peft_dirs_and_starts_from_the_loaded_base(run_a, base_model, data):
    from mindformers_lora_ext import adapter_files
    root = str(run_a.adapters)
    assert [n for n, _ in adapter_files.step_dirs(root)] == [16, 32]
    assert adapter_files.resolve_adapter_dir(root).endswith("step_32")
    config, tensors = adapter_files.read_adapter_dir(os.path.join(root, "step_32"))
    assert config["use_dora"] is True and config["r"] == 8
    assert len(tensors) == 2 * 4 * 3 and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert re.search(r"saved adapter .*step_16: 8704 params; adapter norm per layer: L0=\S+ L1=\S+", run_a.log)
    # the base checkpoint is loaded AFTER wrapping; DoRA's magnitude still starts at ||W||,
    # so the first loss is the base model's loss on the first batch
    import mindspore.dataset as ds
    first = next(ds.MindDataset(data.full, columns_list=["input_ids"], shuffle=False)
                 .batch(2).create_tuple_iterator())[0]
    base_model.net.set_train(True)
    base_loss = base_model.net(first).asnumpy().item()  # a 1-element loss
    assert run_a.losses[0] == pytest.approx(base_loss, rel=1e-5)
    assert sum(run_a.losses[-8:]) < sum(run_a.losses[:8])


@pytest.mark.slow
@pytest.mark.e2e
def test_resume_continues_the_same_trajectory(run_a, base_model, data, tmp_path):
    shutil.copytree(run_a.adapters / "step_16", tmp_path / "adapters" / "step_16")
    losses, log = _run(tmp_path, data.rest, {"save_steps": 16, "resume": True}, base_model.ckpt)
    assert "resumed from" in log and "(step 16," in log
    assert len(losses) == 16
    np.testing.assert_allclose(losses, run_a.losses[16:], rtol=2e-4, atol=2e-4)
    from mindformers_lora_ext import adapter_files
    _, resumed = adapter_files.read_adapter_dir(str(tmp_path / "adapters" / "step_32"))
    _, straight = adapter_files.read_adapter_dir(str(run_a.adapters / "step_32"))
    for key, value in straight.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_merge_equals_adapter_forward_and_merge_on_end(run_a, base_model, tmp_path):
    from mindformers.models.build_model import build_model, build_network
    from safetensors.numpy import load_file
    out = tmp_path / "merged.safetensors"
    proc = run_fresh(["-m", "mindformers_lora_ext.cli", "merge", "--base", base_model.safetensors,
                      "--adapter", str(run_a.adapters), "--out", str(out)], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged 8 cells of" in proc.stdout
    on_end = load_file(str(run_a.adapters / "merged" / "model.safetensors"))
    cli = load_file(str(out))
    assert sorted(cli) == sorted(on_end)
    for key, value in cli.items():
        np.testing.assert_allclose(value, on_end[key], rtol=1e-6, atol=1e-7)
    ids = ms.Tensor(np.random.default_rng(1).integers(3, 128, (2, 32)), ms.int32)
    cfg = base_model.config
    plain = build_model(cfg.model)
    ms.load_param_into_net(plain, ms.load_checkpoint(str(out), format="safetensors"))
    from mindformers.tools.register.config import DictConfig
    cfg.model.model_config.pet_config = DictConfig(pet_type="dora", lora_rank=8, lora_alpha=16,
                                                   target_modules=".*wq|.*wk|.*wv|.*wo",
                                                   adapter_path=str(run_a.adapters))
    adapted = build_network(cfg.model)
    ms.load_param_into_net(adapted, ms.load_checkpoint(base_model.ckpt))
    del cfg.model.model_config["pet_config"]
    plain.set_train(False)
    adapted.set_train(False)
    np.testing.assert_allclose(plain(ids)[0].asnumpy(), adapted(ids)[0].asnumpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("losses,stops_at", [([1.0, math.nan, 2.0, math.inf, math.nan, 1.0], 5),
                                             ([1.0, math.nan, 1.0, math.nan, 1.0], None)])
def test_nan_guard_stops_and_keeps_the_last_good_adapter(tiny_config, tmp_path, losses, stops_at):
    from mindformers.models.build_model import build_network
    from mindformers_lora_ext.callbacks import AdapterCheckpoint, TrainingDivergedError
    net = build_network(tiny_config.model)
    cb = AdapterCheckpoint(save_steps=1, nan_patience=2, output_dir=str(tmp_path / "adapters"))
    cb.on_train_begin(CallbackContext(net, 0, 0.0))
    for step, loss in enumerate(losses, start=1):
        ctx = CallbackContext(net, step, loss)
        cb.on_train_step_end(ctx)
        if ctx.stopped:
            break
    assert (step if ctx.stopped else None) == stops_at
    saved = sorted(os.listdir(tmp_path / "adapters"))
    assert "step_2" not in saved and "step_4" not in saved  # nothing saved from a bad step
    if stops_at:
        with pytest.raises(TrainingDivergedError, match="not finite for 2 consecutive steps .* the last "
                                                        "good adapter is step_3"):
            cb.on_train_end(ctx)
        assert "step_5" not in os.listdir(tmp_path / "adapters")
    else:
        cb.on_train_end(ctx)


def test_bad_callback_arguments():
    from mindformers_lora_ext.callbacks import AdapterCheckpoint
    with pytest.raises(ValueError, match=r"save_steps = 0: expected an integer >= 1"):
        AdapterCheckpoint(save_steps=0)
    with pytest.raises(ValueError, match=r"keep_last = 'all'"):
        AdapterCheckpoint(keep_last="all")
