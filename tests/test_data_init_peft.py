"""CorDA and LoRA-GA math against the real HF PEFT (torch CPU, the interop extra): PEFT's
``preprocess_corda`` / ``preprocess_loraga`` + ``get_peft_model`` on a one-layer torch model, and
ours (data_init.corda / lora_ga) on the same weight and the same statistics, give the same A, B
(singular vectors up to sign) and residual base weight."""
import importlib

import numpy as np
import pytest

from conftest import interop_modules

torch, peft = interop_modules("torch", "peft")

from mindformers_lora_ext.data_init import corda, lora_ga  # noqa: E402  pylint: disable=wrong-import-position

peft_corda = importlib.import_module("peft.tuners.lora.corda")
peft_loraga = importlib.import_module("peft.tuners.lora.loraga")
peft_config = importlib.import_module("peft.tuners.lora.config")

pytestmark = pytest.mark.interop
RANK, ALPHA = 3, 6.0
SCALING = ALPHA / RANK


class _OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 10, bias=False)

    def forward(self, x):  # pylint: disable=arguments-differ
        return self.proj(x)


def _peft_adapter(model):
    layer = model.base_model.model.proj
    return (layer.lora_A.default.weight.detach().double().numpy(), layer.lora_B.default.weight.detach().double().numpy(),
            layer.base_layer.weight.detach().double().numpy())


def _aligned(ours, theirs, axis):
    """``ours`` with each row (axis 1) or column (axis 0) sign-flipped to agree with ``theirs``."""
    signs = np.sign(np.sum(ours * theirs, axis=axis))
    assert np.all(signs != 0)
    return ours * (signs[:, None] if axis == 1 else signs[None, :])


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(method):
    torch.manual_seed(0)
    model = _OneLayer()
    weight = model.proj.weight.detach().double().numpy()
    x = torch.randn(5, 10, 12) * torch.linspace(0.2, 3.0, 12)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="corda",
                             corda_config=peft_config.CordaConfig(corda_method=method))
    peft_corda.preprocess_corda(model, config, run_model=lambda: [model(x[i:i + 1]) for i in range(5)])
    peft_a, peft_b, peft_w = _peft_adapter(peft.get_peft_model(model, config))

    rows = [x[i].double().numpy() for i in range(5)]  # PEFT's statistic: per call, X / |max X|
    cov = sum((r / abs(r.max())).T @ (r / abs(r.max())) for r in rows) / len(rows)
    ours_a, ours_b = corda.factors(corda.eigens(weight, cov, RANK, method), SCALING)
    signs = np.sign(np.sum(ours_a * peft_a, axis=1))  # A row i and B column i: one triplet, one sign
    np.testing.assert_allclose(ours_a * signs[:, None], peft_a, atol=1e-4)
    np.testing.assert_allclose(ours_b * signs[None, :], peft_b, atol=1e-4)
    np.testing.assert_allclose(weight - SCALING * ours_b @ ours_a, peft_w, atol=1e-5)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["stable", "gd_scale", "unit", "weight_svd"])
def test_lora_ga_equals_peft(direction, scale):
    torch.manual_seed(1)
    model = _OneLayer()
    weight = model.proj.weight.detach().double().numpy()
    batches = [torch.randn(4, 12) for _ in range(3)]
    targets = [torch.randn(4, 10) for _ in range(3)]

    def train_step():
        for x, t in zip(batches, targets):
            ((model(x) - t) ** 2).mean().backward()

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="lora_ga",
                             lora_ga_config=peft_config.LoraGAConfig(direction=direction, scale=scale))
    peft_loraga.preprocess_loraga(model, config, train_step)
    peft_a, peft_b, peft_w = _peft_adapter(peft.get_peft_model(model, config))

    # dL/dW of mean((x W^T - t)^2), averaged over the batches, in numpy
    grad = sum(2 * ((x.double().numpy() @ weight.T - t.double().numpy()).T @ x.double().numpy()) / t.numel()
               for x, t in zip(batches, targets)) / len(batches)
    ours_a, ours_b = lora_ga.factors(grad, weight, RANK, SCALING, direction, scale, 16)
    # PEFT's randomized SVD (q = min(4r, 10) = 10 = the full rank) is exact to float32 rounding;
    # weight_svd reads sigma_1(W) from a rank-r randomized SVD, about 1e-3 off
    atol = 2e-3 if scale == "weight_svd" else 1e-4
    # A and B take different singular triplets, each defined up to its sign: align each
    ours_a, ours_b = _aligned(ours_a, peft_a, 1), _aligned(ours_b, peft_b, 0)
    np.testing.assert_allclose(ours_a, peft_a, atol=atol)
    np.testing.assert_allclose(ours_b, peft_b, atol=atol)
    np.testing.assert_allclose(weight - SCALING * ours_b @ ours_a, peft_w, atol=atol)


def test_eva_on_the_llama_twin_equals_peft(tmp_path):
    """Our EVA (exact PCA of the masked activations of the MindFormers network, in graph mode) and
    PEFT's (incremental PCA on the HF twin until converged) give the same ranks; the components
    agree to |cos| >= 0.9 (PEFT's PCA is approximate), the leading one to 0.99. PEFT's EVA adapter
    directory (its ranks in rank_pattern) loads here with PEFT's logits."""
    import copy  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import hf_twins  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.data_init import runner  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.naming import hf_module_name  # pylint: disable=import-outside-toplevel
    peft_eva = importlib.import_module("peft.tuners.lora.eva")
    pair = hf_twins.build_pair("llama", seed=0)
    rng = np.random.default_rng(3)
    ids = [rng.integers(3, 128, (4, 33)).astype(np.int32) for _ in range(4)]
    labels = [np.where(np.arange(33) < 5, -100, i).astype(np.int32) for i in ids]  # a 5-token prompt
    net = pair.mf_network(dict(pet_type="lora_ext", lora_rank=4, lora_alpha=8, init_lora_weights="eva",
                               eva_config={"rho": 2.0, "tau": 0.99}))
    net.set_train(True)
    report = runner.initialize(net.network, net, [(ms.Tensor(i), ms.Tensor(lab)) for i, lab in zip(ids, labels)],
                               ["input_ids", "labels"], 4, print)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights="eva", eva_config=peft_config.EvaConfig(rho=2.0, tau=0.99))
    model = peft.get_peft_model(copy.deepcopy(pair.hf_model), config)
    loader = [{"input_ids": torch.tensor(i[:, :32], dtype=torch.long), "attention_mask": torch.ones(4, 32, dtype=torch.long),
               "labels": torch.tensor(lab[:, :32], dtype=torch.long)} for i, lab in zip(ids, labels)]
    theirs = peft_eva.get_eva_state_dict(model, loader, show_progress_bar=False)
    for name, layer in net.network.data_init_layers().items():
        components = theirs[f"base_model.model.{hf_module_name(name)}"].double().numpy()
        assert len(components) == report.ranks[name], name  # the same redistribution
        cosine = np.abs(np.sum(layer.lora_A.asnumpy()[: len(components)] * components, axis=1))
        assert np.all(cosine >= 0.9) and cosine[0] >= 0.99, (name, cosine)

    # and an EVA adapter PEFT made (and "trained") loads here with PEFT's logits
    peft_eva.initialize_lora_eva_weights(model, eva_state_dict=theirs)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    directory = str(tmp_path / "peft_eva")
    model.save_pretrained(directory)
    from mindformers_lora_ext import adapter_files, peft_format  # pylint: disable=import-outside-toplevel
    config, _ = adapter_files.read_adapter_dir(directory)
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"]
    loaded = pair.mf_network(dict(peft_format.pet_config_from_peft(config), adapter_path=directory))
    np.testing.assert_allclose(pair.mf_logits(loaded), hf_twins.hf_logits(model.eval(), pair.input_ids), atol=1e-4,
                               rtol=0)
