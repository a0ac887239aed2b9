"""Shard strategies of the VeRA, LoHa, LoKr and AdaLoRA layers under semi-auto parallel
(computed and set on their named primitives; no devices)."""
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor

from mindformers.modules.layers import Linear
from mindformers_lora_ext.config import AdaLoraConfig, LohaConfig, LokrConfig, VeraConfig
from mindformers_lora_ext.tuners.adalora import AdaLoraLinear
from mindformers_lora_ext.tuners.loha import LohaLinear
from mindformers_lora_ext.tuners.lokr import LokrLinear
from mindformers_lora_ext.tuners.sharding import (base_strategy, lokr_strategies, lora_strategies,
                                                  vera_strategies)
from mindformers_lora_ext.tuners.vera import VeraLinear, vera_projections

IN, OUT = 64, 32  # LoKr: in = 8 x 8, out = 4 x 8, so mp = 2 / 4 divide in_m = 8 and out_l = 4
LAYOUTS = [(1, 2), (1, 4), (2, 2), (2, 4)]  # (dp, mp)


def column(dp, mp):
    """W [out, in] split on out (Megatron column): ((dp, 1), (mp, 1))."""
    return ((dp, 1), (mp, 1))


def row(dp, mp):
    """W [out, in] split on in (Megatron row): ((dp, mp), (1, mp))."""
    return ((dp, mp), (1, mp))


def sharded_base(strategy=None):
    base = Linear(IN, OUT, compute_dtype=ms.float32)
    if strategy is not None:
        base.matmul.shard(strategy)
    return base


def vera_shared(rank, in_max, out_max):
    proj_a, proj_b = vera_projections(0, rank, in_max, out_max)
    return SimpleNamespace(in_max=in_max, out_max=out_max,
                           vera_A=Parameter(Tensor(proj_a), name="vera_A", requires_grad=False),
                           vera_B=Parameter(Tensor(proj_b), name="vera_B", requires_grad=False))


def make_layer(kind, base, sliced=False, **kw):
    """A ``kind`` layer on ``base``, its spec from the config class; VeRA's projections are
    larger than the cell when ``sliced``."""
    if kind == "vera":
        spec = VeraConfig(target_modules=["x"], r=kw.get("r", 4)).module_options("x")
        grow = 8 if sliced else 0
        return VeraLinear(base, spec, vera_shared(spec.rank, IN + grow, OUT + grow))
    if kind == "loha":
        return LohaLinear(base, LohaConfig(target_modules=["x"], r=kw.get("r", 2), alpha=4.0).module_options("x"))
    if kind == "lokr":
        return LokrLinear(base, LokrConfig(target_modules=["x"], **kw).module_options("x"))
    spec = AdaLoraConfig(target_modules=["x"], init_r=4, target_r=2, total_step=10).module_options("x")
    return AdaLoraLinear(base, spec)


def strategy_of(layer, name):
    stra = getattr(getattr(layer, name), "in_strategy", None)
    return None if stra is None else tuple(map(tuple, stra))


def assert_set(layer, expected):
    for name, value in expected.items():
        assert strategy_of(layer, name) == value, name


# ------------------------------------------------------------------------------ per method

@pytest.mark.parametrize("dp,mp", LAYOUTS)
@pytest.mark.parametrize("style", [column, row])
def test_adalora_takes_loras_strategies(style, dp, mp):
    """P diag(lambda) Q has LoRA's shape: Q = lora_A split like A, P = lora_B like B."""
    base = sharded_base(style(dp, mp))
    layer = make_layer("adalora", base)
    strategies = layer.shard_ops(base, force=True)
    lora = lora_strategies(style(dp, mp))
    assert strategies == {n: lora[n] for n in ("lora_a_matmul", "lora_b_matmul")}
    assert_set(layer, strategies)
    if style is column:
        assert strategies == {"lora_a_matmul": ((dp, 1), (1, 1)), "lora_b_matmul": ((dp, 1), (mp, 1))}
    else:
        assert strategies == {"lora_a_matmul": ((dp, mp), (1, mp)), "lora_b_matmul": ((dp, 1), (1, 1))}


@pytest.mark.parametrize("dp,mp", LAYOUTS)
@pytest.mark.parametrize("style", [column, row])
def test_loha_factored_path_is_lora_at_rank_r_squared(style, dp, mp):
    base = sharded_base(style(dp, mp))
    layer = make_layer("loha", base, r=2)  # 4 (64 + 32) < 64 * 32: factored
    assert layer.factored
    layer.shard_ops(base, force=True)
    o, k = (mp, 1) if style is column else (1, mp)
    assert_set(layer, {"loha_in_matmul": ((dp, k), (1, k)), "loha_out_matmul": ((dp, 1), (o, 1)),
                       # the materialised path's ops (delta_weight()) are set too
                       "hada_w1_matmul": ((o, 1), (1, k)), "hada_w2_matmul": ((o, 1), (1, k)),
                       "loha_delta_matmul": ((dp, k), (o, k))})


@pytest.mark.parametrize("dp,mp", LAYOUTS)
@pytest.mark.parametrize("style", [column, row])
def test_loha_materialised_path_splits_dw_like_w(style, dp, mp):
    """Tiny cells build dW [out, in] from two [out, r] @ [r, in] products split (o, 1) x (1, k),
    so dW is split (o, k) like W and x @ dW^T takes the base's strategy."""
    base = sharded_base(style(dp, mp))
    layer = make_layer("loha", base, r=8)  # 64 (64 + 32) > 64 * 32: dW materialised
    assert not layer.factored
    layer.shard_ops(base, force=True)
    o, k = (mp, 1) if style is column else (1, mp)
    assert_set(layer, {"hada_w1_matmul": ((o, 1), (1, k)), "hada_w2_matmul": ((o, 1), (1, k)),
                       "loha_delta_matmul": style(dp, mp)})


@pytest.mark.parametrize("dp,mp", LAYOUTS)
def test_lokr_column_split_goes_to_out_l(dp, mp):
    """in not split: x's reshape keeps dp on N, so the w2 MatMul has a strategy; out's split is
    out_l's (the leading factor): the w1 MatMul is split like W's out."""
    base = sharded_base(column(dp, mp))
    layer = make_layer("lokr", base, r=1, decompose_both=True)
    assert (layer.out_l, layer.in_m) == (4, 8) and not layer.whole_w1 and not layer.whole_w2
    layer.shard_ops(base, force=True)
    assert_set(layer, {"lokr_w2_matmul": ((dp, 1), (1, 1)), "lokr_w1_matmul": ((dp, 1), (mp, 1)),
                       "lokr_w1_ab_matmul": ((mp, 1), (1, 1)), "lokr_w2_ab_matmul": ((1, 1), (1, 1))})


@pytest.mark.parametrize("dp,mp", LAYOUTS)
def test_lokr_row_split_goes_to_in_m_and_the_mixing_reshape_stays_derived(dp, mp):
    """in split k: x [N, in] -> [N * in_m, in_n] merges N (dp) with in_m (k), so the w2 MatMul
    keeps MindSpore's strategy; the w1 MatMul reduces over in_m, split like W's in."""
    base = sharded_base(row(dp, mp))
    layer = make_layer("lokr", base, r=1, decompose_both=True)
    strategies = layer.shard_ops(base, force=True)
    assert "lokr_w2_matmul" not in strategies
    assert strategy_of(layer, "lokr_w2_matmul") is None
    assert_set(layer, {"lokr_w1_matmul": ((dp, mp), (1, mp)), "lokr_w1_ab_matmul": ((1, 1), (1, mp)),
                       "lokr_w2_ab_matmul": ((1, 1), (1, 1))})


def test_lokr_whole_factors_and_splits_that_do_not_divide_the_factor():
    # decompose_factor 2: in = 2 x 32, out = 2 x 16; mp = 4 divides neither in_m nor out_l
    base = sharded_base(column(2, 4))
    layer = make_layer("lokr", base, r=16, decompose_factor=2)  # r >= max(...) / 2: w1, w2 whole
    assert (layer.out_l, layer.in_m) == (2, 2) and layer.whole_w1 and layer.whole_w2
    strategies = layer.shard_ops(base, force=True)
    assert_set(layer, {"lokr_w1_matmul": ((2, 1), (1, 1)), "lokr_w2_matmul": ((2, 1), (1, 1))})
    assert not hasattr(layer, "lokr_w1_ab_matmul")  # not built, so not set
    assert strategies["lokr_w1_ab_matmul"] == ((1, 1), (1, 1))
    assert lokr_strategies(row(1, 4), in_m=2, out_l=2)["lokr_w1_matmul"] == ((1, 1), (1, 1))
    assert lokr_strategies(row(1, 2), in_m=2, out_l=2)["lokr_w1_matmul"] == ((1, 2), (1, 2))


@pytest.mark.parametrize("dp,mp", LAYOUTS)
@pytest.mark.parametrize("style", [column, row])
@pytest.mark.parametrize("sliced", [False, True])
def test_vera_keeps_the_shared_projections_whole(style, dp, mp, sliced):
    """A / B are one Parameter for all cells: the same (whole) layout whatever the base's split."""
    base = sharded_base(style(dp, mp))
    layer = make_layer("vera", base, sliced=sliced)
    assert (layer.slice_a, layer.slice_b) == (sliced, sliced)
    strategies = layer.shard_ops(base, force=True)
    expected = {"vera_a_matmul": ((dp, 1), (1, 1)), "vera_b_matmul": ((dp, 1), (1, 1))}
    if sliced:
        expected.update(vera_a_slice=((1, 1),), vera_b_slice=((1, 1),))
    assert_set(layer, expected)
    assert strategies == vera_strategies(style(dp, mp))
    assert sliced or not hasattr(layer, "vera_a_slice")


def test_vera_slices_are_exact():
    """The named StridedSlice computes the same update as the numpy reference."""
    base = sharded_base()
    layer = make_layer("vera", base, sliced=True)
    rng = np.random.default_rng(7)
    lam_b, lam_d = rng.standard_normal(OUT), rng.standard_normal(4)
    layer.vera_lambda_b.set_data(Tensor(lam_b.astype(np.float32)))
    layer.vera_lambda_d.set_data(Tensor(lam_d.astype(np.float32)))
    x = rng.standard_normal((3, IN)).astype(np.float32)
    a = layer.vera_A.asnumpy().astype(np.float64)[:, :IN]
    b = layer.vera_B.asnumpy().astype(np.float64)[:OUT]
    expected = ((x @ a.T) * lam_d) @ b.T * lam_b
    np.testing.assert_allclose(layer.update(Tensor(x)).asnumpy(), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ gates

KINDS = ["vera", "loha", "lokr", "adalora"]
FIRST_MATMUL = {"vera": "vera_a_matmul", "loha": "loha_in_matmul", "lokr": "lokr_w1_matmul",
                "adalora": "lora_a_matmul"}


@pytest.mark.parametrize("kind", KINDS)
def test_unsharded_base_and_stand_alone_mode_leave_ops_alone(kind):
    base = sharded_base()
    layer = make_layer(kind, base)
    assert base_strategy(base) is None and layer.shard_ops(base, force=True) is None
    base.matmul.shard(column(2, 4))
    assert layer.shard_ops(base) is None  # not in auto parallel: nothing set
    assert strategy_of(layer, FIRST_MATMUL[kind]) is None


@pytest.mark.parametrize("kind", KINDS)
def test_layers_set_their_strategies_when_built_under_semi_auto_parallel(kind):
    base = sharded_base(column(2, 4))
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel")
    try:
        layer = make_layer(kind, base)
    finally:
        ms.reset_auto_parallel_context()
    assert strategy_of(layer, FIRST_MATMUL[kind]) is not None


@pytest.mark.parametrize("kind", ["adalora", "loha"])
def test_mcore_layers_strategy_from_their_config(kind):
    from mindformers.parallel_core.transformer_config import TransformerConfig
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear)
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype="float32",
                            compute_dtype="float32")
    col = ColumnParallelLinear(IN, OUT, config=cfg, init_method=cfg.init_method, bias=False)
    rw = RowParallelLinear(IN, OUT, config=cfg, init_method=cfg.init_method, bias=False)
    col_layer, row_layer = make_layer(kind, col), make_layer(kind, rw)
    # built stand-alone (tp > 1 needs communication groups); the strategy reads the config
    cfg.data_parallel_size, cfg.tensor_model_parallel_size = 2, 4
    col_layer.shard_ops(col, force=True)
    row_layer.shard_ops(rw, force=True)
    a_name, b_name = ("lora_a_matmul", "lora_b_matmul") if kind == "adalora" else \
        ("loha_in_matmul", "loha_out_matmul")
    assert strategy_of(col_layer, a_name) == ((2, 1), (1, 1))
    assert strategy_of(col_layer, b_name) == ((2, 1), (4, 1))
    assert strategy_of(row_layer, a_name) == ((2, 4), (1, 4))
    assert strategy_of(row_layer, b_name) == ((2, 1), (1, 1))
