"""Adapters against the real HF PEFT (torch CPU; the ``interop`` extra, which .ci/run installs).

For legacy Llama, mcore Qwen3 and Qwen3-MoE with identical base weights in both frameworks (HF
weights converted by MindFormers' own converters, tests/hf_twins.py):
(a) PEFT loads the directories we save with no warning (no missing or unexpected key, no
    unknown config key); (b) PEFT's logits equal ours for lora, dora, rslora and rank/alpha
    patterns; (c) an adapter trained in PEFT (q/k/v and gate/up with their own A's) loads through
    ``adapter_path`` with ``fused_cells: per_hf_module`` and gives PEFT's logits, and without it is
    refused naming the option; (d) MindFormers -> PEFT -> MindFormers is bit-exact.
"""
import copy
import warnings

import numpy as np
import pytest

from conftest import interop_modules

torch, peft = interop_modules("torch", "peft")

import mindspore as ms  # noqa: E402  pylint: disable=wrong-import-position

import hf_twins  # noqa: E402  pylint: disable=wrong-import-position
from mindformers_lora_ext.peft_format import save_adapter  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.interop
TOL = 1e-4
# pet_config over each tiny config (which targets every linear cell of attention and MLP)
PETS = {
    "lora": dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8),
    "dora": dict(pet_type="dora", lora_rank=4, lora_alpha=8),
    "rslora": dict(pet_type="rslora", lora_rank=4, lora_alpha=8),
    "patterns": dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8, rank_pattern={r"layers\.1\..*": 2},
                     alpha_pattern={r"layers\.0\..*": 3}),
}
KINDS = ("llama", "qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def pairs():
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = hf_twins.build_pair(kind, seed=0)
        return made[kind]
    return get


def _randomize(network, seed):
    """Every adapter parameter random (B included, so the adapter acts), magnitudes near their
    initial value."""
    rng = np.random.default_rng(seed)
    for param in network.network.adapter_parameters():
        value = param.asnumpy()
        if param.name.endswith("lora_magnitude_vector"):
            new = value * (1 + 0.1 * rng.standard_normal(value.shape))
        else:
            new = 0.1 * rng.standard_normal(value.shape)
        mask = getattr(_layer_of(network, param.name), "block_mask", None)
        if mask is not None and param.name.endswith("lora_B"):
            new = new * mask.asnumpy()  # per-module adapters: B is zero outside its blocks
        param.set_data(ms.Tensor(new.astype(value.dtype)))


def _layer_of(network, name):
    return network.network._adapter_layers.get(name.rpartition(".")[0])  # pylint: disable=protected-access


def _peft_model(pair, directory):
    """PEFT's model for ``directory`` on a copy of the HF twin; fails on any warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(pair.hf_model), str(directory))
    peft_warnings = [str(w.message) for w in caught if "peft" in (w.filename or "") or "adapter" in str(w.message)]
    assert not peft_warnings, peft_warnings
    model.eval()
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pet", list(PETS))
def test_peft_loads_our_adapter_and_gives_our_logits(pairs, tmp_path, kind, pet):
    pair = pairs(kind)
    net = pair.mf_network(PETS[pet])
    _randomize(net, seed=1)
    ours = pair.mf_logits(net)
    save_adapter(net.network, str(tmp_path / "a"))
    model = _peft_model(pair, tmp_path / "a")
    theirs = hf_twins.hf_logits(model, pair.input_ids)
    base = hf_twins.hf_logits(pair.hf_model, pair.input_ids)
    assert np.abs(theirs - base).max() > 100 * TOL  # the adapter acts
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
    # (d) and back: a fresh network loads PEFT's directory to the same bits
    back = pair.mf_network(dict(PETS[pet], adapter_path=str(tmp_path / "a")))
    before, after = net.network.adapter_state_dict(), back.network.adapter_state_dict()
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert np.array_equal(after[name], value), name


def _peft_trained(pair, tmp_path, targets, use_dora=False):
    """An adapter as HF PEFT makes it: every module its own random A and B."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(pair.hf_model), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
            elif "lora_" in name:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "peft"))
    model.eval()
    return hf_twins.hf_logits(model, pair.input_ids)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_trained_in_peft_loads_per_hf_module(pairs, tmp_path, use_dora):
    pair = pairs("qwen3")
    theirs = _peft_trained(pair, tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], use_dora)
    pet = dict(pet_type="dora" if use_dora else "lora_ext", lora_rank=4, lora_alpha=8,
               fused_cells="per_hf_module", adapter_path=str(tmp_path / "peft"))
    net = pair.mf_network(pet)
    np.testing.assert_allclose(pair.mf_logits(net), theirs, atol=TOL, rtol=0)
    # and our save of it is PEFT's adapter again, bit for bit
    save_adapter(net.network, str(tmp_path / "again"))
    from safetensors.numpy import load_file
    saved, original = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("again", "peft"))
    assert sorted(saved) == sorted(original)
    for key, value in original.items():
        assert np.array_equal(saved[key], value), key
    _peft_model(pair, tmp_path / "again")  # no warning


def test_peft_adapter_with_own_qkv_a_needs_per_hf_module(pairs, tmp_path):
    pair = pairs("qwen3")
    _peft_trained(pair, tmp_path, ["q_proj", "k_proj", "v_proj"])
    with pytest.raises(ValueError, match="fused_cells: per_hf_module"):
        pair.mf_network(dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8, target_modules=["linear_qkv"],
                             adapter_path=str(tmp_path / "peft")))


def test_peft_adapter_on_some_fused_modules_loads_exactly(pairs, tmp_path):
    """HF's classic q_proj + v_proj LoRA: MindFormers' linear_qkv adapter gets zero k rows."""
    pair = pairs("qwen3")
    theirs = _peft_trained(pair, tmp_path, ["q_proj", "v_proj"])
    net = pair.mf_network(dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8, target_modules=["linear_qkv"],
                               fused_cells="per_hf_module", adapter_path=str(tmp_path / "peft")))
    np.testing.assert_allclose(pair.mf_logits(net), theirs, atol=TOL, rtol=0)
