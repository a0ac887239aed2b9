"""merge() on a whole model and merge_checkpoint(): merged logits equal adapter logits."""
import numpy as np
import pytest
import mindspore as ms

from mindformers.models.build_model import build_model, build_network
from mindformers_lora_ext.config import LORA_PRESETS
from mindformers_lora_ext.merge import merge_checkpoint

IDS = ms.Tensor(np.random.default_rng(0).integers(3, 128, (2, 32)), ms.int32)


def _logits(net):
    net.set_train(False)
    return net(IDS)[0].asnumpy()


def _adapted(tiny_config, pet_type):
    tiny_config.model.model_config.pet_config.pet_type = pet_type
    net = build_network(tiny_config.model)
    rng = np.random.default_rng(7)
    for p in net.trainable_params():  # a trained-looking adapter: B no longer zero
        value = rng.standard_normal(p.shape).astype(np.float32) * 0.1
        if p.name.endswith("magnitude_vector"):
            value = p.asnumpy() * (1 + value)
        p.set_data(ms.Tensor(value))
    return net


@pytest.mark.parametrize("pet_type", ["lora_ext", "dora"])
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_merged_checkpoint_loads_into_the_plain_base_model(tiny_config, tmp_path, pet_type, fmt):
    net = _adapted(tiny_config, pet_type)
    expected = _logits(net)
    src, out = tmp_path / f"adapted.{fmt}", tmp_path / f"merged.{fmt}"
    # as a run checkpoint: AdamW's moments (adam_m.<...>.lora_A ends like an adapter) and a step
    state = [{"name": f"adam_{m}.{p.name}", "data": ms.Tensor(np.full(p.shape, 9.0, np.float32))}
             for m in "mv" for p in net.trainable_params()]
    ms.save_checkpoint([{"name": p.name, "data": p} for p in net.get_parameters()] + state
                       + [{"name": "global_step", "data": ms.Tensor([5], ms.int32)}], str(src), format=fmt)
    counts = merge_checkpoint(str(src), str(out), net.network.config.pet_config)
    assert counts["merged_cells"] == 2 * 4
    del tiny_config.model.model_config["pet_config"]
    base = build_model(tiny_config.model)
    not_loaded, unused = ms.load_param_into_net(base, ms.load_checkpoint(str(out), format=fmt))
    assert not_loaded == [] and unused == ["global_step"]  # the base model's parameters, no moments
    np.testing.assert_allclose(_logits(base), expected, rtol=1e-4, atol=1e-4)


def test_model_merge_and_unmerge(tiny_config):
    net = _adapted(tiny_config, "dora")
    expected = _logits(net)
    weight = net.parameters_dict()["model.layers.0.attention.wq.weight"].asnumpy().copy()
    net.network.merge()
    np.testing.assert_allclose(_logits(net), expected, rtol=1e-4, atol=1e-4)
    net.network.unmerge()
    np.testing.assert_allclose(net.parameters_dict()["model.layers.0.attention.wq.weight"].asnumpy(),
                               weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_logits(net), expected, rtol=1e-4, atol=1e-4)


def test_merge_checkpoint_errors(tiny_config, tmp_path):
    del tiny_config.model.model_config["pet_config"]
    base = build_model(tiny_config.model)
    src = tmp_path / "base.ckpt"
    ms.save_checkpoint(base, str(src))
    pet_config = LORA_PRESETS[0](target_modules=["wq"])
    with pytest.raises(ValueError, match="no '<cell>.lora_A' tensor found"):
        merge_checkpoint(str(src), str(tmp_path / "out.ckpt"), pet_config)
    bad = {"model.layers.0.attention.wq.lora_A": np.zeros((8, 32)),
           "model.layers.0.attention.wq.lora_B": np.zeros((64, 8))}
    with pytest.raises(ValueError, match=r"wq.weight has shape \(64, 64\); adapter expects \(64, 32\)"):
        merge_checkpoint(str(src), str(tmp_path / "out.ckpt"), pet_config, adapter=bad)
    assert not (tmp_path / "out.ckpt").exists()
