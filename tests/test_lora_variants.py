"""LoraLinear and its variants (rsLoRA, DoRA, lora_bias, init schemes) against numpy formulas."""
import os
import shutil

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from mindformers.modules.layers import Linear
from mindformers_lora_ext.config import LoraExtConfig
from mindformers_lora_ext.kernels import PhiloxDropout
from mindformers_lora_ext.tuners.lora import LoraLinear, merged_weight
from conftest import randomize_layer

RNG = np.random.default_rng(1234)
HAVE_CXX = shutil.which(os.environ.get("CXX") or "g++") is not None
TOL = {"rtol": 1e-4, "atol": 1e-4}

BASES = {
    "dense": lambda: nn.Dense(12, 10, has_bias=True),
    "linear": lambda: Linear(12, 10, has_bias=False, compute_dtype=ms.float32),
    "linear_not_transposed": lambda: Linear(12, 10, has_bias=True, transpose_b=False,
                                            compute_dtype=ms.float32),
}
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "fused": {"use_fused_kernel": True, "lora_bias": True},  # the CPU kernel (composition if [in, out])
}


def spec(**kw):
    kw.setdefault("lora_rank", 3)
    kw.setdefault("lora_alpha", 6.0)
    return LoraExtConfig(target_modules=["x"], **kw).module_options("x")


def randomize(layer):
    """Random values for every parameter; returns float64 arrays (W as [out, in])."""
    return randomize_layer(layer, RNG)


def reference(x, arr, s, dora):
    """y = x W'^T + bias, W' = W + s B A (DoRA: m * V / ||V||_row with V = W + s B A)."""
    adapted = arr["weight"] + s * arr["lora_B"] @ arr["lora_A"]
    if dora:
        adapted = adapted * (arr["lora_magnitude_vector"] / np.linalg.norm(adapted, axis=1))[:, None]
    y = x @ adapted.T + s * arr.get("lora_B_bias", 0.0)
    return y + arr.get("bias", 0.0)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS.keys())
@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_forward_matches_numpy(make, variant):
    base = make()
    layer = LoraLinear(base, spec(**VARIANTS[variant]))
    assert layer.weight is base.weight  # adopted, not copied
    assert layer.fused == (variant == "fused" and layer.transpose_b)
    arr = randomize(layer)
    x = RNG.standard_normal((2, 5, 12)).astype(np.float32)  # 3-D input
    out = layer(Tensor(x)).asnumpy()
    s = 6.0 / np.sqrt(3) if variant == "rslora" else 2.0
    if "lora_B_bias" in arr:
        arr["lora_B_bias"] = layer.lora_B_bias.asnumpy().astype(np.float64)
    assert layer.scaling == pytest.approx(s)
    assert out.shape == (2, 5, 10)
    np.testing.assert_allclose(out.reshape(-1, 10), reference(x.reshape(-1, 12), arr, s, variant == "dora"),
                               **TOL)


@pytest.mark.parametrize("init", [True, "gaussian", "pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_initial_output_equals_base(init, use_dora):
    base = nn.Dense(12, 10)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    expected, base_weight = base(x).asnumpy(), base.weight.asnumpy().copy()
    layer = LoraLinear(base, spec(init_lora_weights=init, use_dora=use_dora))
    np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    if use_dora:  # magnitude starts at the row norms of W + s B A (= the original W), as PEFT
        np.testing.assert_allclose(layer.lora_magnitude_vector.asnumpy(),
                                   np.linalg.norm(base_weight, axis=1), rtol=1e-5)


def test_init_false_starts_non_zero():
    base = nn.Dense(12, 10)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    layer = LoraLinear(base, spec(lora_rank=4, init_lora_weights=False))
    b = layer.lora_B.asnumpy()
    assert np.abs(b).max() <= 1 / np.sqrt(4) and b.std() > 0.1  # kaiming-uniform, fan_in = r
    assert not np.allclose(layer(x).asnumpy(), base(x).asnumpy(), atol=1e-3)


def test_random_init_statistics():
    kaiming = LoraLinear(nn.Dense(400, 10), spec(lora_rank=64))
    a = kaiming.lora_A.asnumpy()
    assert np.abs(a).max() <= 1 / np.sqrt(400) and a.std() == pytest.approx(1 / np.sqrt(3 * 400), rel=0.05)
    assert not kaiming.lora_B.asnumpy().any()
    gauss = LoraLinear(nn.Dense(400, 10), spec(lora_rank=16, init_lora_weights="gaussian"))
    assert gauss.lora_A.asnumpy().std() == pytest.approx(1 / 16, rel=0.05)


def _weight_with_spectrum(out, inp, singular):
    u, _ = np.linalg.qr(RNG.standard_normal((out, out)))
    v, _ = np.linalg.qr(RNG.standard_normal((inp, inp)))
    return (u[:, :len(singular)] * singular) @ v[:, :len(singular)].T


@pytest.mark.parametrize("init,tol", [("pissa", 1e-5), ("pissa_niter_4", 1e-3)])
def test_pissa_takes_the_top_singular_triplets(init, tol):
    w = _weight_with_spectrum(10, 12, np.array([9.0, 7.0, 5.0, 0.3, 0.2, 0.1]))
    base = nn.Dense(12, 10, has_bias=False)
    base.weight.set_data(Tensor(w.astype(np.float32)))
    layer = LoraLinear(base, spec(lora_rank=3, lora_alpha=6.0, init_lora_weights=init))
    a, b = layer.lora_A.asnumpy().astype(np.float64), layer.lora_B.asnumpy().astype(np.float64)
    u, sv, vt = np.linalg.svd(w)
    top = (u[:, :3] * sv[:3]) @ vt[:3]
    np.testing.assert_allclose(2.0 * b @ a, top, atol=tol * 10)
    np.testing.assert_allclose(layer.weight.asnumpy(), w - top, atol=tol * 10)
    # A and B carry sqrt(S/s) each, as in PEFT
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.sqrt(sv[:3] / 2.0), rtol=tol)


def test_olora_takes_the_qr_factors():
    w = RNG.standard_normal((10, 12))
    base = nn.Dense(12, 10, has_bias=False)
    base.weight.set_data(Tensor(w.astype(np.float32)))
    layer = LoraLinear(base, spec(lora_rank=4, lora_alpha=8.0, init_lora_weights="olora"))
    a, b = layer.lora_A.asnumpy().astype(np.float64), layer.lora_B.asnumpy().astype(np.float64)
    np.testing.assert_allclose(b.T @ b, np.eye(4), atol=1e-5)       # orthonormal columns
    np.testing.assert_allclose(np.tril(a[:, :4], -1), 0, atol=1e-6)  # upper-triangular R
    np.testing.assert_allclose(layer.weight.asnumpy(), w - 2.0 * b @ a, atol=1e-5)


def test_data_driven_init_rejects_rank_above_dims():
    with pytest.raises(ValueError, match=r"needs rank <= min\(out, in\) = 5, got rank 8"):
        LoraLinear(nn.Dense(12, 5), spec(lora_rank=8, init_lora_weights="olora"))


@pytest.mark.usefixtures("pynative")
@pytest.mark.parametrize("use_dora,fused", [(False, False), (True, False), (False, True)],
                         ids=["lora", "dora", "fused"])
def test_gradients_match_numpy(use_dora, fused):
    layer = LoraLinear(nn.Dense(7, 5, has_bias=False),
                       spec(lora_rank=2, lora_alpha=3.0, use_dora=use_dora, use_fused_kernel=fused))
    assert layer.fused == fused
    arr = randomize(layer)
    x = RNG.standard_normal((6, 7)).astype(np.float32)
    g = RNG.standard_normal((6, 5)).astype(np.float32)
    params = layer.adapter_parameters()

    def loss(inp):
        return (layer(inp) * Tensor(g)).sum()

    _, (dx, grads) = ms.value_and_grad(loss, grad_position=0, weights=params)(Tensor(x))
    s, x64, g64 = 1.5, x.astype(np.float64), g.astype(np.float64)
    w, a, b = arr["weight"], arr["lora_A"], arr["lora_B"]
    # DoRA: y = c * (x W^T + s x A^T B^T) with c = m / ||W + sBA||_row held constant in backward
    c = np.ones(5)
    if use_dora:
        c = arr["lora_magnitude_vector"] / np.linalg.norm(w + s * b @ a, axis=1)
    gc = g64 * c
    expected = {"lora_A": s * (gc @ b).T @ x64, "lora_B": s * gc.T @ (x64 @ a.T)}
    if use_dora:
        norm = np.linalg.norm(w + s * b @ a, axis=1)
        expected["lora_magnitude_vector"] = (g64 * (x64 @ w.T + s * x64 @ a.T @ b.T)).sum(0) / norm
    assert [p.name.rsplit(".", 1)[-1] for p in params] == list(expected)
    for param, grad in zip(params, grads):
        np.testing.assert_allclose(grad.asnumpy(), expected[param.name.rsplit(".", 1)[-1]], **TOL)
    np.testing.assert_allclose(dx.asnumpy(), gc @ w + s * (gc @ b) @ a, **TOL)


@pytest.mark.usefixtures("pynative")
def test_lora_path_row_scale_scales_every_output_feature():
    """DoRA's c (s x A^T B^T + s b) goes through B's rows and the bias: lora_path(x, c)."""
    layer = LoraLinear(nn.Dense(7, 5, has_bias=True), spec(lora_rank=2, lora_alpha=3.0, lora_bias=True))
    arr = randomize(layer)
    x = RNG.standard_normal((6, 7)).astype(np.float32)
    c = RNG.uniform(0.5, 2.0, 5).astype(np.float32)
    out = layer.lora_path(Tensor(x), row_scale=Tensor(c)).asnumpy()
    s = 1.5
    expected = (s * x.astype(np.float64) @ arr["lora_A"].T @ arr["lora_B"].T + s * arr["lora_B_bias"]) * c
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("variant", ["lora", "dora", "lora_bias"])
@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_merge_then_unmerge(make, variant):
    base = make()
    if variant == "lora_bias" and not base.has_bias:
        pytest.skip("lora_bias merges into a base bias")
    layer = LoraLinear(base, spec(**VARIANTS[variant]))
    arr = randomize(layer)
    x = Tensor(RNG.standard_normal((6, 12)).astype(np.float32))
    before, weight0 = layer(x).asnumpy(), layer.weight.asnumpy().copy()
    bias0 = layer.bias.asnumpy().copy() if base.has_bias else None
    layer.merge()
    merged = layer.weight.asnumpy()
    expected = merged_weight(arr["weight"], arr, 2.0, variant == "dora")
    np.testing.assert_allclose(merged if layer.transpose_b else merged.T, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    # the graph compiled before merge() still gives the same output (the gate is a Parameter) ...
    np.testing.assert_allclose(layer(x).asnumpy(), before, rtol=1e-5, atol=1e-5)
    # ... and a graph compiled after it skips the adapter altogether
    fresh = LoraLinear(make(), spec(**VARIANTS[variant]))
    fresh.merged = True
    for param in fresh.get_parameters():
        param.set_data(Tensor(dict((p.name.rsplit(".", 1)[-1], p) for p in layer.get_parameters())[
            param.name.rsplit(".", 1)[-1]].asnumpy()))
    np.testing.assert_allclose(fresh(x).asnumpy(), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), weight0, rtol=1e-5, atol=1e-6)
    if bias0 is not None:
        np.testing.assert_allclose(layer.bias.asnumpy(), bias0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x).asnumpy(), before, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_the_adapter_path():
    layer = LoraLinear(nn.Dense(16, 8, has_bias=False), spec(lora_rank=4, lora_alpha=4, lora_dropout=0.5))
    arr = randomize(layer)
    x = RNG.standard_normal((64, 16)).astype(np.float32)
    layer.set_train(False)  # eval: dropout off, exact formula
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), reference(x, arr, 1.0, False), **TOL)
    layer.set_train(True)
    trained = layer(Tensor(x)).asnumpy()
    assert not np.allclose(trained, reference(x, arr, 1.0, False), atol=1e-3)


def test_lora_under_dropout_uses_the_kernel_dropout_and_matches_numpy():
    """Plain LoRA's composition under ``auto`` on CPU float32 drops x with the kernels' Philox
    dropout: y = x W^T + b + s drop(x) A^T B^T and its gradients against float64 numpy with the
    layer's own mask; ``use_fused_kernel: false`` keeps MindSpore's nn.Dropout."""
    off = LoraLinear(nn.Dense(16, 8), spec(lora_dropout=0.3, use_fused_kernel=False))
    assert type(off.lora_dropout) is nn.Dropout  # pylint: disable=unidiomatic-typecheck
    if not HAVE_CXX:
        pytest.skip("no C++ compiler: the kernel dropout cannot be built")

    layer = LoraLinear(nn.Dense(16, 8, has_bias=True), spec(lora_rank=3, lora_alpha=6.0, lora_dropout=0.3))
    layer.set_train(True)
    assert isinstance(layer.lora_dropout, PhiloxDropout) and not layer.fused
    multiplier = _fix_seed(layer)
    arr = randomize(layer)
    x = RNG.standard_normal((64, 16)).astype(np.float32)
    g = RNG.standard_normal((64, 8)).astype(np.float64)
    params = layer.adapter_parameters()

    def loss(inp):
        return (layer(inp) * Tensor(g.astype(np.float32))).sum()

    value, (dx, grads) = ms.value_and_grad(loss, grad_position=0, weights=params)(Tensor(x))
    mult = multiplier(x)
    assert 0.2 < (mult == 0).mean() < 0.4
    s, xd = 2.0, x * mult
    w, a, b = arr["weight"], arr["lora_A"], arr["lora_B"]
    np.testing.assert_allclose(value.asnumpy(), ((x @ w.T + arr["bias"] + s * xd @ a.T @ b.T) * g).sum(), rtol=1e-5)
    expected = {"lora_A": s * (g @ b).T @ xd, "lora_B": s * g.T @ (xd @ a.T)}
    for param, grad in zip(params, grads):
        np.testing.assert_allclose(grad.asnumpy(), expected[param.name.rsplit(".", 1)[-1]], **TOL)
    np.testing.assert_allclose(dx.asnumpy(), g @ w + mult * (s * (g @ b) @ a), **TOL)


def _dora_dropout_layer(fused, seed=11):
    ms.set_seed(seed)  # the dropout op's seeds come from the global seed: twins draw one mask
    layer = LoraLinear(nn.Dense(16, 8, has_bias=True),
                       spec(lora_rank=3, lora_alpha=6.0, use_dora=True, lora_dropout=0.3, use_fused_kernel=fused))
    layer.set_train(True)
    return layer


class FixedKey(nn.Cell):
    """Stands in for PhiloxDropout's key cell: the same Philox key every call."""

    def __init__(self, key):
        super().__init__()
        self.value = Tensor(np.array(key, np.int32))

    def construct(self):
        return self.value


def _fix_seed(layer):
    """Give a PhiloxDropout layer a fixed key; returns its multiplier (0 or 1/(1-p)) for x's shape."""
    layer.lora_dropout.key = FixedKey((7, 9))
    return lambda x: layer.lora_dropout(Tensor(np.ones_like(x))).asnumpy().astype(np.float64)


def _twin_multiplier(fused, x):
    """The dropout multiplier (0 or 1/(1-p)) of the first training call of a twin layer
    (MindSpore's nn.Dropout, reproduced by ``mindspore.set_seed``)."""
    dropout = _dora_dropout_layer(fused).lora_dropout
    _, keep = dropout.dropout(Tensor(x))
    return keep.asnumpy().astype(np.float64) / (1 - dropout.p)


@pytest.mark.parametrize("fused", [True, False, "auto"], ids=["dropped_kernel", "second_matmul", "philox_dropout"])
def test_dora_under_dropout_matches_numpy(fused):
    """DoRA in training with dropout: y = x W^T + b + (c - 1) drop(x) W^T + c s drop(x) A^T B^T,
    c = m / ||W + sBA||_row (constant in backward), against float64 numpy with the layer's own
    mask. The kernel path forms drop(x) W^T from x W^T and the dropped elements only; under
    ``auto`` the second matmul takes the kernels' Philox dropout (mask regenerated in backward)."""
    layer = _dora_dropout_layer(fused)
    assert (layer.dora_dropped is not None) == (fused is True), layer.dora_dropped_reason
    philox = isinstance(layer.lora_dropout, PhiloxDropout)
    assert philox == (fused is not False and HAVE_CXX)
    multiplier = _fix_seed(layer) if philox else lambda x: _twin_multiplier(fused, x)
    arr = randomize(layer)
    x = RNG.standard_normal((64, 16)).astype(np.float32)
    g = RNG.standard_normal((64, 8)).astype(np.float32)
    params = layer.adapter_parameters()

    def loss(inp):
        return (layer(inp) * Tensor(g)).sum()

    (value, (dx, grads)) = ms.value_and_grad(loss, grad_position=0, weights=params)(Tensor(x))
    mult = multiplier(x)  # the layer's own mask
    assert 0.2 < (mult == 0).mean() < 0.4  # the mask is a real p = 0.3 draw
    s, x64, g64 = 2.0, x.astype(np.float64), g.astype(np.float64)
    w, a, b, m = arr["weight"], arr["lora_A"], arr["lora_B"], arr["lora_magnitude_vector"]
    xd = x64 * mult
    norm = np.linalg.norm(w + s * b @ a, axis=1)
    c = m / norm
    y = x64 @ w.T + arr["bias"] + (c - 1) * (xd @ w.T) + c * s * (xd @ a.T @ b.T)
    np.testing.assert_allclose(value.asnumpy(), (y * g64).sum(), rtol=1e-5)
    gc = g64 * c
    expected = {"lora_A": s * (gc @ b).T @ xd, "lora_B": s * gc.T @ (xd @ a.T),
                "lora_magnitude_vector": (g64 * (xd @ w.T + s * xd @ a.T @ b.T)).sum(0) / norm}
    for param, grad in zip(params, grads):
        np.testing.assert_allclose(grad.asnumpy(), expected[param.name.rsplit(".", 1)[-1]], **TOL)
    expected_dx = g64 @ w + mult * ((g64 * (c - 1)) @ w + s * (gc @ b) @ a)
    np.testing.assert_allclose(dx.asnumpy(), expected_dx, **TOL)


def test_dora_norm_follows_base_weights_loaded_after_wrapping():
    """MindFormers loads the base checkpoint after wrapping: DoRA's norm must use the loaded W
    (nothing derived from W is cached), in a compiled graph too."""
    layer = LoraLinear(nn.Dense(12, 10, has_bias=False), spec(use_dora=True))
    arr = randomize(layer)
    x = RNG.standard_normal((6, 12)).astype(np.float32)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def construct(self, inp):
            return self.layer(inp)

    net = Net()  # graph mode (conftest): the second call reuses the compiled graph
    net.set_train(False)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), reference(x, arr, 2.0, True), **TOL)
    new_w = RNG.standard_normal((10, 12)).astype(np.float32)
    not_loaded, _ = ms.load_param_into_net(net, {layer.weight.name: ms.Parameter(Tensor(new_w), name=layer.weight.name)})
    assert layer.weight.name not in not_loaded  # a base checkpoint: only the adapter is left
    arr["weight"] = new_w.astype(np.float64)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), reference(x, arr, 2.0, True), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora", True])
def test_data_driven_init_sees_weights_loaded_after_wrapping(init):
    """MindFormers builds under no_init_parameters when load_checkpoint is set, wraps, and
    only then loads the base weights: DoRA's m and PiSSA/OLoRA must come from those."""
    from mindspore.nn.utils import no_init_parameters

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.proj = nn.Dense(12, 10, has_bias=False)

        def construct(self, x):
            return self.proj(x)

    loaded = RNG.standard_normal((10, 12)).astype(np.float32)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    with no_init_parameters():
        net = Net()
        net.proj = LoraLinear(net.proj, spec(lora_rank=3, init_lora_weights=init, use_dora=True))
    assert net.proj.lora_A.has_init and net.proj.lora_magnitude_vector.has_init  # not computed yet
    ms.load_param_into_net(net, {"proj.weight": ms.Parameter(Tensor(loaded), name="proj.weight")})
    net.init_parameters_data()
    np.testing.assert_allclose(net.proj.lora_magnitude_vector.asnumpy(), np.linalg.norm(loaded, axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(net(x).asnumpy(), x.asnumpy() @ loaded.T, rtol=1e-5, atol=1e-5)
    if init != "pissa":
        return
    u, sv, vt = np.linalg.svd(loaded.astype(np.float64))
    np.testing.assert_allclose(2.0 * net.proj.lora_B.asnumpy() @ net.proj.lora_A.asnumpy(),
                               (u[:, :3] * sv[:3]) @ vt[:3], atol=1e-4)


def test_data_driven_init_refuses_a_sharded_weight():
    base = nn.Dense(12, 10, has_bias=False)
    base.weight.set_data(Tensor(np.ones((5, 12), np.float32)), slice_shape=True)  # an mp=2 slice
    with pytest.raises(ValueError, match=r"holds a \(5, 12\) slice of \(10, 12\)"):
        LoraLinear(base, spec(init_lora_weights="pissa"))
