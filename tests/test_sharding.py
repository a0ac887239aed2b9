"""Shard strategies of adapter ops under semi-auto parallel (computed and set; no devices)."""
import pytest
import mindspore as ms

from mindformers.modules.layers import Linear
from mindformers_lora_ext.config import LoraExtConfig
from mindformers_lora_ext.tuners.lora import LoraLinear
from mindformers_lora_ext.tuners.sharding import base_strategy, lora_strategies, shard_adapter


def _spec(**kw):
    return LoraExtConfig(target_modules=["x"], lora_rank=4, **kw).module_options("x")


@pytest.mark.parametrize("dp,mp", [(1, 2), (1, 4), (2, 2), (4, 2)])
def test_column_parallel_linear(dp, mp):
    """W [out, in] split on out (Megatron column): B splits like W's out, A stays whole."""
    s = lora_strategies(((dp, 1), (mp, 1)))
    assert s["lora_a_matmul"] == ((dp, 1), (1, 1))
    assert s["lora_b_matmul"] == ((dp, 1), (mp, 1))
    assert s["lora_mul"] == ((dp, mp), ()) and s["delta_add"] == ((dp, mp), (dp, mp))


@pytest.mark.parametrize("dp,mp", [(1, 2), (1, 4), (2, 4)])
def test_row_parallel_linear(dp, mp):
    """W [out, in] split on in (Megatron row): A splits like W's in, B stays whole."""
    s = lora_strategies(((dp, mp), (1, mp)))
    assert s["lora_dropout"] == ((dp, mp),)
    assert s["lora_a_matmul"] == ((dp, mp), (1, mp))
    assert s["lora_b_matmul"] == ((dp, 1), (1, 1))


def test_weight_stored_in_out():
    s = lora_strategies(((2, 4), (4, 1)), transpose_b=False)  # W [in, out] split (k, o)
    assert s["lora_a_matmul"] == ((2, 4), (1, 4)) and s["lora_b_matmul"] == ((2, 1), (1, 1))
    with pytest.raises(ValueError, match="x's in split 2 differs from the weight's 4"):
        lora_strategies(((1, 2), (1, 4)))


def test_strategy_read_from_a_sharded_mindformers_linear():
    base = Linear(64, 32, compute_dtype=ms.float32)
    base.matmul.shard(((2, 1), (4, 1)))  # what Llama's attention does for wq under dp=2, mp=4
    assert base_strategy(base) == ((2, 1), (4, 1))
    layer = LoraLinear(base, _spec())
    strategies = shard_adapter(layer, base, force=True)
    assert strategies["lora_b_matmul"] == ((2, 1), (4, 1))
    assert tuple(map(tuple, layer.lora_a_matmul.in_strategy)) == ((2, 1), (1, 1))
    assert tuple(map(tuple, layer.lora_b_matmul.in_strategy)) == ((2, 1), (4, 1))


def test_unsharded_base_and_stand_alone_mode_leave_ops_alone():
    base = Linear(64, 32, compute_dtype=ms.float32)
    layer = LoraLinear(base, _spec())
    assert base_strategy(base) is None and shard_adapter(layer, base, force=True) is None
    base.matmul.shard(((2, 1), (4, 1)))
    assert shard_adapter(layer, base) is None  # not in auto parallel: nothing set
    assert getattr(layer.lora_b_matmul, "in_strategy", None) is None


def test_mcore_layers_strategy_from_their_config():
    from mindformers.parallel_core.transformer_config import TransformerConfig
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear)
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype="float32",
                            compute_dtype="float32")
    column = ColumnParallelLinear(64, 32, config=cfg, init_method=cfg.init_method, bias=False)
    row = RowParallelLinear(64, 32, config=cfg, init_method=cfg.init_method, bias=False)
    # built stand-alone (tp > 1 needs communication groups); the strategy reads the config
    cfg.data_parallel_size, cfg.tensor_model_parallel_size = 2, 4
    assert base_strategy(column) == ((2, 1), (4, 1))
    assert base_strategy(row) == ((2, 4), (1, 4))
