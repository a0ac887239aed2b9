"""Data-driven inits on the tiny Llama, in graph mode, against references computed from the target
layers' inputs captured independently (PyNative forward pre-hooks) and numpy: EVA's components,
ranks and files, CorDA's decomposition and residual, LoRA-GA's gradients (finite differences),
the pending-init error, and the token mask."""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindformers.models.build_model import build_network
from mindformers_lora_ext.data_init import corda, runner
from mindformers_lora_ext.data_init.statistics import token_mask
from mindformers_lora_ext.peft_format import load_adapter, save_adapter

TARGETS = ".*wq|.*wk|.*wv|.*wo"
SEQ = 32
RNG = np.random.default_rng(5)
# 3 batches of [2, 33]; the first 6 tokens of each row are a "prompt" (label -100)
IDS = [RNG.integers(3, 128, (2, SEQ + 1)).astype(np.int32) for _ in range(3)]
LABELS = [np.where(np.arange(SEQ + 1) < 6, -100, ids).astype(np.int32) for ids in IDS]
BATCHES = [(Tensor(i), Tensor(lab)) for i, lab in zip(IDS, LABELS)]


def _network(tiny_config, **pet):
    tiny_config.model.model_config.pet_config.update(dict(lora_rank=4, lora_alpha=8, target_modules=TARGETS, **pet))
    ms.set_seed(0)
    net = build_network(tiny_config.model)
    net.set_train(True)
    return net


def _captured_inputs(net):
    """Per adapter layer, the [rows, in] inputs of each batch (PyNative pre-hooks), float64."""
    model = net.network
    seen = {name: [] for name in model.adapter_names}
    handles = []
    for name, layer in model.data_init_layers().items():
        def hook(cell, inputs, name=name):  # pylint: disable=unused-argument
            seen[name].append(inputs[0].asnumpy().reshape(-1, inputs[0].shape[-1]).astype(np.float64))
        handles.append(layer.register_forward_pre_hook(hook))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model.collecting_statistics = True
    try:
        for batch in BATCHES:
            net(*batch)
    finally:
        model.collecting_statistics = False
        ms.set_context(mode=ms.GRAPH_MODE)
        for handle in handles:
            handle.remove()
    return seen


def _logits(net):
    net.set_train(False)
    out = net(Tensor(IDS[0][:, :SEQ]))[0].asnumpy()
    net.set_train(True)
    return out


def _initialize(net, max_batches=3):
    return runner.initialize(net.network, net, iter(BATCHES), ["input_ids", "labels"], max_batches, print)


def test_token_mask_follows_peft():
    cols = {"input_ids": np.array([[5, 6, 0, 7]]), "labels": np.array([[-100, 6, 0, 7]])}
    np.testing.assert_array_equal(token_mask(cols, 3, 0, -100, False), [[0, 1, 0]])  # label -100, pad 0
    np.testing.assert_array_equal(token_mask(cols, 3, 0, None, False), [[1, 1, 0]])
    # mcore rows hold labels shifted by one: token s's own label is labels[s - 1]
    np.testing.assert_array_equal(token_mask({"input_ids": np.array([[5, 6, 8]]), "labels": np.array([[-100, 8, 9]])},
                                             3, 0, -100, True), [[1, 0, 1]])


def test_eva_components_ranks_and_files(tiny_config, tmp_path):
    net = _network(tiny_config, init_lora_weights="eva", eva_config={"rho": 2.0, "tau": 0.999})
    model = net.network
    assert model.data_init_pending == "eva"
    base = _logits(net)
    seen = _captured_inputs(net)
    report = _initialize(net)
    assert model.data_init_pending is None and report.batches == 3
    layers = model.data_init_layers()
    # numpy reference: masked (label != -100) rows of all batches, centred, full SVD
    mask = np.concatenate([token_mask({"input_ids": i, "labels": lab}, SEQ, 0, -100, False).reshape(-1)
                           for i, lab in zip(IDS, LABELS)]) > 0
    ratios, vectors = {}, {}
    for name in layers:
        x = np.concatenate(seen[name])[mask]
        _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        ratios[name], vectors[name] = s ** 2 / np.sum(s ** 2), vt
    budget = 4 * len(layers)
    offers = sorted(((r, n) for n in layers for r in ratios[n][:8]), key=lambda t: -t[0])[:budget]
    expected = {n: sum(1 for _, m in offers if m == n) for n in layers}
    groups = [[n for n in layers if n.rsplit(".", 1)[0].endswith(f"{i}.attention") and n[-2:] in ("wq", "wk", "wv")]
              for i in range(2)]
    for group in groups:  # q/k/v see the same input: their ranks may move inside the group
        assert sum(report.ranks[n] for n in group) == sum(expected[n] for n in group)
        assert report.ranks[group[0]] == max(report.ranks[n] for n in group)
    assert all(report.ranks[n] == expected[n] for n in layers if n.endswith("wo"))
    for name, layer in layers.items():
        k = report.ranks[name]
        assert layer.effective_rank == k and layer.rank == 8
        a = layer.lora_A.asnumpy()
        np.testing.assert_allclose(np.abs(np.sum(a[:k] * vectors[name][:k], axis=1)), 1.0, atol=2e-3)
        assert not a[k:].any() and not layer.lora_B.asnumpy().any()
        assert layer.scaling == pytest.approx(8 / 4)  # adjust_scaling_factors keeps alpha / r
    np.testing.assert_array_equal(_logits(net), base)  # B = 0: the base model exactly

    # files: A at rank k, PEFT's rank_pattern / alpha_pattern, reload into a fresh model
    for p in model.adapter_parameters():  # trained values (rows past k stay zero)
        value = p.asnumpy()
        layer = layers[p.name.rsplit(".", 1)[0]]
        if p.name.endswith("lora_B"):
            value[:, :layer.effective_rank] = RNG.standard_normal((value.shape[0], layer.effective_rank))
            p.set_data(Tensor(value.astype(np.float32)))
    trained = _logits(net)
    save_adapter(model, str(tmp_path / "eva"))
    config = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["rho"] == 2.0
    files = {n for n, k in report.ranks.items() if k}
    assert len(config["target_modules"]) == len(files)
    assert all(v == report.ranks[n] for n, v in _mf_pattern(config["rank_pattern"], layers).items())
    fresh = _network(tiny_config, init_lora_weights="eva", eva_config={"rho": 2.0, "tau": 0.999})
    load_adapter(fresh.network, str(tmp_path / "eva"))
    assert fresh.network.data_init_pending is None
    assert {n: l.effective_rank for n, l in fresh.network.data_init_layers().items()} == report.ranks
    _copy_base(net, fresh)
    np.testing.assert_allclose(_logits(fresh), trained, atol=1e-6)


def _mf_pattern(pattern, layers):
    from mindformers_lora_ext.naming import hf_module_name
    hf = {hf_module_name(n): n for n in layers}
    return {hf[k]: v for k, v in pattern.items()}


def _copy_base(src, dst):
    values = {p.name: p for p in src.get_parameters()}
    for p in dst.get_parameters():
        if "lora" not in p.name:
            p.set_data(Tensor(values[p.name].asnumpy()))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_decomposition_and_residual(tiny_config, method):
    net = _network(tiny_config, init_lora_weights="corda", corda_config={"corda_method": method})
    model = net.network
    base = _logits(net)
    originals = {n: l.weight_array() for n, l in model.data_init_layers().items()}
    seen = _captured_inputs(net)
    _initialize(net)
    for name, layer in model.data_init_layers().items():
        rows = seen[name]  # PEFT's statistic: per call, X / |max X|, averaged
        cov = sum((x / abs(x.max())).T @ (x / abs(x.max())) for x in rows) / len(rows)
        ref_a, ref_b = corda.factors(corda.eigens(originals[name], cov, 4, method), layer.scaling)
        a, b = layer.lora_A.asnumpy().astype(np.float64), layer.lora_B.asnumpy().astype(np.float64)
        signs = np.sign(np.sum(a * ref_a, axis=1))
        np.testing.assert_allclose(a * signs[:, None], ref_a, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(b * signs[None, :], ref_b, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(layer.weight_array() + layer.scaling * b @ a, originals[name], atol=1e-5)
    np.testing.assert_allclose(_logits(net), base, atol=1e-4)  # W_res + s B A = W


def test_lora_ga_gradients_and_residual(tiny_config):
    net = _network(tiny_config, init_lora_weights="lora_ga", lora_ga_config={"direction": "ArB2r", "scale": "unit"})
    model = net.network
    base = _logits(net)
    layer = model.data_init_layers()["model.layers.1.attention.wo"]
    original = layer.weight_array()
    # finite differences of the mean loss over the batches for a few entries of W
    entries = [(0, 1), (5, 7), (17, 40)]
    fd = []
    weight = layer.weight.asnumpy()
    model.collecting_statistics = True  # run the pending model in training mode
    for i, j in entries:
        losses = []
        for step in (1e-2, -1e-2):
            moved = weight.copy()
            moved[i, j] += step
            layer.weight.set_data(Tensor(moved))
            losses.append(np.mean([float(net(*b).asnumpy()) for b in BATCHES]))
        fd.append((losses[0] - losses[1]) / 2e-2)
    layer.weight.set_data(Tensor(weight))
    model.collecting_statistics = False
    pass_ = runner.Pass(model, net, model.data_init_layers(), iter(BATCHES), ["input_ids", "labels"], 3, print,
                        runner.Report("lora_ga"))
    grads = pass_.gradients()
    np.testing.assert_allclose([grads["model.layers.1.attention.wo"][i, j] for i, j in entries], fd, rtol=2e-2,
                               atol=1e-4)
    _initialize(net)
    a, b = layer.lora_A.asnumpy().astype(np.float64), layer.lora_B.asnumpy().astype(np.float64)
    np.testing.assert_allclose(layer.weight_array() + layer.scaling * b @ a, original, atol=1e-5)
    np.testing.assert_allclose(_logits(net), base, atol=1e-4)


def test_training_while_pending_names_the_callback(tiny_config):
    net = _network(tiny_config, init_lora_weights="eva")
    with pytest.raises(ValueError, match="type: DataDrivenInit"):
        net(*BATCHES[0])
    net.network.finish_data_init()
    assert np.isfinite(float(net(*BATCHES[0]).asnumpy()))


def test_eva_run_checkpoint_exports_and_merges_at_the_ranks_in_use(tiny_config, tmp_path):
    """A MindFormers run checkpoint holds EVA's A, B at the allocated rows (zero past each rank):
    `mindformers-lora export` cuts them to the ranks in use (= save_adapter's files) and the
    checkpoint merge folds the same update."""
    import yaml  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    from conftest import TINY_CONFIG  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext import cli  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.merge import merged_values  # pylint: disable=import-outside-toplevel
    pet = dict(lora_rank=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
               eva_config={"adjust_scaling_factors": False})
    net = _network(tiny_config, **{k: v for k, v in pet.items() if k not in ("lora_rank", "lora_alpha", "target_modules")})
    report = _initialize(net)
    for name, layer in net.network.data_init_layers().items():  # "trained" B at the rank in use
        b = layer.lora_B.asnumpy()
        b[:, :report.ranks[name]] = RNG.standard_normal((b.shape[0], report.ranks[name]))
        layer.lora_B.set_data(Tensor(b.astype(np.float32)))
    assert any(layer.scaling != 2.0 for layer in net.network.data_init_layers().values())  # alpha / k
    save_adapter(net.network, str(tmp_path / "saved"))
    ms.save_checkpoint(net, str(tmp_path / "run.ckpt"))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"base_config": [TINY_CONFIG],
                                                       "model": {"model_config": {"pet_config": pet}}}))
    assert cli.main(["export", "--adapter", str(tmp_path / "run.ckpt"), "--config", str(tmp_path / "run.yaml"),
                     str(tmp_path / "exported")]) == 0
    saved, exported = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("saved", "exported"))
    assert sorted(saved) == sorted(exported) and all(np.array_equal(saved[k], exported[k]) for k in saved)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("saved", "exported")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    assert configs[0]["alpha_pattern"] == configs[1]["alpha_pattern"]
    # the run checkpoint merged with the YAML's config equals the live network merged
    params = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(tmp_path / "run.ckpt")).items()}
    from mindformers_lora_ext.config import LoraExtConfig  # pylint: disable=import-outside-toplevel
    merged = merged_values(params.get, {n: v for n, v in params.items() if "lora_" in n},
                           LoraExtConfig(**pet), "run.ckpt")
    net.network.merge()
    for name, layer in net.network.data_init_layers().items():
        np.testing.assert_allclose(merged[f"{name}.weight"], layer.weight.asnumpy(), atol=1e-6)
