"""Shard strategies of the LoRA ops under (semi-)auto parallel, derived from the base linear.

The base computes x [N, in] @ W^T with an input strategy ((dp, k), W's split) where W [out, in]
is split (o, k) (``transpose_b``) or W [in, out] is split (k, o). The adapter follows it, as
MindFormers' own lora adapter does for mindpet's LoRADense:

- ``lora_dropout``  drop(x):          ((dp, k),)
- ``lora_a_matmul`` x @ A^T, A [r, in]: ((dp, k), (1, k))   rank whole, in split like W's in
- ``lora_b_matmul`` h @ B^T, B [out, r]: ((dp, 1), (o, 1))  out split like W's out
- ``lora_mul``      (...) * s:         ((dp, o), ())
- ``delta_add``     base + delta:      ((dp, o), (dp, o))

mcore layers carry layouts on their Morph instead of a MatMul strategy; their equivalent
tuple strategy comes from the TransformerConfig: column parallel ((dp, 1), (tp, 1)), row
parallel ((dp, tp), (1, tp)), with dp = data_parallel_size (times context parallel).
Only primitives take a strategy (the two MatMuls; a dropout cell with a ``dropout`` primitive):
our layers' ``nn.Dropout`` (a functional op in MindSpore 2.9) and the elementwise scale/add keep
the strategies MindSpore derives. None of this runs on more than one device here: it is
unit-tested for mp = 2/4 and dp x mp.
"""
from typing import Dict, Optional, Tuple

from mindspore.ops.primitive import Primitive

Strategy = Tuple[tuple, ...]


def lora_strategies(base_strategy: Strategy, transpose_b: bool = True) -> Dict[str, Strategy]:
    """Strategies of the adapter's ops (by attribute name) for a base MatMul ``base_strategy``."""
    x_split, w_split = base_strategy
    out_split, in_split = (w_split[0], w_split[1]) if transpose_b else (w_split[1], w_split[0])
    dp, k = x_split
    if k != in_split:
        raise ValueError(f"base strategy {base_strategy}: x's in split {k} differs from the "
                         f"weight's {in_split}")
    return {
        "lora_dropout": ((dp, k),),
        "lora_a_matmul": ((dp, k), (1, k)),
        "lora_b_matmul": ((dp, 1), (out_split, 1)),
        "lora_mul": ((dp, out_split), ()),
        "delta_add": ((dp, out_split), (dp, out_split)),
    }


def base_strategy(base) -> Optional[Strategy]:
    """The base linear's MatMul input strategy, or None when it has none (not sharded)."""
    from mindformers_lora_ext.tuners.base_layer import parallel_linear_types  # pylint: disable=import-outside-toplevel
    column, row = parallel_linear_types()
    if isinstance(base, (column, row)):
        config = base.config
        dp = getattr(config, "data_parallel_size", 1) * getattr(config, "context_parallel_size", 1)
        tp = getattr(config, "tensor_model_parallel_size", 1)
        return ((dp, 1), (tp, 1)) if isinstance(base, column) else ((dp, tp), (1, tp))
    strategy = getattr(getattr(base, "matmul", None), "in_strategy", None)
    return tuple(tuple(s) for s in strategy) if strategy else None


def in_auto_parallel() -> bool:
    from mindspore import context  # pylint: disable=import-outside-toplevel
    from mindspore.context import ParallelMode  # pylint: disable=import-outside-toplevel
    return context.get_auto_parallel_context("parallel_mode") in (
        ParallelMode.SEMI_AUTO_PARALLEL, ParallelMode.AUTO_PARALLEL)


def shard_adapter(layer, base, force: bool = False) -> Optional[Dict[str, Strategy]]:
    """Set the adapter ops' strategies on ``layer`` from ``base`` (only under auto parallel,
    unless ``force``); returns them, or None when the base is not sharded."""
    strategy = base_strategy(base)
    if strategy is None or not (force or in_auto_parallel()):
        return None
    strategies = lora_strategies(strategy, getattr(base, "transpose_b", True))
    for name, value in strategies.items():
        op = getattr(layer, name, None)
        if isinstance(op, Primitive) or hasattr(op, "dropout"):  # MatMul, or MindFormers' Dropout
            op.shard(value)
        # other ops (nn.Dropout, MindSpore's functional dropout; Python * and +) keep the
        # strategies MindSpore derives for them
    return strategies
