"""AdaLoRA: budget schedule, importance, masking, orthogonality penalty, layer math."""
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from mindformers_lora_ext.tuners.adalora import AdaLoraLinear, RankAllocator

RNG = np.random.default_rng(4)


def _config(**kw):
    base = dict(init_r=6, target_r=2, tinit=10, tfinal=20, deltaT=5, beta1=0.85, beta2=0.85,
                total_step=100)
    base.update(kw)
    return SimpleNamespace(**base)


def test_budget_schedule_follows_the_cubic_formula():
    alloc = RankAllocator(_config(), {"a": 6, "b": 6, "c": 6})
    assert (alloc.init_bgt, alloc.target_bgt) == (18, 6)
    assert alloc.budget_schedule(10) == (18, False)            # warm-up: full budget, no mask
    for step in (15, 33, 50, 64, 79):
        progress = 1 - (step - 10) / (100 - 20 - 10)
        assert alloc.budget_schedule(step) == (int(12 * progress ** 3 + 6), step % 5 == 0)
    assert alloc.budget_schedule(80)[0] == 6                   # reaches target at total - tfinal
    assert alloc.budget_schedule(81) == (6, True)              # final phase: fixed budget


def test_importance_ema_matches_numpy_and_masking_keeps_the_budget():
    cfg = _config()
    cells = {"a": 6, "b": 6}
    alloc = RankAllocator(cfg, cells)
    shapes = {"lora_A": (6, 5), "lora_B": (4, 6), "lora_E": (6, 1)}
    ema_ipt, ema_unc = {}, {}
    for _ in range(3):
        values = {f"{c}.{k}": RNG.standard_normal(s) for c in cells for k, s in shapes.items()}
        grads = {n: RNG.standard_normal(v.shape) for n, v in values.items()}
        alloc.update_ipt(values, grads)
        for name, value in values.items():  # the paper's / PEFT's formulas, written out again
            ipt = np.abs(value * grads[name])
            old_i, old_u = ema_ipt.get(name, 0.0), ema_unc.get(name, 0.0)
            ema_ipt[name] = 0.85 * old_i + 0.15 * ipt
            ema_unc[name] = 0.85 * old_u + 0.15 * np.abs(ipt - ema_ipt[name])
    for name in ema_ipt:
        np.testing.assert_allclose(alloc.exp_avg_ipt[name], ema_ipt[name])
        np.testing.assert_allclose(alloc.exp_avg_unc[name], ema_unc[name])
    scores = alloc.triplet_scores()
    s = {n: ema_ipt[n] * ema_unc[n] for n in ema_ipt}
    np.testing.assert_allclose(scores["a"], s["a.lora_E"][:, 0] + s["a.lora_A"].mean(1) + s["a.lora_B"].mean(0))
    for budget in (12, 9, 5, 2):
        pattern = alloc.mask_to_budget(budget)
        assert sum(sum(m) for m in pattern.values()) == budget
        kept_scores = np.concatenate([scores[c][np.asarray(pattern[c])] for c in cells])
        dropped = np.concatenate([scores[c][~np.asarray(pattern[c])] for c in cells])
        assert dropped.size == 0 or kept_scores.min() > dropped.max()  # the best ones survive


def _spec(rank=4, alpha=8.0, init_r=4):
    return SimpleNamespace(rank=rank, dropout=0.0, scale=alpha / (init_r + 1e-5), init_r=init_r)


def test_layer_forward_and_orth_penalty_match_numpy():
    base = nn.Dense(7, 5, has_bias=True)
    layer = AdaLoraLinear(base, _spec())
    assert not layer.lora_E.asnumpy().any()  # dW starts at 0
    a, b, e = RNG.standard_normal((4, 7)), RNG.standard_normal((5, 4)), RNG.standard_normal((4, 1))
    for name, value in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
        getattr(layer, name).set_data(Tensor(value.astype(np.float32)))
    x = RNG.standard_normal((3, 7)).astype(np.float32)
    w, bias = base.weight.asnumpy().astype(np.float64), base.bias.asnumpy().astype(np.float64)
    expected = x @ (w + (8.0 / (4 + 1e-5)) * b @ (a * e)).T + bias
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), expected, rtol=1e-4, atol=1e-4)
    penalty = ((b.T @ b - np.eye(4)) ** 2).sum() + ((a @ a.T - np.eye(4)) ** 2).sum()
    assert float(layer.orth_penalty().asnumpy()) == pytest.approx(penalty, rel=1e-4)
    before = layer(Tensor(x)).asnumpy()
    layer.merge()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), before, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.e2e
def test_adalora_e2e_ranks_shrink_and_the_pruned_adapter_reloads(tmp_path, tiny_config):
    """Through the run_mindformer.py path: the kept rank follows the budget down to target_r·n,
    the loss goes down, and the saved (pruned) adapter, reloaded at its pruned ranks on the same
    base checkpoint, computes what the merged trained network computes."""
    import json
    import os
    import re
    import yaml
    from mindformers.models.build_model import build_model, build_network
    from mindformers.tools.register.config import DictConfig
    from mindformers_lora_ext import adapter_files
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    from conftest import ROOT, RUN_MINDFORMER, run_fresh

    mc = tiny_config.model.model_config
    del mc["pet_config"]
    ms.set_seed(42)
    ms.save_checkpoint(build_model(tiny_config.model), str(tmp_path / "base.ckpt"))
    data = write_tiny_dataset(str(tmp_path / "train.mindrecord"), num_rows=64, seq_length=32, vocab_size=128)
    cfg = {"base_config": [os.path.join(ROOT, "configs", "tiny", "adalora.yaml")],
           "load_checkpoint": str(tmp_path / "base.ckpt"),
           "callbacks": [{"type": "MFLossMonitor"}, {"type": "AdaLoraRankAllocator", "log_every": 2},
                         {"type": "AdapterCheckpoint", "save_steps": 32, "merge_on_end": True,
                          "output_dir": str(tmp_path / "adapters")},
                         {"type": "TrainingSummary", "summary_file": str(tmp_path / "summary.json")}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_fresh([RUN_MINDFORMER, "--config", str(tmp_path / "run.yaml"), "--train_dataset_dir", data,
                      "--output_dir", str(tmp_path / "out")], cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # budget: init_r 8 x 8 cells = 64 down to target_r 4 x 8 = 32, kept rank == budget each time
    alloc = RankAllocator(_config(init_r=8, target_r=4, tinit=4, tfinal=8, deltaT=2, total_step=32),
                          {str(i): 8 for i in range(8)})
    logged = [(int(s), int(b), int(k)) for s, b, k in
              re.findall(r"AdaLoRA step (\d+): budget (\d+), kept rank (\d+)", log)]
    assert logged and all(b == k == alloc.budget_schedule(s)[0] for s, b, k in logged)
    assert logged[-1][2] == 32
    losses = json.loads((tmp_path / "summary.json").read_text())["losses"]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.03, losses
    config, tensors = adapter_files.read_adapter_dir(str(tmp_path / "adapters" / "step_32"))
    assert config["peft_type"] == "ADALORA"
    kept = {k: sum(v) for k, v in config["rank_pattern"].items()}
    assert sum(kept.values()) == 32
    for key, rank in kept.items():  # files hold only the surviving triplets (none: no tensors)
        assert tensors[f"base_model.model.{key}"].shape == (rank, 1) if rank else f"base_model.model.{key}" not in tensors
    # reload at the pruned ranks on the base checkpoint == the merged trained network
    ids = ms.Tensor(np.random.default_rng(2).integers(3, 128, (2, 32)), ms.int32)
    mc.pet_config = DictConfig(pet_type="adalora", init_r=8, target_r=4, total_step=32, lora_alpha=16,
                               target_modules=".*wq|.*wk|.*wv|.*wo", adapter_path=str(tmp_path / "adapters"))
    adapted = build_network(tiny_config.model)
    ms.load_param_into_net(adapted, ms.load_checkpoint(str(tmp_path / "base.ckpt")))
    layers = adapted.network.adalora_layers()
    for key, rank in kept.items():  # rebuilt at the pruned ranks; rank 0 stays a plain base cell
        cell = key.replace(".lora_E", "").replace("self_attn.q_proj", "attention.wq").replace(
            "self_attn.k_proj", "attention.wk").replace("self_attn.v_proj", "attention.wv").replace(
            "self_attn.o_proj", "attention.wo")
        assert (layers[cell].rank == rank) if rank else cell not in layers
    del mc["pet_config"]
    merged = build_model(tiny_config.model)
    ms.load_param_into_net(merged, ms.load_checkpoint(str(tmp_path / "adapters" / "merged" / "model.safetensors"),
                                                      format="safetensors"))
    adapted.set_train(False)
    merged.set_train(False)
    np.testing.assert_allclose(adapted(ids)[0].asnumpy(), merged(ids)[0].asnumpy(), rtol=1e-4, atol=1e-4)


def test_training_without_the_rank_allocator_is_refused_at_the_first_step(tiny_config):
    from mindspore import nn
    from mindformers.models.build_model import build_network
    from mindformers.tools.register.config import DictConfig
    from mindformers_lora_ext.callbacks import AdaLoraRankAllocator
    from mindformers_lora_ext.wrappers import CpuSafeTrainOneStepCell
    from conftest import CallbackContext
    tiny_config.model.model_config.pet_config = DictConfig(
        pet_type="adalora", init_r=4, target_r=2, total_step=8, target_modules=".*wq|.*wv")
    net = build_network(tiny_config.model)
    step = CpuSafeTrainOneStepCell(net, nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3))
    step.set_train(True)
    ids = ms.Tensor(np.arange(2 * 33, dtype=np.int32).reshape(2, 33) % 128)
    with pytest.raises(ValueError, match="no AdaLoraRankAllocator callback is attached"):
        step(ids)
    AdaLoraRankAllocator().on_train_begin(CallbackContext(step, 0))
    loss = step(ids)[0].asnumpy()
    assert np.isfinite(loss) and any(np.abs(g).max() > 0 for g in step.tapped_gradients().values())


def test_rank_pattern_survives_the_peft_config_round_trip():
    """adapter_config.json keys rank_pattern by ``<hf module>.lora_E`` (PEFT); reading it back
    gives our cell names, so a cell pruned to rank 0 is skipped when rebuilt from the file."""
    from mindformers_lora_ext.config import AdaLoraConfig
    from mindformers_lora_ext.peft_format import peft_config_dict, pet_config_from_peft
    pattern = {"model.layers.0.attention.wq": [False] * 4, "decoder.layers.1.mlp.linear_fc1": [True, False] * 2}
    config = AdaLoraConfig(pet_type="adalora", init_r=4, target_r=2, total_step=8, rank_pattern=pattern,
                           target_modules=["wq", "linear_fc1"])
    data = peft_config_dict(config, list(pattern))
    assert sorted(data["rank_pattern"]) == ["decoder.layers.1.mlp.linear_fc1.lora_E",
                                            "model.layers.0.self_attn.q_proj.lora_E"]
    assert pet_config_from_peft(data)["rank_pattern"] == pattern
