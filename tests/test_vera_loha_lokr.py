"""VeRA, LoHa and LoKr (pet types vera, loha, lokr): config validation, layer math against
independent numpy formulas, gradients against finite differences, merge/unmerge, models built
through MindFormers, merged checkpoints, and adapter files in HF PEFT's layout."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from safetensors.numpy import load_file, save_file

from mindformers.models.build_model import build_model, build_network
from mindformers.modules.layers import Linear
from mindformers_lora_ext import adapter_files
from mindformers_lora_ext.config import (AdapterConfig, LohaConfig, LokrConfig, PetConfigError, VeraConfig,
                                         lokr_factorization)
from mindformers_lora_ext.merge import (merge_checkpoint, merge_safetensors_streaming, merged_values,
                                        save_mindspore_checkpoint)
from mindformers_lora_ext.adapter_files import read_config
from mindformers_lora_ext.peft_format import (from_peft_tensors, load_adapter, mf_param_name, peft_config_dict,
                                              peft_key, pet_config_from_peft, save_adapter)
from mindformers_lora_ext.tuners.base_layer import param_array
from mindformers_lora_ext.tuners.loha import LohaLinear
from mindformers_lora_ext.tuners.lokr import LokrLinear, lokr_shapes
from mindformers_lora_ext.tuners.vera import VeraLinear, vera_projections
from conftest import CallbackContext

RNG = np.random.default_rng(2024)
TOL = {"rtol": 1e-4, "atol": 1e-4}
TARGETS = ("wq", "wk", "wv", "wo")
HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
CLASSES = {"vera": VeraConfig, "loha": LohaConfig, "lokr": LokrConfig}
IDS = ms.Tensor(np.random.default_rng(0).integers(3, 128, (2, 32)), ms.int32)


# ------------------------------------------------------------------------------ numpy reference

def ref_delta(kind, arr, scaling, out_dim, in_dim):
    """dW [out, in] in float64, written independently of the tuners."""
    if kind == "vera":
        a, b = arr["vera_A"][:, :in_dim], arr["vera_B"][:out_dim]
        return np.diag(arr["vera_lambda_b"]) @ b @ np.diag(arr["vera_lambda_d"]) @ a
    if kind == "loha":
        return scaling * (arr["hada_w1_a"] @ arr["hada_w1_b"]) * (arr["hada_w2_a"] @ arr["hada_w2_b"])
    w1 = arr["lokr_w1"] if "lokr_w1" in arr else arr["lokr_w1_a"] @ arr["lokr_w1_b"]
    w2 = arr["lokr_w2"] if "lokr_w2" in arr else arr["lokr_w2_a"] @ arr["lokr_w2_b"]
    return scaling * np.kron(w1, w2)


def ref_forward(kind, x, arr, scaling):
    """y = x W^T + bias + update, the update in each method's own factored form."""
    w = arr["weight"]
    y = x @ w.T + arr.get("bias", 0.0)
    if kind == "vera":  # h = b * (B (d * (A x)))
        hidden = (x @ arr["vera_A"][:, :w.shape[1]].T) * arr["vera_lambda_d"]
        return y + (hidden @ arr["vera_B"][:w.shape[0]].T) * arr["vera_lambda_b"]
    return y + x @ ref_delta(kind, arr, scaling, *w.shape).T


# ------------------------------------------------------------------------------ layer helpers

def make_config(kind, **kw):
    kw.setdefault("target_modules", ["x"])
    return CLASSES[kind](**kw)


def vera_shared(rank, in_max, out_max, key=0):
    proj_a, proj_b = vera_projections(key, rank, in_max, out_max)
    return SimpleNamespace(in_max=in_max, out_max=out_max,
                           vera_A=Parameter(Tensor(proj_a), name="vera_A", requires_grad=False),
                           vera_B=Parameter(Tensor(proj_b), name="vera_B", requires_grad=False))


def make_layer(kind, base, **kw):
    """A layer of ``kind`` on ``base``; VeRA gets projections larger than the cell (sliced)."""
    if kind == "vera":
        kw.setdefault("r", 5)
        spec = make_config(kind, **kw).module_options("x")
        return VeraLinear(base, spec, vera_shared(spec.rank, 16, 14))
    if kind == "loha":
        kw.setdefault("r", 3)
        kw.setdefault("alpha", 6.0)
        return LohaLinear(base, make_config(kind, **kw).module_options("x"))
    kw.setdefault("r", 1)
    kw.setdefault("alpha", 3.0)
    return LokrLinear(base, make_config(kind, **kw).module_options("x"))


def randomize(layer, scale=1.0):
    """Random values for the weight, bias and adapter parameters; float64 arrays (W as [out, in]),
    the VeRA projections included."""
    arrays = {}
    for param in [layer.weight] + ([layer.bias] if layer.has_bias else []) + layer.adapter_parameters():
        value = (RNG.standard_normal(param.shape) * (1.0 if param is layer.weight else scale)).astype(np.float32)
        param.set_data(Tensor(value))
        arrays[param.name.rsplit(".", 1)[-1]] = value.astype(np.float64)
    if not layer.transpose_b:
        arrays["weight"] = arrays["weight"].T
    for name in ("vera_A", "vera_B"):
        if hasattr(layer, name):
            arrays[name] = getattr(layer, name).asnumpy().astype(np.float64)
    return arrays


BASES = {
    "dense": lambda: nn.Dense(12, 10, has_bias=True),
    "linear": lambda: Linear(12, 10, has_bias=False, compute_dtype=ms.float32),
    "linear_not_transposed": lambda: Linear(12, 10, has_bias=True, transpose_b=False, compute_dtype=ms.float32),
}
# LoKr variants on a 10 x 12 weight: 12 = 3 x 4, 10 = 2 x 5
LOKR_VARIANTS = {
    "whole": {"r": 4, "alpha": 2.0},                             # w1 [2, 3], w2 [5, 4]
    "factored_w2": {"r": 1, "alpha": 3.0},                       # w2 = [5, 1] @ [1, 4]
    "factored_both": {"r": 1, "alpha": 3.0, "decompose_both": True, "decompose_factor": 6},  # 12 = 6 x 2
}


# ------------------------------------------------------------------------------ configs

def test_defaults_follow_peft():
    vera = make_config("vera")
    assert (vera.r, vera.projection_prng_key, vera.save_projection, vera.vera_dropout, vera.d_initial,
            vera.init_weights) == (256, 0, True, 0.0, 0.1, True)
    assert vera.freeze_exclude == ["*.vera_lambda_b", "*.vera_lambda_d"]  # never the projections
    loha = make_config("loha")
    assert (loha.r, loha.alpha, loha.rank_dropout, loha.module_dropout, loha.init_weights) == (8, 8.0, 0.0, 0.0, True)
    lokr = make_config("lokr")
    assert (lokr.decompose_both, lokr.decompose_factor, lokr.rank_dropout_scale) == (False, -1, False)
    assert lokr.module_options("x").scaling == 1.0 and make_config("loha", r=4, alpha=8).module_options("x").scaling == 2.0


@pytest.mark.parametrize("kind,key,value,needle", [
    ("vera", "r", 0, "r = 0: expected an integer >= 1"),
    ("vera", "projection_prng_key", -1, "projection_prng_key = -1: expected an integer >= 0"),
    ("vera", "save_projection", "yes", "save_projection = 'yes': expected true or false"),
    ("vera", "vera_dropout", 1.0, "vera_dropout = 1.0: expected a number in [0, 1)"),
    ("vera", "d_initial", float("inf"), "d_initial = inf: expected a finite number"),
    ("vera", "init_weights", "gaussian", "init_weights = 'gaussian': expected true or false"),
    ("loha", "r", 2.5, "r = 2.5: expected an integer >= 1"),
    ("loha", "alpha", 0, "alpha = 0: expected a number in (0"),
    ("loha", "rank_dropout", -0.1, "rank_dropout = -0.1: expected a number in [0, 1)"),
    ("loha", "module_dropout", 1, "module_dropout = 1: expected a number in [0, 1)"),
    ("loha", "init_weights", "lycoris", "init_weights = 'lycoris': expected one of ['true', 'false']"),
    ("loha", "rank_pattern", {"wq": 0}, "rank_pattern['wq'] = 0: expected an integer >= 1"),
    ("loha", "alpha_pattern", {"(wq": 2}, "is not a valid regex"),
    ("lokr", "init_weights", "pissa", "init_weights = 'pissa': expected one of ['true', 'false', 'lycoris']"),
    ("lokr", "init_weights", 1, "init_weights = 1: expected one of"),
    ("lokr", "decompose_factor", 0, "decompose_factor = 0: expected -1 (split each dimension near its "
                                    "square root) or an integer >= 1"),
    ("lokr", "decompose_factor", -2, "decompose_factor = -2"),
    ("lokr", "decompose_both", 1, "decompose_both = 1: expected true or false"),
    ("lokr", "rank_dropout_scale", None, "rank_dropout_scale = None: expected true or false"),
    ("lokr", "target_modules", "(wq", "is not a valid regex"),
    ("lokr", "layers_to_transform", [1, 1], "expected a layer index >= 0 or a non-empty list of distinct"),
])
def test_bad_values_name_key_value_and_what_is_accepted(kind, key, value, needle):
    with pytest.raises(PetConfigError) as err:
        make_config(kind, **{key: value})
    assert f"model.model_config.pet_config.{key}" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("kind,key,needle", [
    ("vera", "vera_dropuot", "Did you mean 'vera_dropout'?"),
    ("lokr", "decompose_bot", "Did you mean 'decompose_both'?"),
    ("loha", "use_dora", "an option of the LoRA pet types (lora_ext, dora, rslora, pissa, olora) only"),
    ("vera", "init_lora_weights", "this method's initialisation key is 'init_weights'"),
    ("lokr", "lora_rank", "the rank is spelled 'r' here, as in HF PEFT"),
    ("loha", "lora_alpha", "alpha is spelled 'alpha' here"),
    ("vera", "lora_alpha", "VeRA has no alpha"),
    ("vera", "rank_pattern", "VeRA shares one rank across all targets"),
    ("loha", "lora_dropout", "see 'rank_dropout' and 'module_dropout'"),
    ("lokr", "exclude_modules", "HF PEFT's 'exclude_modules' is spelled 'exclude_layers' here"),
    ("loha", "bias", "only HF PEFT's bias='none' is supported"),
])
def test_unknown_keys_are_errors_with_a_hint(kind, key, needle):
    with pytest.raises(PetConfigError) as err:
        make_config(kind, **{key: 4})
    msg = str(err.value)
    assert f"model.model_config.pet_config.{key} is not an option of pet type '{kind}'" in msg
    assert needle in msg and "Accepted keys: " in msg


def test_null_cancels_a_key_inherited_from_another_pet_type():
    """MindFormers merges base_config dicts and cannot delete a key: null means not given."""
    cfg = make_config("vera", lora_rank=None, lora_alpha=None, r=16)
    assert cfg.r == 16 and "lora_rank" not in dict(cfg)
    with pytest.raises(PetConfigError, match="r = None: expected an integer >= 1"):
        make_config("vera", r=None)  # a key of this type set to null is still checked


def test_shared_targeting_keys():
    with pytest.raises(PetConfigError, match="target_modules is required"):
        LohaConfig()
    with pytest.raises(PetConfigError, match="layers_pattern = 'layers' only applies together"):
        make_config("lokr", layers_pattern="layers")
    cfg = make_config("loha", r=8, alpha=16, rank_pattern={"wq": 4}, alpha_pattern={r"layers\.1\..*": 2})
    q0, v1 = cfg.module_options("model.layers.0.attention.wq"), cfg.module_options("model.layers.1.attention.wv")
    assert (q0.rank, q0.alpha, q0.scaling) == (4, 16, 4.0) and (v1.rank, v1.alpha, v1.scaling) == (8, 2, 0.25)
    with pytest.raises(PetConfigError, match="does not match config class LokrConfig"):
        LokrConfig.from_pet_config({"pet_type": "loha", "target_modules": ["wq"]})


def _largest_divisor_at_most_sqrt(n):
    return max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)


def test_lokr_factorization_is_peft_s():
    # PEFT's documented examples
    assert lokr_factorization(256) == (16, 16)
    assert lokr_factorization(128) == (8, 16)
    assert lokr_factorization(127) == (1, 127)
    assert lokr_factorization(128, 4) == (4, 32)
    # a dividing factor is taken as is (first), a non-dividing one bounds the smaller side
    assert lokr_factorization(128, 32) == (32, 4)
    assert lokr_factorization(128, 6) == (4, 32)
    assert lokr_factorization(4096) == (64, 64) and lokr_factorization(11008) == (86, 128)
    for n in range(1, 600):  # -1: the divisor pair nearest the square root
        m = _largest_divisor_at_most_sqrt(n)
        assert lokr_factorization(n) == (m, n // m), n


def test_lokr_shapes_follow_peft_rules():
    spec = make_config("lokr", r=8).module_options("x")
    assert lokr_shapes(4096, 4096, spec) == {"lokr_w1": (64, 64), "lokr_w2_a": (64, 8), "lokr_w2_b": (8, 64)}
    both = make_config("lokr", r=8, decompose_both=True).module_options("x")
    assert lokr_shapes(4096, 11008, both) == {"lokr_w1_a": (86, 8), "lokr_w1_b": (8, 64),
                                              "lokr_w2_a": (128, 8), "lokr_w2_b": (8, 64)}
    big_r = make_config("lokr", r=32, decompose_both=True).module_options("x")  # r >= max/2: whole
    assert lokr_shapes(4096, 4096, big_r) == {"lokr_w1": (64, 64), "lokr_w2": (64, 64)}


def test_vera_projections_are_reproducible_kaiming_uniform():
    a, b = vera_projections(7, 64, 300, 200)
    a2, b2 = vera_projections(7, 64, 300, 200)
    assert a.dtype == np.float32 and a.shape == (64, 300) and b.shape == (200, 64)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert not np.array_equal(a, vera_projections(8, 64, 300, 200)[0])
    # PEFT's _kaiming_init: gain sqrt(2), uniform bound sqrt(6 / fan_in), fan_in = size(1)
    assert np.abs(a).max() <= math.sqrt(6 / 300) and a.std() == pytest.approx(math.sqrt(2 / 300), rel=0.05)
    assert np.abs(b).max() <= math.sqrt(6 / 64) and b.std() == pytest.approx(math.sqrt(2 / 64), rel=0.05)


# ------------------------------------------------------------------------------ layers

# LoHa on a 10 x 12 weight: r 3 materialises dW (9 * 22 >= 120), r 2 takes the rank-r^2 path
LOHA_VARIANTS = {"materialised": {"r": 3, "alpha": 6.0}, "factored": {"r": 2, "alpha": 3.0}}
LAYER_CASES = [("vera", {})] + [("loha", kw) for kw in LOHA_VARIANTS.values()] \
    + [("lokr", kw) for kw in LOKR_VARIANTS.values()]
LAYER_IDS = ["vera"] + [f"loha_{k}" for k in LOHA_VARIANTS] + [f"lokr_{k}" for k in LOKR_VARIANTS]


@pytest.mark.parametrize("kind,kw", LAYER_CASES, ids=LAYER_IDS)
@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_forward_matches_numpy(make, kind, kw):
    base = make()
    layer = make_layer(kind, base, **kw)
    assert layer.weight is base.weight  # adopted, not copied
    arr = randomize(layer)
    x = RNG.standard_normal((2, 5, 12)).astype(np.float32)  # 3-D input
    out = layer(Tensor(x)).asnumpy()
    assert out.shape == (2, 5, 10)
    np.testing.assert_allclose(out.reshape(-1, 10),
                               ref_forward(kind, x.reshape(-1, 12), arr, getattr(layer.spec, "scaling", 1.0)), **TOL)


def test_lokr_variant_shapes_on_the_test_layer():
    shapes = {name: {p.name.rsplit(".", 1)[-1]: p.shape for p in make_layer("lokr", nn.Dense(12, 10), **kw)
                     .adapter_parameters()} for name, kw in LOKR_VARIANTS.items()}
    assert shapes["whole"] == {"lokr_w1": (2, 3), "lokr_w2": (5, 4)}
    assert shapes["factored_w2"] == {"lokr_w1": (2, 3), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 4)}
    assert shapes["factored_both"] == {"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 6), "lokr_w2_a": (5, 1),
                                       "lokr_w2_b": (1, 2)}


@pytest.mark.parametrize("kind,kw", [("vera", {}), ("loha", {}), ("lokr", LOKR_VARIANTS["whole"]),
                                     ("lokr", dict(LOKR_VARIANTS["factored_both"], init_weights="lycoris"))],
                         ids=["vera", "loha", "lokr", "lokr_lycoris"])
def test_initial_output_equals_base(kind, kw):
    base = nn.Dense(12, 10)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    expected = base(x).asnumpy()
    layer = make_layer(kind, base, **kw)
    np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=1e-6, atol=1e-6)
    if kind == "vera":  # PEFT: lambda_b = 0, lambda_d = d_initial
        assert not layer.vera_lambda_b.asnumpy().any()
        np.testing.assert_allclose(layer.vera_lambda_d.asnumpy(), 0.1, rtol=1e-6)


@pytest.mark.parametrize("kind,kw", [("vera", {}), ("loha", {}), ("lokr", LOKR_VARIANTS["factored_w2"])],
                         ids=["vera", "loha", "lokr"])
def test_init_weights_false_starts_non_zero(kind, kw):
    base = nn.Dense(12, 10)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    layer = make_layer(kind, base, init_weights=False, **kw)
    assert not np.allclose(layer(x).asnumpy(), base(x).asnumpy(), atol=1e-4)
    if kind == "vera":  # PEFT: lambda_b = 1, lambda_d ~ N(0, 1)
        np.testing.assert_array_equal(layer.vera_lambda_b.asnumpy(), 1.0)


def test_random_init_statistics():
    loha = LohaLinear(nn.Dense(400, 300), make_config("loha", r=64).module_options("x"))
    w1a, w1b = loha.hada_w1_a.asnumpy(), loha.hada_w1_b.asnumpy()
    assert np.abs(w1a).max() <= 1 / 8 and w1a.std() == pytest.approx(1 / math.sqrt(3 * 64), rel=0.05)
    assert np.abs(w1b).max() <= 1 / 20 and w1b.std() == pytest.approx(1 / math.sqrt(3 * 400), rel=0.05)
    assert not loha.hada_w2_b.asnumpy().any() and loha.hada_w2_a.asnumpy().std() > 0
    lokr = LokrLinear(nn.Dense(400, 300), make_config("lokr", r=64).module_options("x"))  # 20x20 / 15x20
    assert not lokr.lokr_w1.asnumpy().any()
    assert np.abs(lokr.lokr_w2.asnumpy()).max() <= 1 / math.sqrt(20) and lokr.lokr_w2.asnumpy().std() > 0.05


def test_loha_paths():
    assert not make_layer("loha", nn.Dense(12, 10), **LOHA_VARIANTS["materialised"]).factored
    assert make_layer("loha", nn.Dense(12, 10), **LOHA_VARIANTS["factored"]).factored
    assert LohaLinear(nn.Dense(4096, 4096), make_config("loha", r=8).module_options("x")).factored


@pytest.mark.usefixtures("pynative")
@pytest.mark.parametrize("kind,kw", LAYER_CASES, ids=LAYER_IDS)
def test_gradients_match_finite_differences(kind, kw):
    """d(sum(g * y)) / d(each adapter tensor and x), against central differences of the numpy
    formula in float64."""
    base = nn.Dense(12, 10, has_bias=True)
    layer = make_layer(kind, base, **kw)
    arr = randomize(layer, scale=0.5)
    scaling = getattr(layer.spec, "scaling", 1.0)
    x = RNG.standard_normal((6, 12)).astype(np.float32)
    g = RNG.standard_normal((6, 10))
    params = layer.adapter_parameters()

    def loss(inp):
        return (layer(inp) * Tensor(g.astype(np.float32))).sum()

    _, (dx, grads) = ms.value_and_grad(loss, grad_position=0, weights=params)(Tensor(x))

    def f(values):
        return float((g * ref_forward(kind, values["x"], values, scaling)).sum())

    values = dict(arr, x=x.astype(np.float64))
    names = [p.name.rsplit(".", 1)[-1] for p in params] + ["x"]
    eps = 1e-6
    for name, grad in zip(names, list(grads) + [dx]):
        expected = np.zeros_like(values[name])
        for index in np.ndindex(values[name].shape):
            plus, minus = dict(values), dict(values)
            plus[name], minus[name] = values[name].copy(), values[name].copy()
            plus[name][index] += eps
            minus[name][index] -= eps
            expected[index] = (f(plus) - f(minus)) / (2 * eps)
        np.testing.assert_allclose(grad.asnumpy(), expected, rtol=1e-3, atol=1e-3, err_msg=name)
    if kind == "vera":
        assert not layer.vera_A.requires_grad and not layer.vera_B.requires_grad


@pytest.mark.parametrize("kind,kw", LAYER_CASES, ids=LAYER_IDS)
@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_merge_then_unmerge(make, kind, kw):
    layer = make_layer(kind, make(), **kw)
    arr = randomize(layer)
    x = Tensor(RNG.standard_normal((6, 12)).astype(np.float32))
    before, weight0 = layer(x).asnumpy(), layer.weight.asnumpy().copy()
    layer.merge()
    merged = layer.weight.asnumpy()
    expected = arr["weight"] + ref_delta(kind, arr, getattr(layer.spec, "scaling", 1.0), 10, 12)
    np.testing.assert_allclose(merged if layer.transpose_b else merged.T, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    # the graph compiled before merge() gives the same output (the gate is a Parameter) ...
    np.testing.assert_allclose(layer(x).asnumpy(), before, rtol=1e-5, atol=1e-4)
    # ... and a graph compiled after it skips the adapter altogether
    fresh = make_layer(kind, make(), **kw)
    state = {p.name: p.asnumpy() for p in layer.get_parameters()}
    for param in fresh.get_parameters():
        param.set_data(Tensor(state[param.name]))
    fresh.merged = True
    np.testing.assert_allclose(fresh(x).asnumpy(), before, rtol=1e-5, atol=1e-4)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), weight0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x).asnumpy(), before, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def _train_outputs(layer, x, calls):
    layer.set_train(True)  # before the first call: MindSpore's default phase is already 'train'
    return [layer(x).asnumpy().astype(np.float64) for _ in range(calls)]


@pytest.mark.parametrize("kind,scaled", [("loha", True), ("lokr", False), ("lokr_scaled", True)])
def test_rank_dropout_drops_output_rows_of_the_update(kind, scaled):
    base = nn.Dense(12, 16, has_bias=False)
    extra = {"rank_dropout_scale": True} if kind == "lokr_scaled" else {}
    layer = make_layer(kind.split("_")[0], base, rank_dropout=0.5, **extra)
    randomize(layer)
    x = Tensor(RNG.standard_normal((8, 12)).astype(np.float32))
    plain = x.asnumpy().astype(np.float64) @ base.weight.asnumpy().astype(np.float64).T
    full = layer.delta_weight_array()
    update = x.asnumpy().astype(np.float64) @ full.T
    seen_kept = set()
    for out in _train_outputs(layer, x, 6):
        delta = out - plain
        kept = [j for j in range(16) if np.abs(delta[:, j]).max() > 1e-4]
        assert 0 < len(kept) < 16  # p = 0.5 over 16 rows
        factor = 16 / len(kept) if scaled else 1.0  # PEFT rescales by 1 / mean(mask)
        np.testing.assert_allclose(delta[:, kept], factor * update[:, kept], rtol=1e-4, atol=1e-4)
        seen_kept.add(tuple(kept))
    assert len(seen_kept) > 1  # a new mask each call
    layer.set_train(False)
    np.testing.assert_allclose(layer(x).asnumpy(), plain + update, rtol=1e-4, atol=1e-4)  # eval: exact


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_module_dropout_skips_the_whole_update(kind):
    base = nn.Dense(12, 10, has_bias=False)
    layer = make_layer(kind, base, module_dropout=0.5)
    randomize(layer)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    plain = x.asnumpy().astype(np.float64) @ base.weight.asnumpy().astype(np.float64).T
    adapted = plain + x.asnumpy().astype(np.float64) @ layer.delta_weight_array().T
    kinds = []
    for out in _train_outputs(layer, x, 16):
        if np.allclose(out, plain, rtol=1e-5, atol=1e-5):
            kinds.append("skipped")
        else:
            np.testing.assert_allclose(out, adapted, rtol=1e-4, atol=1e-4)  # no rescaling, as PEFT
            kinds.append("applied")
    assert set(kinds) == {"skipped", "applied"}


def test_vera_dropout_only_on_the_adapter_input():
    base = nn.Dense(12, 10, has_bias=False)
    layer = make_layer("vera", base, vera_dropout=0.5)
    arr = randomize(layer)
    x = RNG.standard_normal((16, 12)).astype(np.float32)
    layer.set_train(False)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), ref_forward("vera", x, arr, 1.0), **TOL)
    out = _train_outputs(layer, Tensor(x), 1)[0]
    assert not np.allclose(out, ref_forward("vera", x, arr, 1.0), atol=1e-3)


# ------------------------------------------------------------------------------ models

PETS = {
    "vera": {"pet_type": "vera", "r": 16},
    "loha": {"pet_type": "loha", "r": 4, "alpha": 8},
    "lokr": {"pet_type": "lokr", "r": 2, "alpha": 4, "decompose_both": True},
}


def _set_pet(tiny_config, **pet):
    pc = tiny_config.model.model_config.pet_config
    pc.clear()
    pc.update(dict({"target_modules": ".*wq|.*wk|.*wv|.*wo"}, **pet))
    return pc


def _logits(net):
    net.set_train(False)
    return net(IDS)[0].asnumpy()


def _adapted(tiny_config, kind, seed=7, **extra):
    _set_pet(tiny_config, **dict(PETS[kind], **extra))
    ms.set_seed(0)
    net = build_network(tiny_config.model)
    rng = np.random.default_rng(seed)
    for p in net.network.saved_parameters():  # a trained-looking adapter
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    return net


@pytest.mark.parametrize("kind,per_target", [
    ("vera", {"vera_lambda_b": (64,), "vera_lambda_d": (16,)}),
    ("loha", {"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64)}),
    ("lokr", {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
])
def test_trainable_names_and_counts(tiny_config, kind, per_target):
    _set_pet(tiny_config, **PETS[kind])
    net = build_network(tiny_config.model)
    assert type(net.network).__name__ == {"vera": "VeraModel", "loha": "LohaModel", "lokr": "LokrModel"}[kind]
    shapes = {p.name: p.shape for p in net.trainable_params()}
    expected = {f"model.layers.{i}.attention.{t}.{attr}": shape
                for i in range(2) for t in TARGETS for attr, shape in per_target.items()}
    assert shapes == expected
    frozen = {p.name for p in net.get_parameters() if not p.requires_grad}
    assert "model.layers.0.attention.wq.weight" in frozen and "model.layers.0.attention.wq.adapter_active" in frozen
    if kind == "vera":  # r + out per target; the shared projections are frozen
        assert sum(p.size for p in net.trainable_params()) == 2 * 4 * (16 + 64)
        assert {"vera_A", "vera_B"} <= frozen


def test_vera_shares_one_projection_pair_sized_to_the_largest_target(tiny_config):
    _set_pet(tiny_config, pet_type="vera", r=16, projection_prng_key=3, target_modules="all-linear")
    net = build_network(tiny_config.model)
    layers = list(net.network._adapter_layers.values())  # pylint: disable=protected-access
    assert len(layers) == 2 * 7  # wq wk wv wo w1 w2 w3; not lm_head
    params = [p for p in net.get_parameters() if p.name in ("vera_A", "vera_B")]
    assert [p.name for p in params] == ["vera_A", "vera_B"]  # once each
    assert all(layer.vera_A is params[0] and layer.vera_B is params[1] for layer in layers)
    proj_a, proj_b = vera_projections(3, 16, 176, 176)  # in_max from w2 (176 -> 64), out_max from w1/w3
    np.testing.assert_array_equal(params[0].asnumpy(), proj_a)
    np.testing.assert_array_equal(params[1].asnumpy(), proj_b)
    assert sum(p.size for p in net.trainable_params()) == sum(16 + layer.out_channels for layer in layers)


@pytest.mark.parametrize("pet", [PETS["vera"], PETS["loha"], PETS["lokr"],
                                 dict(PETS["lokr"], init_weights="lycoris")],
                         ids=["vera", "loha", "lokr", "lokr_lycoris"])
def test_base_checkpoint_loaded_after_wrapping_gives_base_logits(tiny_config, pet):
    """The trainer's flow with load_checkpoint: build under no_init_parameters, wrap, load the
    base checkpoint, materialise. The adapter starts at dW = 0; VeRA's projections come out
    of projection_prng_key whatever the global seed."""
    from mindspore.nn.utils import no_init_parameters
    pc = tiny_config.model.model_config.pet_config
    del tiny_config.model.model_config["pet_config"]
    ms.set_seed(0)
    base = build_model(tiny_config.model)
    checkpoint = {p.name: ms.Parameter(p.data.copy(), name=p.name) for p in base.get_parameters()}
    expected = _logits(base)
    tiny_config.model.model_config.pet_config = pc
    _set_pet(tiny_config, **pet)
    ms.set_seed(1)
    with no_init_parameters():
        adapted = build_network(tiny_config.model)
    not_loaded, _ = ms.load_param_into_net(adapted, checkpoint)
    assert not_loaded and all(n.rsplit(".", 1)[-1] in ("adapter_active", "vera_A", "vera_B") or
                              n.rsplit(".", 1)[-1].startswith(("hada_", "lokr_", "vera_lambda")) for n in not_loaded)
    adapted.init_parameters_data()
    np.testing.assert_allclose(_logits(adapted), expected, rtol=1e-5, atol=1e-5)
    if pet["pet_type"] == "vera":
        np.testing.assert_array_equal(adapted.parameters_dict()["vera_A"].asnumpy(),
                                      vera_projections(0, 16, 64, 64)[0])


@pytest.mark.parametrize("kind", ["vera", "loha", "lokr"])
def test_model_merge_and_unmerge(tiny_config, kind):
    net = _adapted(tiny_config, kind)
    expected = _logits(net)
    weight = net.parameters_dict()["model.layers.1.attention.wv.weight"].asnumpy().copy()
    net.network.merge()
    assert not np.allclose(net.parameters_dict()["model.layers.1.attention.wv.weight"].asnumpy(), weight)
    np.testing.assert_allclose(_logits(net), expected, rtol=1e-4, atol=1e-4)
    net.network.unmerge()
    np.testing.assert_allclose(net.parameters_dict()["model.layers.1.attention.wv.weight"].asnumpy(), weight,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_logits(net), expected, rtol=1e-4, atol=1e-4)


def _plain_model(tiny_config):
    del tiny_config.model.model_config["pet_config"]
    return build_model(tiny_config.model)


@pytest.mark.parametrize("kind,fmt", [("vera", "ckpt"), ("loha", "ckpt"), ("lokr", "ckpt"), ("vera", "safetensors")])
def test_merged_checkpoint_loads_into_the_plain_base_model(tiny_config, tmp_path, kind, fmt):
    net = _adapted(tiny_config, kind)
    expected = _logits(net)
    src, out = tmp_path / f"adapted.{fmt}", tmp_path / f"merged.{fmt}"
    ms.save_checkpoint(net, str(src), format=fmt)
    counts = merge_checkpoint(str(src), str(out), net.network.config.pet_config)
    assert counts["merged_cells"] == 2 * 4
    base = _plain_model(tiny_config)
    not_loaded, unused = ms.load_param_into_net(base, ms.load_checkpoint(str(out), format=fmt))
    assert not_loaded == [] and unused == []  # exactly the base model's parameters
    np.testing.assert_allclose(_logits(base), expected, rtol=1e-4, atol=1e-4)


def test_vera_merge_regenerates_projections_that_were_not_saved(tiny_config):
    net = _adapted(tiny_config, "vera", save_projection=False)
    params = {p.name: param_array(p) for p in net.get_parameters()}
    adapter = net.network.adapter_state_dict()
    assert "vera_A" not in adapter and "vera_B" not in adapter
    config = net.network.config.pet_config
    regenerated = merged_values(params.get, adapter, config, "test")
    stored = merged_values(params.get, dict(adapter, vera_A=params["vera_A"], vera_B=params["vera_B"]),
                           config, "test")
    assert sorted(regenerated) == sorted(stored) == sorted(f"model.layers.{i}.attention.{t}.weight"
                                                           for i in range(2) for t in TARGETS)
    for name, value in stored.items():
        np.testing.assert_array_equal(regenerated[name], value)


def test_merge_checks_the_config_against_the_tensors(tiny_config):
    net = _adapted(tiny_config, "lokr")
    params = {p.name: param_array(p) for p in net.get_parameters()}
    wrong = LokrConfig(target_modules=".*wq|.*wk|.*wv|.*wo", r=2, alpha=4)  # decompose_both missing
    with pytest.raises(ValueError, match=r"model.layers.0.attention.wk: adapter tensors .* do not match what "
                                         r"the pet_config gives .* wrong config for this adapter\?"):
        merged_values(params.get, net.network.adapter_state_dict(), wrong, "test")
    with pytest.raises(ValueError, match=r"no '<cell>.hada_w1_a' \(loha\) adapter tensor found"):
        merged_values(params.get, {}, LohaConfig(target_modules=["wq"]), "test")


def test_merge_of_an_unknown_method_is_not_implemented():
    class ToyConfig(AdapterConfig):
        pet_type_name = "toy_method"

    with pytest.raises(NotImplementedError, match=r"pet_type 'toy_method' \(ToyConfig\) into base weights is "
                                                  r"not implemented"):
        merged_values(lambda name: None, {}, ToyConfig(target_modules=["wq"]), "test")


# ------------------------------------------------------------------------------ adapter files

def _expected_peft_tensors(kind, extra=None):
    """PEFT key -> shape for the PETS adapters of the tiny model (hidden 64)."""
    per_target = {
        "vera": {"vera_lambda_b": (64,), "vera_lambda_d": (16,)},
        "loha": {"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64)},
        "lokr": {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
    }[kind]
    shapes = {f"base_model.model.model.layers.{i}.self_attn.{HF[t]}.{attr}": shape
              for i in range(2) for t in TARGETS for attr, shape in per_target.items()}
    shapes.update(extra or {})
    return shapes


@pytest.mark.parametrize("kind,extra,projections", [
    ("vera", {}, True), ("vera", {"save_projection": False}, False), ("loha", {}, False), ("lokr", {}, False)],
    ids=["vera", "vera_no_projection", "loha", "lokr"])
def test_adapter_files_use_peft_keys_shapes_and_config(tiny_config, tmp_path, kind, extra, projections):
    net = _adapted(tiny_config, kind, **extra)
    save_adapter(net.network, str(tmp_path / "a"))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    expected = _expected_peft_tensors(kind, {"base_model.vera_A": (16, 64), "base_model.vera_B": (64, 16)}
                                      if projections else None)
    assert {k: v.shape for k, v in tensors.items()} == expected
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert not any(k.startswith("mindformers_") for k in config)  # ours are in the sidecar
    assert config["peft_type"] == kind.upper() and read_config(str(tmp_path / "a"))["mindformers_pet_type"] == kind
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"
    fields = {
        "vera": {"r": 16, "projection_prng_key": 0, "save_projection": projections, "vera_dropout": 0.0,
                 "d_initial": 0.1, "init_weights": True, "bias": "none", "fan_in_fan_out": False},
        "loha": {"r": 4, "alpha": 8.0, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
                 "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}},
        "lokr": {"r": 2, "alpha": 4.0, "decompose_both": True, "decompose_factor": -1,
                 "rank_dropout_scale": False, "init_weights": True},
    }[kind]
    assert {k: config[k] for k in fields} == fields


@pytest.mark.parametrize("kind,extra", [("vera", {}), ("vera", {"save_projection": False}), ("loha", {}),
                                        ("lokr", {"init_weights": "lycoris"})],
                         ids=["vera", "vera_no_projection", "loha", "lokr"])
def test_round_trip_is_bit_exact(tiny_config, tmp_path, kind, extra):
    net = _adapted(tiny_config, kind, **extra)
    before = net.network.adapter_state_dict()
    save_adapter(net.network, str(tmp_path / "a"))
    ms.set_seed(0)
    other = build_network(tiny_config.model)  # same base weights, fresh adapter values
    name = next(n for n in before if n.startswith("model.layers.0.attention.wq."))
    assert not np.array_equal(other.network.adapter_state_dict()[name], before[name])
    load_adapter(other.network, str(tmp_path / "a"))
    after = other.network.adapter_state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key
    np.testing.assert_array_equal(_logits(other), _logits(net))
    # and through pet_config.adapter_path, with the pet_config read back from adapter_config.json
    pet = pet_config_from_peft(read_config(str(tmp_path / "a")))
    _set_pet(tiny_config, **dict(pet, adapter_path=str(tmp_path / "a")))
    ms.set_seed(0)
    np.testing.assert_array_equal(_logits(build_network(tiny_config.model)), _logits(net))


@pytest.mark.parametrize("kind", ["vera", "loha", "lokr"])
def test_config_dict_round_trip(tiny_config, kind):
    pet = dict(PETS[kind], layers_to_transform=[1], modules_to_save=["lm_head"])
    if kind != "vera":
        pet.update(rank_pattern={"wq": 3}, alpha_pattern={"wv": 3})
    _set_pet(tiny_config, **pet)
    net = build_network(tiny_config.model)
    config = net.network.config.pet_config
    data = peft_config_dict(config, net.network.adapter_names)
    if kind != "vera":
        assert data["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 3}
        assert data["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 3}
    assert (data["layers_to_transform"], data["modules_to_save"]) == ([1], ["lm_head"])
    back = CLASSES[kind].from_pet_config(pet_config_from_peft(data))
    for name in net.network.adapter_names:
        assert back.module_options(name) == config.module_options(name)
    assert {k: v for k, v in dict(back).items() if k not in ("rank_pattern", "alpha_pattern", "target_modules")} \
        == {k: v for k, v in dict(config).items() if k not in ("rank_pattern", "alpha_pattern", "target_modules")}


def test_peft_names_both_ways():
    assert peft_key("vera_A") == "base_model.vera_A" and mf_param_name("base_model.vera_B") == "vera_B"
    for name, key in (("model.layers.0.attention.wq.vera_lambda_b",
                       "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b"),
                      ("model.layers.1.feed_forward.w2.hada_w2_a",
                       "base_model.model.model.layers.1.mlp.down_proj.hada_w2_a"),
                      ("model.layers.0.attention.wo.lokr_w1", "base_model.model.model.layers.0.self_attn.o_proj.lokr_w1"),
                      ("model.layers.0.attention.wo.lokr_w1_a",
                       "base_model.model.model.layers.0.self_attn.o_proj.lokr_w1_a")):
        assert peft_key(name) == key and mf_param_name(key) == name


def _write_peft_dir(path, config, tensors):
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def _hand_written(kind, rng):
    """An HF PEFT adapter dir's config and tensors (q_proj, v_proj of 2 layers, hidden 64) written
    with numpy only, and the dW per MindFormers weight, from PEFT's documented formulas."""
    tensors, deltas = {}, {}
    if kind == "vera":
        proj_a = rng.uniform(-0.3, 0.3, (32, 64)).astype(np.float32)
        proj_b = rng.uniform(-0.3, 0.3, (64, 32)).astype(np.float32)
        tensors.update({"base_model.vera_A": proj_a, "base_model.vera_B": proj_b})
        config = {"peft_type": "VERA", "r": 32, "target_modules": ["q_proj", "v_proj"], "d_initial": 0.1,
                  "projection_prng_key": 0, "save_projection": True, "vera_dropout": 0.0, "bias": "none"}
    elif kind == "loha":
        config = {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                  "rank_dropout": 0.0, "module_dropout": 0.0}
    else:
        config = {"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                  "decompose_both": False, "decompose_factor": -1}
    for i in range(2):
        for hf, mf in (("q_proj", "wq"), ("v_proj", "wv")):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{hf}"
            if kind == "vera":
                b = rng.standard_normal(64).astype(np.float32)
                d = rng.standard_normal(32).astype(np.float32)
                tensors.update({f"{prefix}.vera_lambda_b": b, f"{prefix}.vera_lambda_d": d})
                delta = (b[:, None] * proj_b.astype(np.float64)) @ (d[:, None] * proj_a.astype(np.float64))
            elif kind == "loha":
                parts = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in
                         (("hada_w1_a", (64, 4)), ("hada_w1_b", (4, 64)), ("hada_w2_a", (64, 4)),
                          ("hada_w2_b", (4, 64)))}
                tensors.update({f"{prefix}.{k}": v for k, v in parts.items()})
                p64 = {k: v.astype(np.float64) for k, v in parts.items()}
                delta = 2.0 * (p64["hada_w1_a"] @ p64["hada_w1_b"]) * (p64["hada_w2_a"] @ p64["hada_w2_b"])
            else:  # 64 = 8 x 8; r 4 >= 8 / 2: both whole
                w1 = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
                w2 = (rng.standard_normal((8, 8)) * 0.3).astype(np.float32)
                tensors.update({f"{prefix}.lokr_w1": w1, f"{prefix}.lokr_w2": w2})
                delta = 2.0 * np.kron(w1.astype(np.float64), w2.astype(np.float64))
            deltas[f"model.layers.{i}.attention.{mf}.weight"] = delta
    return config, tensors, deltas


@pytest.mark.parametrize("kind", ["vera", "loha", "lokr"])
def test_hand_written_peft_adapter_gives_the_expected_forward(tiny_config, tmp_path, kind):
    """A PEFT-format adapter written with numpy + safetensors only (not our writer, no
    mindformers_pet_type) must act like W + dW of PEFT's formula on the plain base model; the CLI
    merge of it into a base file gives the same model."""
    config, tensors, deltas = _hand_written(kind, np.random.default_rng(5))
    _write_peft_dir(str(tmp_path / "peft"), config, tensors)
    _set_pet(tiny_config, **dict(pet_config_from_peft(config), adapter_path=str(tmp_path / "peft")))
    ms.set_seed(0)
    adapted = build_network(tiny_config.model)
    base = _plain_model(tiny_config)
    weights = {p.name: p for p in adapted.get_parameters()}
    base_items = [(p.name, param_array(weights[p.name])) for p in base.get_parameters()]
    for p in base.get_parameters():  # same base weights, then the adapter folded in by numpy
        value = weights[p.name].asnumpy().astype(np.float64)
        p.set_data(ms.Tensor((value + deltas.get(p.name, 0.0)).astype(np.float32)))
    expected = _logits(base)
    np.testing.assert_allclose(_logits(adapted), expected, rtol=1e-4, atol=1e-4)
    # streaming merge of the same directory into a plain base checkpoint
    save_mindspore_checkpoint(base_items, str(tmp_path / "base.safetensors"))
    _, read = adapter_files.read_adapter_dir(str(tmp_path / "peft"))
    pet = CLASSES[kind].from_pet_config(pet_config_from_peft(config))
    counts = merge_safetensors_streaming(str(tmp_path / "base.safetensors"), str(tmp_path / "merged.safetensors"),
                                         from_peft_tensors(read), pet)
    assert counts["merged_cells"] == 4
    ms.load_param_into_net(base, ms.load_checkpoint(str(tmp_path / "merged.safetensors"), format="safetensors"))
    np.testing.assert_allclose(_logits(base), expected, rtol=1e-4, atol=1e-4)


def test_peft_vera_without_projections_is_refused(tiny_config, tmp_path):
    config, tensors, _ = _hand_written("vera", np.random.default_rng(1))
    config["save_projection"] = False
    with pytest.raises(ValueError, match="HF PEFT VeRA adapter saved with save_projection = false"):
        pet_config_from_peft(config)
    del tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    _write_peft_dir(str(tmp_path / "peft"), config, tensors)
    _set_pet(tiny_config, pet_type="vera", r=32, target_modules=["wq", "wv"], save_projection=False)
    net = build_network(tiny_config.model)
    with pytest.raises(adapter_files.AdapterFileError, match="an HF PEFT VeRA adapter without its projections"):
        load_adapter(net.network, str(tmp_path / "peft"))


@pytest.mark.parametrize("kind", ["vera", "loha", "lokr"])
def test_adapter_checkpoint_saves_peft_dirs_and_merges(tiny_config, tmp_path, kind):
    from mindformers_lora_ext.callbacks import AdapterCheckpoint
    net = _adapted(tiny_config, kind)
    expected = _logits(net)
    cb = AdapterCheckpoint(save_steps=2, output_dir=str(tmp_path / "adapters"), merge_on_end=True)
    cb.on_train_begin(CallbackContext(net, 0))
    for step in (1, 2, 3):
        cb.on_train_step_end(CallbackContext(net, step))
    cb.on_train_end(CallbackContext(net, 3))
    root = str(tmp_path / "adapters")
    assert [n for n, _ in adapter_files.step_dirs(root)] == [2, 3]
    config, tensors = adapter_files.read_adapter_dir(adapter_files.resolve_adapter_dir(root))
    assert config["peft_type"] == kind.upper()
    assert {k: v.shape for k, v in tensors.items()} == _expected_peft_tensors(
        kind, {"base_model.vera_A": (16, 64), "base_model.vera_B": (64, 16)} if kind == "vera" else None)
    merged = load_file(os.path.join(root, "merged", "model.safetensors"))
    assert not any(k.rsplit(".", 1)[-1] in ("vera_A", "vera_B", "adapter_active") or "hada_" in k or "lokr_" in k
                   or "vera_lambda" in k for k in merged)
    base = _plain_model(tiny_config)
    not_loaded, unused = ms.load_param_into_net(base, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in merged.items()})
    assert not_loaded == [] and unused == []
    np.testing.assert_allclose(_logits(base), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.e2e
def test_vera_run_through_run_mindformer_saves_peft_dirs_and_merges(tmp_path):
    """32 VeRA steps through the run_mindformer.py path on a base checkpoint (loaded after
    wrapping), with AdapterCheckpoint: the projections stay frozen and are saved as PEFT's
    base_model.vera_A / vera_B; merge_on_end equals the adapter's forward."""
    import yaml
    from conftest import ROOT, RUN_MINDFORMER, run_fresh
    from mindformers.tools.register import MindFormerConfig
    from mindformers.tools.register.config import DictConfig
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    data = write_tiny_dataset(str(tmp_path / "train.mindrecord"), num_rows=64, seq_length=32, vocab_size=128)
    vera_yaml = os.path.join(ROOT, "configs", "tiny", "vera.yaml")
    cfg = MindFormerConfig(vera_yaml)
    pet = dict(cfg.model.model_config.pet_config)
    del cfg.model.model_config["pet_config"]
    ms.set_seed(42)
    ms.save_checkpoint(build_model(cfg.model), str(tmp_path / "base.ckpt"))
    run = {"base_config": [vera_yaml], "load_checkpoint": str(tmp_path / "base.ckpt"),
           "callbacks": [{"type": "MFLossMonitor"},
                         {"type": "AdapterCheckpoint", "output_dir": str(tmp_path / "adapters"), "save_steps": 16,
                          "merge_on_end": True},
                         {"type": "TrainingSummary", "check_frozen": True,
                          "summary_file": str(tmp_path / "summary.json")}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    proc = run_fresh([RUN_MINDFORMER, "--config", str(tmp_path / "run.yaml"), "--train_dataset_dir", data,
                      "--output_dir", str(tmp_path / "out")], cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 32 and sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.03, losses
    assert summary["changed_frozen"] == [] and sorted(summary["changed_trainable"]) == sorted(summary["trainable_names"])
    root = str(tmp_path / "adapters")
    assert [n for n, _ in adapter_files.step_dirs(root)] == [16, 32]
    config, tensors = adapter_files.read_adapter_dir(os.path.join(root, "step_32"))
    assert config["peft_type"] == "VERA" and config["r"] == 256 and config["save_projection"] is True
    proj_a, proj_b = vera_projections(0, 256, 64, 64)
    np.testing.assert_array_equal(tensors["base_model.vera_A"], proj_a)  # frozen through training
    np.testing.assert_array_equal(tensors["base_model.vera_B"], proj_b)
    assert len(tensors) == 2 * 4 * 2 + 2
    # the merged network equals the base checkpoint + the saved adapter
    plain = build_model(cfg.model)
    merged = load_file(os.path.join(root, "merged", "model.safetensors"))
    not_loaded, unused = ms.load_param_into_net(plain, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in merged.items()})
    assert not_loaded == [] and unused == []
    cfg.model.model_config.pet_config = DictConfig(**dict(pet, adapter_path=root))
    adapted = build_network(cfg.model)
    ms.load_param_into_net(adapted, ms.load_checkpoint(str(tmp_path / "base.ckpt")))
    np.testing.assert_allclose(_logits(plain), _logits(adapted), rtol=1e-4, atol=1e-4)
