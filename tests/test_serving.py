"""After training: eval through the launcher path, greedy generation merged vs unmerged."""
import os
import re

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import ops

from mindformers.models.build_model import build_model, build_network
from mindformers.tools.register.config import DictConfig
from mindformers_lora_ext.merge import merge_checkpoint
from mindformers_lora_ext.peft_format import save_adapter
from conftest import LORA_TYPES, METHOD_KEYS, ROOT, RUN_MINDFORMER, pet_config_over_tiny, run_fresh

# served with dropout configured: eval/predict must not apply it (the comparisons are exact)
SERVE_DROPOUT = {**{t: dict(lora_dropout=0.3) for t in LORA_TYPES + ["adalora"]}, "vera": dict(vera_dropout=0.3),
                 "loha": dict(rank_dropout=0.3, module_dropout=0.3),
                 "lokr": dict(rank_dropout=0.3, module_dropout=0.3, rank_dropout_scale=True)}


@pytest.fixture(scope="module")
def plain_model():
    """The tiny Llama without adapters (seed 42): it makes ``base_ckpt``; tests reuse it, and its
    compiled graphs, through :func:`_loaded`."""
    from mindformers.tools.register import MindFormerConfig
    cfg = MindFormerConfig(os.path.join(ROOT, "configs", "tiny", "lora_ext.yaml"))
    del cfg.model.model_config["pet_config"]
    ms.set_seed(42)
    return build_model(cfg.model)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, plain_model):  # pylint: disable=redefined-outer-name
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    ms.save_checkpoint(plain_model, str(path))
    return str(path)


def _loaded(net, checkpoint):
    """``net`` with every one of its parameters loaded from ``checkpoint`` (asserted)."""
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(checkpoint))
    assert not_loaded == []
    return net


def _pet(pet_type, **extra):
    return DictConfig(pet_type=pet_type, target_modules=".*wq|.*wk|.*wv|.*wo", **METHOD_KEYS[pet_type], **extra)


def _adapter_dir(tiny_config, base_ckpt, pet_type, directory):
    """A trained-looking adapter (random, non-zero B) for ``pet_type`` on the base checkpoint."""
    tiny_config.model.model_config.pet_config = _pet(pet_type)
    net = build_network(tiny_config.model)
    ms.load_param_into_net(net, ms.load_checkpoint(base_ckpt))
    rng = np.random.default_rng(11)
    for p in net.network.saved_parameters():
        noise = rng.standard_normal(p.shape).astype(np.float32)
        p.set_data(ms.Tensor(p.asnumpy() * (1 + 0.1 * noise) if p.name.endswith("magnitude_vector")
                             else 0.2 * noise))
    save_adapter(net.network, str(directory))
    return net


def _served(tiny_config, base_ckpt, pet_type, directory, **extra):
    """How one serves: the base checkpoint plus pet_config.adapter_path."""
    tiny_config.model.model_config.pet_config = _pet(pet_type, adapter_path=str(directory),
                                                     **SERVE_DROPOUT[pet_type], **extra)
    net = build_network(tiny_config.model)
    ms.load_param_into_net(net, ms.load_checkpoint(base_ckpt))
    return net


def _served_like_mindformers(tiny_config, base_ckpt, pet_type, directory, **extra):
    """What eval/predict do: build under no_init_parameters, set_train(False), then load."""
    from mindspore.nn.utils import no_init_parameters
    tiny_config.model.model_config.pet_config = _pet(pet_type, adapter_path=str(directory),
                                                     **SERVE_DROPOUT[pet_type], **extra)
    with no_init_parameters():
        net = build_network(tiny_config.model)
    net.set_train(False)
    layers = list(net.network._adapter_layers.values())
    assert layers and not any(layer.merged for layer in layers)  # nothing loaded yet: no merge
    ms.load_param_into_net(net, ms.load_checkpoint(base_ckpt))
    net.init_parameters_data()
    return net, layers


def _greedy(net, ids):
    argmax = ops.Argmax(-1)  # CPU has no ArgMaxExt kernel: the documented test-side replacement
    net.argmax = lambda x, axis=-1: argmax(x)
    net.set_train(False)
    return np.asarray(net.generate(ids, max_length=16, do_sample=False)[0])


@pytest.mark.parametrize("pet_type", list(METHOD_KEYS))
def test_greedy_generation_same_merged_and_unmerged(tiny_config, base_ckpt, plain_model, tmp_path, pet_type):  # pylint: disable=redefined-outer-name
    _adapter_dir(tiny_config, base_ckpt, pet_type, tmp_path / "adapter")
    if pet_type in ("pissa", "olora"):  # their adapters belong to the residual base they trained on
        pytest.skip("PiSSA/OLoRA adapters need the residual base saved with them; covered by test_merge")
    ids = [[5, 6, 7, 8, 9]]
    served = _served(tiny_config, base_ckpt, pet_type, tmp_path / "adapter")
    tokens = _greedy(served, ids)
    served.network.merge()  # same compiled graph, adapter folded into the weights
    np.testing.assert_array_equal(_greedy(served, ids), tokens)
    on_load, layers = _served_like_mindformers(tiny_config, base_ckpt, pet_type, tmp_path / "adapter",
                                               merge_on_load=True)
    np.testing.assert_array_equal(_greedy(on_load, ids), tokens)  # generate's set_train(False) merged
    assert all(layer.merged for layer in layers)
    # a plain base model loaded with the merged checkpoint generates the same
    full = tmp_path / "adapted.ckpt"
    served.network.unmerge()
    ms.save_checkpoint(served, str(full))
    merge_checkpoint(str(full), str(tmp_path / "merged.ckpt"), served.network.config.pet_config)
    np.testing.assert_array_equal(_greedy(_loaded(plain_model, str(tmp_path / "merged.ckpt")), ids), tokens)
    # the adapter is active when serving
    assert not np.array_equal(_greedy(_loaded(plain_model, base_ckpt), ids), tokens)


@pytest.mark.parametrize("pet_type", ["lora_ext", "loha"])
def test_merge_on_load_folds_after_the_checkpoint_and_refuses_training(tiny_config, base_ckpt, tmp_path,
                                                                      pet_type):
    _adapter_dir(tiny_config, base_ckpt, pet_type, tmp_path / "adapter")
    ids = ms.Tensor(np.arange(3, 67, dtype=np.int32).reshape(2, 32) % 128)
    reference = _served(tiny_config, base_ckpt, pet_type, tmp_path / "adapter")
    reference.set_train(False)
    expected = reference(ids)[0].asnumpy()
    net, layers = _served_like_mindformers(tiny_config, base_ckpt, pet_type, tmp_path / "adapter",
                                           merge_on_load=True)
    net.set_train(False)  # what Model.eval / generate do before running
    assert all(layer.merged for layer in layers)
    np.testing.assert_allclose(net(ids)[0].asnumpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="merge_on_load is true: it serves eval/predict"):
        net.set_train(True)


def _eval_config(tmp_path, pet_type, adapter, data, **extra):
    dataset = {"data_loader": {"type": "MindDataset", "dataset_dir": data, "shuffle": False},
               "input_columns": ["input_ids"], "num_parallel_workers": 1,
               "python_multiprocessing": False, "drop_remainder": False, "batch_size": 2,
               "repeat": 1, "numa_enable": False, "prefetch_size": 1}
    cfg = {"base_config": [os.path.join(ROOT, "configs", "tiny", "lora_ext.yaml")],
           "run_mode": "eval",
           "model": {"model_config": {"pet_config": pet_config_over_tiny(
               dict(_pet(pet_type, adapter_path=str(adapter), **extra)))}},
           "eval_dataset": dataset,
           "eval_dataset_task": {"type": "CausalLanguageModelDataset", "dataset_config": dataset},
           "metric": {"type": "PerplexityMetric"}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("pet_type,merge_on_load", [("lora_ext", False), ("dora", False), ("lora_ext", True),
                                                    ("pissa", True), ("loha", True)])
def test_eval_perplexity_through_launcher_matches_logits(tiny_config, base_ckpt, tmp_path, pet_type,
                                                         merge_on_load):
    """Eval through the launcher (merged on load, and unmerged) gives the perplexity of the
    unmerged served network's logits. Every other pet type's merge_on_load, built and loaded as
    eval and predict do, is checked in test_greedy_generation_same_merged_and_unmerged (which
    skips PiSSA/OLoRA: hence pissa here); these fresh runs check the launcher path itself."""
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    _adapter_dir(tiny_config, base_ckpt, pet_type, tmp_path / "adapter")
    # eval rows are exactly seq_length long (MindFormers' eval graph does not shift them)
    data = write_tiny_dataset(str(tmp_path / "eval.mindrecord"), num_rows=6, seq_length=31,
                              vocab_size=128, seed=5)
    config = _eval_config(tmp_path, pet_type, tmp_path / "adapter", data, merge_on_load=merge_on_load)
    proc = run_fresh([RUN_MINDFORMER, "--config", str(config),
                      "--load_checkpoint", base_ckpt, "--output_dir", str(tmp_path / "out")],
                     cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert ("merge_on_load folded" in log) == merge_on_load
    ppl = float(re.search(r"'PPL': ([0-9.eE+-]+)", log).group(1))
    # by hand: mean token cross entropy per batch from the served network's logits, averaged
    import mindspore.dataset as ds
    net = _served(tiny_config, base_ckpt, pet_type, tmp_path / "adapter")
    net.set_train(False)
    losses = []
    for (ids,) in ds.MindDataset(data, columns_list=["input_ids"], shuffle=False).batch(2).create_tuple_iterator():
        logits = net(ids)[0].asnumpy().astype(np.float64)
        tokens = ids.asnumpy()
        logits, target = logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        losses.append(-logp[np.arange(len(target)), target].mean())
    assert ppl == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-4)
