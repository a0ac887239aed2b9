"""Trainable token rows (``trainable_token_indices``): only those rows train, the table stays
bit-identical, files hold the rows only (PEFT's keys), merge writes them back; and against the real
HF PEFT (interop extra): PEFT loads ours with our logits, ours loads PEFT's with PEFT's logits."""
import copy
import json
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from safetensors.numpy import load_file

from mindformers.models.build_model import build_network
from mindformers_lora_ext.merge import merged_values
from mindformers_lora_ext.peft_format import load_adapter, save_adapter
from conftest import interop_modules

IDS = [3, 5, 7]
RNG = np.random.default_rng(11)
INPUT = RNG.integers(3, 12, (2, 33)).astype(np.int32)  # many tokens of the trained rows


def _network(tiny_config, **pet):
    tiny_config.model.model_config.pet_config.update(dict(dict(trainable_token_indices=IDS), **pet))
    ms.set_seed(0)
    return build_network(tiny_config.model)


def _logits(net):
    net.set_train(False)
    return net(Tensor(INPUT[:, :32]))[0].asnumpy()


def test_only_the_rows_train_and_the_table_stays(tiny_config):
    net = _network(tiny_config)
    model = net.network
    layer = model._token_layers["model.tok_embeddings"]  # pylint: disable=protected-access
    table = layer.table
    assert table.name == "model.tok_embeddings.embedding_weight"
    delta = layer.trainable_tokens_delta
    assert delta.name == "model.tok_embeddings.trainable_tokens_delta" and delta.shape == (3, 64)
    names = {p.name for p in net.trainable_params()}
    assert "model.tok_embeddings.trainable_tokens_delta" in names and table.name not in names
    assert all(n.endswith(("lora_A", "lora_B", "trainable_tokens_delta")) for n in names)
    original = table.asnumpy().copy()
    np.testing.assert_array_equal(delta.asnumpy(), original[IDS])  # starts at the table's rows
    base = _logits(net)

    net.set_train(True)
    step = nn.TrainOneStepCell(net, nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))
    step.set_train(True)
    losses = [float(step(Tensor(INPUT), Tensor(INPUT)).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert np.array_equal(table.asnumpy(), original)  # bit-identical
    trained = delta.asnumpy()
    assert not np.allclose(trained, original[IDS])
    # the cell's output: trained rows for the chosen ids, the table's for every other id
    out = layer(Tensor(INPUT)).asnumpy().reshape(-1, 64)
    flat = INPUT.reshape(-1)
    expected = np.where(np.isin(flat, IDS)[:, None], trained[np.searchsorted(IDS, np.clip(flat, 3, 7))], original[flat])
    np.testing.assert_array_equal(out, expected)

    # merge writes the rows into the table (same logits), unmerge restores it exactly
    adapted = _logits(net)
    assert not np.allclose(adapted, base)
    model.merge()
    merged_table = table.asnumpy()
    np.testing.assert_array_equal(merged_table[IDS], trained)
    np.testing.assert_array_equal(np.delete(merged_table, IDS, 0), np.delete(original, IDS, 0))
    np.testing.assert_allclose(_logits(net), adapted, atol=1e-6)
    model.unmerge()
    assert np.array_equal(table.asnumpy(), original)


def test_files_hold_the_rows_and_round_trip(tiny_config, tmp_path):
    net = _network(tiny_config)
    rng = np.random.default_rng(2)
    for p in net.network.saved_parameters():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    before = net.network.adapter_state_dict()
    save_adapter(net.network, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == IDS
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert tensors[key].shape == (3, 64) and not any(k.endswith("embed_tokens.weight") for k in tensors)
    fresh = _network(tiny_config)
    load_adapter(fresh.network, str(tmp_path / "a"))
    after = fresh.network.adapter_state_dict()
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)
    # a checkpoint merge writes the rows into the table
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    merged = merged_values(params.get, before, net.network.config.pet_config, "test")
    table = merged["model.tok_embeddings.embedding_weight"]
    np.testing.assert_array_equal(table[IDS], before["model.tok_embeddings.trainable_tokens_delta"])
    np.testing.assert_array_equal(np.delete(table, IDS, 0),
                                  np.delete(params["model.tok_embeddings.embedding_weight"], IDS, 0))


def test_bad_targets_are_refused(tiny_config):
    with pytest.raises(ValueError, match=r"token id\(s\) \[200\] are not rows of the embedding table \(128 rows\)"):
        _network(tiny_config, trainable_token_indices=[3, 200])
    tiny_config.model.model_config.pet_config.update(trainable_token_indices=None)
    with pytest.raises(ValueError, match="not an embedding cell"):
        _network(tiny_config, trainable_token_indices={"norm_out": [3]})
    tiny_config.model.model_config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        _network(tiny_config, trainable_token_indices=[3])


# ------------------------------------------------------------------------ against HF PEFT

@pytest.mark.interop
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_peft_agrees_both_ways(tmp_path, kind):
    torch, peft = interop_modules("torch", "peft")
    import hf_twins  # pylint: disable=import-outside-toplevel
    pair = hf_twins.build_pair(kind, seed=0)
    pair.input_ids[:, ::3] = 5  # the trained rows are used
    pet = dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8, trainable_token_indices=IDS)
    net = pair.mf_network(pet)
    rng = np.random.default_rng(4)
    for p in net.network.saved_parameters():
        p.set_data(Tensor((0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
    ours = pair.mf_logits(net)
    save_adapter(net.network, str(tmp_path / "ours"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(pair.hf_model), str(tmp_path / "ours")).eval()
    assert not [str(w.message) for w in caught if "peft" in (w.filename or "") or "adapter" in str(w.message)]
    np.testing.assert_allclose(hf_twins.hf_logits(model, pair.input_ids), ours, atol=1e-4, rtol=0)

    # an adapter PEFT trained (its own rows and LoRA) loads here with PEFT's logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             trainable_token_indices={"embed_tokens": IDS})
    torch.manual_seed(5)
    theirs_model = peft.get_peft_model(copy.deepcopy(pair.hf_model), config)
    with torch.no_grad():
        for name, param in theirs_model.named_parameters():
            if "lora_" in name or "trainable_tokens" in name:
                param.copy_(0.1 * torch.randn_like(param))
    theirs_model.save_pretrained(str(tmp_path / "peft"))
    theirs = hf_twins.hf_logits(theirs_model.eval(), pair.input_ids)
    targets = ["wq", "wv"] if kind == "llama" else ["linear_qkv"]
    back = pair.mf_network(dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8, target_modules=targets,
                                fused_cells="shared" if kind == "llama" else "per_hf_module",
                                trainable_token_indices=IDS, adapter_path=str(tmp_path / "peft")))
    np.testing.assert_allclose(pair.mf_logits(back), theirs, atol=1e-4, rtol=0)
