"""LoraLinear on mcore ColumnParallelLinear / RowParallelLinear against numpy (graph mode only:
their forward is a Morph, which PyNative rejects)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from mindformers.parallel_core.transformer_config import TransformerConfig
from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
    ColumnParallelLinear, LinearNoTP, RowParallelLinear)
from mindformers_lora_ext.config import LoraExtConfig
from mindformers_lora_ext.tuners.lora import LoraLinear, merged_weight
from mindformers_lora_ext.tuners.targeting import find_targets, replace_cells
from conftest import randomize_layer

RNG = np.random.default_rng(4321)
TOL = {"rtol": 1e-4, "atol": 1e-4}
IN, OUT, S = 12, 10, 2.0  # S = lora_alpha / lora_rank = 6 / 3


def config():
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                             compute_dtype="float32", params_dtype="float32")


def column(**kw):
    cfg = config()
    return ColumnParallelLinear(IN, OUT, config=cfg, init_method=cfg.init_method, **kw)


def row(**kw):
    cfg = config()
    return RowParallelLinear(IN, OUT, config=cfg, init_method=cfg.init_method, **kw)


BASES = {
    "column_bias": lambda: column(bias=True),
    "column_skip_bias_add": lambda: column(bias=True, skip_bias_add=True),
    "column_no_bias": lambda: column(bias=False),
    "row_bias": lambda: row(bias=True),
    "row_skip_bias_add": lambda: row(bias=True, skip_bias_add=True),
}
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}


def spec(**variant):
    return LoraExtConfig(target_modules=["x"], lora_rank=3, lora_alpha=6.0, **variant).module_options("x")


def randomize(layer):
    """Random values for every parameter; returns float64 arrays (W as [out, in])."""
    arrays = randomize_layer(layer, RNG)
    assert layer.transpose_b  # mcore targets store W as [out, in]
    return arrays


def reference(x2d, arr, base, dora):
    """(y, returned bias) of the adapted mcore layer: y = x W'^T + s b_B [+ bias unless skipped]."""
    adapted = arr["weight"] + S * arr["lora_B"] @ arr["lora_A"]
    if dora:
        adapted = adapted * (arr["lora_magnitude_vector"] / np.linalg.norm(adapted, axis=1))[:, None]
    y = x2d @ adapted.T + S * arr.get("lora_B_bias", 0.0)
    if base.has_bias and not base.skip_bias_add:
        return y + arr["bias"], None
    return y, arr.get("bias")


def run(layer, x):
    """(y [N, out], returned bias or None) as float64 numpy."""
    y, bias = layer(Tensor(x))
    assert y.shape == x.shape[:-1] + (OUT,) and y.dtype == ms.float32
    return y.asnumpy().reshape(-1, OUT).astype(np.float64), None if bias is None else bias.asnumpy()


def base_params(base):
    return [(id(p), p.name) for p in base.get_parameters()]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS.keys())
@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_forward_matches_numpy(make, variant):
    base = make()
    before = base_params(base)
    layer = LoraLinear(base, spec(**VARIANTS[variant]))
    # adopted, not copied, and not renamed (insert_child_to_cell adds no prefix)
    assert layer.weight is base.weight and layer.base_layer is base
    assert base_params(base) == before
    assert (layer.in_channels, layer.out_channels, layer.compute_dtype) == (IN, OUT, ms.float32)
    arr = randomize(layer)
    x = RNG.standard_normal((5, 2, IN)).astype(np.float32)  # sequence-first [S, B, H]
    y, bias = run(layer, x)
    expected_y, expected_bias = reference(x.reshape(-1, IN).astype(np.float64), arr, base, variant == "dora")
    np.testing.assert_allclose(y, expected_y, **TOL)
    if expected_bias is None:
        assert bias is None
    else:
        np.testing.assert_allclose(bias, expected_bias, rtol=1e-6)


def test_column_weight_argument_passes_through():
    """A weight handed to the call reaches the base; the delta is the layer's own."""
    base = column(bias=True)
    layer = LoraLinear(base, spec())
    arr = randomize(layer)
    other = RNG.standard_normal((OUT, IN)).astype(np.float32)
    x = RNG.standard_normal((3, 2, IN)).astype(np.float32)
    y, bias = layer(Tensor(x), Tensor(other))
    expected = reference(x.reshape(-1, IN).astype(np.float64), dict(arr, weight=other), base, False)[0]
    np.testing.assert_allclose(y.asnumpy().reshape(-1, OUT), expected, **TOL)
    assert bias is None


def test_dora_dropout_path_recomputes_base_with_own_matmul():
    """With dropout active DoRA recomputes x W^T by ``layer.matmul``; identity 'dropout' makes
    that path deterministic, so it must still match numpy."""
    base = column(bias=True)
    layer = LoraLinear(base, spec(use_dora=True, lora_dropout=0.1, use_fused_kernel=False))
    layer.lora_dropout = nn.Identity()
    assert layer.dropout_active and layer.dora_dropped is None
    arr = randomize(layer)
    layer.set_train(True)
    x = RNG.standard_normal((4, 3, IN)).astype(np.float32)
    y, _ = run(layer, x)
    np.testing.assert_allclose(y, reference(x.reshape(-1, IN).astype(np.float64), arr, base, True)[0], **TOL)


class _Loss(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, g):
        y, _ = self.layer(x)
        return (y * g).sum()


def _square_layer(make_base, **options):
    """An adapter of rank 8 (s = 1) on an 8 x 8 mcore base without bias."""
    cfg = config()
    base = make_base(8, 8, config=cfg, init_method=cfg.init_method, bias=False)
    pet = LoraExtConfig(target_modules=["x"], lora_rank=8, lora_alpha=8.0, **options)
    return LoraLinear(base, pet.module_options("x"))


def _set(layer, **arrays):
    for name, value in arrays.items():
        param = getattr(layer, name)
        param.set_data(Tensor(np.asarray(value, np.float32), param.dtype))


class _LossAndOutput(_Loss):
    def construct(self, x, g):
        y, _ = self.layer(x)
        return (y * g).sum(), y


def _train_grads(layer, x, g):
    """(y, dL/dx, [dL/dp for the adapter parameters]) of L = sum(y * g), in training mode, all
    from one execution (one dropout mask)."""
    layer.set_train(True)
    (_, y), (dx, grads) = ms.value_and_grad(_LossAndOutput(layer), grad_position=0,
                                            weights=layer.adapter_parameters(), has_aux=True)(Tensor(x), Tensor(g))
    return (y.asnumpy().astype(np.float64), dx.asnumpy().astype(np.float64),
            [t.asnumpy().astype(np.float64) for t in grads])


@pytest.mark.parametrize("use_fused", [True, "auto"], ids=["fused_op", "composition"])
@pytest.mark.parametrize("make_base", [ColumnParallelLinear, RowParallelLinear], ids=["column", "row"])
def test_dropout_kernels_run_on_mcore_bases(make_base, use_fused):
    """Our Custom ops run in an mcore base's graph (MindSpore compiles it at run time, beside the
    base's Morph: the ops need C++ type inference there). With W = 0, A = B = I, s = 1 and x = 1
    the output is the step's dropout multiplier m, and the backward must use that very mask:
    dx = g * m, dA = dB = g^T m. ``true``: the fused op; ``auto``: PhiloxDropout in the
    composition."""
    from mindformers_lora_ext.kernels import PhiloxDropout
    p, n = 0.3, 64
    layer = _square_layer(make_base, lora_dropout=p, use_fused_kernel=use_fused)
    assert layer.fused == (use_fused is True), getattr(layer, "dropout_reason", None)
    assert isinstance(layer.lora_dropout, PhiloxDropout), layer.dropout_reason
    _set(layer, weight=np.zeros((8, 8)), lora_A=np.eye(8), lora_B=np.eye(8))
    x, g = np.ones((n, 8), np.float32), RNG.standard_normal((n, 8)).astype(np.float32)
    y, dx, (da, db) = _train_grads(layer, x, g)
    k = np.float32(1 / (1 - p))
    assert set(np.unique(y)) == {0.0, float(k)}  # a mask, and not an empty or a full one
    np.testing.assert_allclose(dx, g * y, **TOL)
    np.testing.assert_allclose(da, g.T @ y, **TOL)
    np.testing.assert_allclose(db, g.T @ y, **TOL)


@pytest.mark.parametrize("use_fused", [True, "auto"], ids=["dropped_matmul_kernel", "second_matmul"])
def test_dora_dropout_on_mcore_bases(use_fused):
    """DoRA's drop(x) W^T under dropout on an mcore base, by the dropped-elements kernel (true) or
    a second matmul (auto). A = I, B = 0, m = 2 ||W||_row (so c = 2), x = 1:
    y = 1 W^T + M W^T, M the multiplier, recovered as (y - 1 W^T) W^-T and checked to be one
    (entries 0 or 1/(1-p)); then dx = g W + (g W) * M, dB = s c g^T M, dm = rowsum(g * M W^T) / ||W||."""
    from mindformers_lora_ext.kernels import PhiloxDropout
    p, n = 0.3, 64
    layer = _square_layer(ColumnParallelLinear, lora_dropout=p, use_dora=True, use_fused_kernel=use_fused)
    assert isinstance(layer.lora_dropout, PhiloxDropout), layer.dropout_reason
    assert (layer.dora_dropped is not None) == (use_fused is True), layer.dora_dropped_reason
    w = 3 * np.eye(8) + RNG.standard_normal((8, 8)) * 0.3
    norm = np.linalg.norm(w, axis=1)
    _set(layer, weight=w, lora_A=np.eye(8), lora_B=np.zeros((8, 8)), lora_magnitude_vector=2 * norm)
    x, g = np.ones((n, 8), np.float32), RNG.standard_normal((n, 8)).astype(np.float32)
    y, dx, (_, db, dm) = _train_grads(layer, x, g)
    mult = (y - x @ w.T) @ np.linalg.inv(w.T)
    k = 1 / (1 - p)
    mask = np.isclose(mult, k, atol=1e-3)
    assert mask.any() and not mask.all()
    np.testing.assert_allclose(mult, k * mask, atol=1e-3)
    mult = k * mask
    np.testing.assert_allclose(dx, g @ w + (g @ w) * mult, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, 2 * g.T @ mult, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dm, (g * (mult @ w.T)).sum(0) / norm, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_fused_op_keeps_the_mcore_base_contract(make):
    """With the fused op in place of the base's product: y and the returned bias as the base
    gives them (bias added unless skip_bias_add, then returned), against numpy; the gradients
    too. With ``lora_bias``, which the fused path adds after the op."""
    base = make()
    layer = LoraLinear(base, spec(use_fused_kernel=True, lora_bias=True))
    assert layer.fused
    arr = randomize(layer)
    x = RNG.standard_normal((5, 2, IN)).astype(np.float32)
    y, bias = run(layer, x)
    x64 = x.reshape(-1, IN).astype(np.float64)
    expected_y, expected_bias = reference(x64, arr, base, False)
    np.testing.assert_allclose(y, expected_y, **TOL)
    assert (bias is None) == (expected_bias is None)
    if bias is not None:
        np.testing.assert_allclose(bias, expected_bias, rtol=1e-6)
    g = RNG.standard_normal((5, 2, OUT)).astype(np.float32)
    _, dx, grads = _train_grads(layer, x, g)
    g64, a, b, w = g.reshape(-1, OUT).astype(np.float64), arr["lora_A"], arr["lora_B"], arr["weight"]
    np.testing.assert_allclose(grads[0], S * (g64 @ b).T @ x64, **TOL)      # dL/dA
    np.testing.assert_allclose(grads[1], S * g64.T @ (x64 @ a.T), **TOL)    # dL/dB
    np.testing.assert_allclose(dx.reshape(-1, IN), g64 @ (w + S * b @ a), **TOL)


def test_sharded_mcore_bases_keep_the_composition_with_the_reason():
    """Our CPU ops have no shard strategy: under semi-auto parallel, or a RowParallelLinear that
    reduces over tensor-parallel ranks, the layer uses MindSpore's ops and says why."""
    base = row(bias=False)
    base.tp = 2  # what tensor_model_parallel_size 2 sets (building it needs communication groups)
    layer = LoraLinear(base, spec(use_fused_kernel=True, lora_dropout=0.1))
    assert not layer.fused and type(layer.lora_dropout) is nn.Dropout  # pylint: disable=unidiomatic-typecheck
    assert "tensor_model_parallel_size 2" in layer.dropout_reason
    base = column(bias=False)  # built stand-alone: its own shard() needs a device layout
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel")
    try:
        layer = LoraLinear(base, spec(use_fused_kernel=True, lora_dropout=0.1))
    finally:
        ms.reset_auto_parallel_context()
    assert not layer.fused and "parallel_mode semi_auto_parallel" in layer.dropout_reason


@pytest.mark.parametrize("init,use_dora", [("pissa", True), ("olora", False)])
def test_data_driven_init_keeps_initial_output(init, use_dora):
    """PiSSA/OLoRA rewrite W through set_weight_array: the adapted layer starts equal to the base."""
    base = row(bias=True)
    x = Tensor(RNG.standard_normal((4, 2, IN)).astype(np.float32))
    expected = base(x)[0].asnumpy()
    weight0 = base.weight.asnumpy().copy()
    layer = LoraLinear(base, spec(init_lora_weights=init, use_dora=use_dora))
    assert not np.allclose(layer.weight.asnumpy(), weight0, atol=1e-3)  # residual of W
    np.testing.assert_allclose(layer(x)[0].asnumpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [BASES["column_bias"], BASES["row_skip_bias_add"]], ids=["column", "row"])
def test_gradients_match_numpy(make):
    layer = LoraLinear(make(), spec())
    arr = randomize(layer)
    x = RNG.standard_normal((3, 2, IN)).astype(np.float32)
    g = RNG.standard_normal((3, 2, OUT)).astype(np.float32)
    params = layer.adapter_parameters()
    _, (dx, grads) = ms.value_and_grad(_Loss(layer), grad_position=0, weights=params)(Tensor(x), Tensor(g))
    x64, g64 = x.reshape(-1, IN).astype(np.float64), g.reshape(-1, OUT).astype(np.float64)
    a, b, w = arr["lora_A"], arr["lora_B"], arr["weight"]
    np.testing.assert_allclose(grads[0].asnumpy(), S * (g64 @ b).T @ x64, **TOL)      # dL/dA
    np.testing.assert_allclose(grads[1].asnumpy(), S * g64.T @ (x64 @ a.T), **TOL)    # dL/dB
    np.testing.assert_allclose(dx.asnumpy().reshape(-1, IN), g64 @ (w + S * b @ a), **TOL)


def _total(out):
    """What the caller ends up with: y + the returned bias (if any)."""
    y, bias = out
    return y if bias is None else y + bias


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS.keys())
@pytest.mark.parametrize("make", [BASES[k] for k in ("column_skip_bias_add", "row_bias")],
                         ids=["column_skip_bias_add", "row_bias"])
def test_merge_then_unmerge(make, variant):
    layer = LoraLinear(make(), spec(**VARIANTS[variant]))
    arr = randomize(layer)
    x = RNG.standard_normal((6, IN)).astype(np.float32)
    before = run(layer, x)
    weight0, bias0 = layer.weight.asnumpy().copy(), layer.bias.asnumpy().copy()
    layer.merge()
    merged = layer.weight.asnumpy()
    expected = merged_weight(arr["weight"], arr, S, variant == "dora")
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    # the graph compiled before merge() gives the same result (lora_bias may move from y to the
    # returned bias when the base skips its bias add: the caller's sum is what is preserved) ...
    after = run(layer, x)
    assert (after[1] is None) == (before[1] is None)
    np.testing.assert_allclose(_total(after), _total(before), rtol=1e-5, atol=1e-5)
    # ... and so does a graph compiled after it, which skips the adapter altogether
    fresh = LoraLinear(make(), spec(**VARIANTS[variant]))
    fresh.merged = True
    values = {p.name.rsplit(".", 1)[-1]: p.asnumpy() for p in layer.get_parameters()}
    for param in fresh.get_parameters():
        param.set_data(Tensor(values[param.name.rsplit(".", 1)[-1]]))
    np.testing.assert_allclose(_total(run(fresh, x)), _total(before), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.asnumpy(), weight0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.asnumpy(), bias0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_total(run(layer, x)), _total(before), rtol=1e-5, atol=1e-5)


class _Mlp(nn.Cell):
    """A block in mcore style: the linear cells return (y, bias) tuples."""

    def __init__(self):
        super().__init__()
        cfg = config()
        self.linear_fc1 = ColumnParallelLinear(IN, 16, config=cfg, init_method=cfg.init_method, bias=False)
        self.linear_fc2 = RowParallelLinear(16, IN, config=cfg, init_method=cfg.init_method,
                                            skip_bias_add=True)
        self.norm = nn.LayerNorm((IN,))
        self.output_layer = LinearNoTP(IN, OUT, config=cfg, init_method=cfg.init_method, bias=False)

    def construct(self, x):
        h, _ = self.linear_fc1(self.norm(x))
        y, bias = self.linear_fc2(h)
        logits, _ = self.output_layer(y + bias)
        return logits


def test_targeting_and_wrapping_in_a_network():
    net = _Mlp()
    assert find_targets(net, "all-linear") == ["linear_fc1", "linear_fc2"]  # output head left alone
    assert find_targets(net, ["output_layer"]) == ["output_layer"]  # LinearNoTP: a subclass
    with pytest.raises(ValueError, match="not a supported linear type"):
        find_targets(net, ".*norm")
    x = Tensor(RNG.standard_normal((4, 2, IN)).astype(np.float32))
    expected = net(x).asnumpy()
    names = [p.name for p in net.get_parameters()]
    assert "linear_fc1.weight" in names
    targets = find_targets(net, "all-linear")
    layers = replace_cells(net, targets, lambda name, cell: LoraLinear(cell, spec(use_dora=True)))
    for name, layer in layers.items():  # as AdapterModel does
        layer.name_parameters(name)
    adapter = [f"{t}.{a}" for t in targets for a in ("lora_A", "lora_B", "lora_magnitude_vector")]
    gates = [f"{t}.lora_active" for t in targets]  # frozen
    assert sorted(p.name for p in net.get_parameters()) == sorted(names + adapter + gates)
    assert sorted(p.name for p in net.trainable_params() if p.name not in names) == sorted(adapter)
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=1e-5, atol=1e-5)  # B = 0 at start


def test_unsupported_bases_are_rejected():
    with pytest.raises(TypeError, match="skip_weight_param_allocation"):
        LoraLinear(column(bias=False, skip_weight_param_allocation=True), spec())
    # mcore's Morph infers the output shape from weight.shape[0], i.e. assumes transpose_b
    with pytest.raises(TypeError, match="transpose_b=False"):
        LoraLinear(row(transpose_b=False), spec())
