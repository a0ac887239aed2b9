"""Shard strategies of the adapter ops under (semi-)auto parallel, derived from the base linear.

The base computes x [N, in] @ W^T with an input strategy ((dp, k), W's split) where W [out, in]
is split (o, k) (``transpose_b``) or W [in, out] is split (k, o). :func:`base_splits` reads
(dp, k, o) from it; every table below is in those terms. Only primitives take a strategy (the
MatMuls and slices named here; a dropout cell with a ``dropout`` primitive): ``nn.Dropout`` (a
functional op in MindSpore 2.9), the elementwise Python ``*`` / ``+`` and the reshapes keep the
strategies MindSpore derives. None of this runs on more than one device here: it is unit-tested
for mp = 2/4 and dp x mp (tests/test_sharding.py, tests/test_sharding_additive.py).

LoRA (:func:`lora_strategies`), as MindFormers' own lora adapter does for mindpet's LoRADense:

- ``lora_dropout``  drop(x):          ((dp, k),)
- ``lora_a_matmul`` x @ A^T, A [r, in]: ((dp, k), (1, k))   rank whole, in split like W's in
- ``lora_b_matmul`` h @ B^T, B [out, r]: ((dp, 1), (o, 1))  out split like W's out
- ``lora_mul``      (...) * s:         ((dp, o), ())
- ``delta_add``     base + delta:      ((dp, o), (dp, o))

AdaLoRA (:func:`adalora_strategies`): x @ (Q * lambda)^T @ P^T has LoRA's shape, Q = ``lora_A``
[r, in], P = ``lora_B`` [out, r]: ``lora_a_matmul`` and ``lora_b_matmul`` as LoRA.

LoHa (:func:`loha_strategies`), either path of ``LohaLinear.update``:

- factored, dW = U V with U [out, r^2], V [r^2, in] (LoRA's shape at rank r^2):
  ``loha_in_matmul`` x @ V^T ((dp, k), (1, k)); ``loha_out_matmul`` h @ U^T ((dp, 1), (o, 1))
- materialised (tiny cells): ``hada_w1_matmul`` / ``hada_w2_matmul`` w*_a [out, r] @ w*_b
  [r, in] ((o, 1), (1, k)), so dW [out, in] is split (o, k) like W; ``loha_delta_matmul``
  x @ dW^T ((dp, k), (o, k)), the base's own strategy

LoKr (:func:`lokr_strategies`; in = in_m * in_n, out = out_l * out_k, w1 [out_l, in_m], w2
[out_k, in_n]). in_m and out_l are the leading factors, so a contiguous split of in (of out)
by k (by o) is a split of in_m (of out_l) when it divides it:

- ``lokr_w2_matmul`` x [N * in_m, in_n] @ w2^T: ((dp, 1), (1, 1)) when k = 1. With k > 1 it is
  left to MindSpore: the reshape merges N (split dp) with in_m (split k), which no split of the
  merged dim reproduces, so no strategy is consistent with the base's
- ``lokr_w1_matmul`` t [N * out_k, in_m] @ w1^T: ((dp, k'), (o', k')), the base's strategy
  with k' = k if k divides in_m else 1, o' = o if o divides out_l else 1
- ``lokr_w1_ab_matmul`` w1_a [out_l, r] @ w1_b [r, in_m]: ((o', 1), (1, k')), w1 as above
- ``lokr_w2_ab_matmul`` w2_a [out_k, r] @ w2_b [r, in_n]: ((1, 1), (1, 1)), w2 is used whole

VeRA (:func:`vera_strategies`): A [r, in_max] and B [out_max, r] are single Parameters shared by
every VeRA cell, and MindSpore requires all users of a Parameter to see one layout. Cells whose
bases split differently (column- and row-parallel targets) would ask for different splits of
A (and of B), so the projections are kept whole in every cell, the one layout independent of
the base: ``vera_a_slice`` / ``vera_b_slice`` (A[:, :in], B[:out], only where a cell is smaller
than the max) ((1, 1),); ``vera_a_matmul`` x @ A^T ((dp, 1), (1, 1)); ``vera_b_matmul``
h @ B^T ((dp, 1), (1, 1)). The cost: a row-split cell gathers x over k, and a column-split cell
computes its full output before MindSpore slices it to the base's split.

mcore layers carry layouts on their Morph instead of a MatMul strategy; their equivalent
tuple strategy comes from the TransformerConfig: column parallel ((dp, 1), (tp, 1)), row
parallel ((dp, tp), (1, tp)), with dp = data_parallel_size (times context parallel).
"""
from typing import Callable, Dict, Optional, Tuple

from mindspore.ops.primitive import Primitive

Strategy = Tuple[tuple, ...]
# (base strategy, transpose_b) -> the adapter ops' strategies by attribute name
Rule = Callable[[Strategy, bool], Dict[str, Strategy]]

WHOLE = ((1, 1), (1, 1))


def base_splits(base_strategy: Strategy, transpose_b: bool = True) -> Tuple[int, int, int]:
    """(dp, k, o): the splits of the base's batch, input and output dimensions."""
    x_split, w_split = base_strategy
    out_split, in_split = (w_split[0], w_split[1]) if transpose_b else (w_split[1], w_split[0])
    dp, k = x_split
    if k != in_split:
        raise ValueError(f"base strategy {base_strategy}: x's in split {k} differs from the "
                         f"weight's {in_split}")
    return dp, k, out_split


def lora_strategies(base_strategy: Strategy, transpose_b: bool = True) -> Dict[str, Strategy]:
    """Strategies of the LoRA adapter's ops (by attribute name) for a base MatMul ``base_strategy``."""
    dp, k, out_split = base_splits(base_strategy, transpose_b)
    return {
        "lora_dropout": ((dp, k),),
        "lora_a_matmul": ((dp, k), (1, k)),
        "lora_b_matmul": ((dp, 1), (out_split, 1)),
        "lora_mul": ((dp, out_split), ()),
        "delta_add": ((dp, out_split), (dp, out_split)),
    }


def adalora_strategies(base_strategy: Strategy, transpose_b: bool = True) -> Dict[str, Strategy]:
    """AdaLoRA's two MatMuls: LoRA's, since P diag(lambda) Q has LoRA's shape."""
    lora = lora_strategies(base_strategy, transpose_b)
    return {name: lora[name] for name in ("lora_a_matmul", "lora_b_matmul")}


def loha_strategies(base_strategy: Strategy, transpose_b: bool = True) -> Dict[str, Strategy]:
    """LoHa's MatMuls, both paths (factored U V at rank r^2; materialised dW)."""
    dp, k, out_split = base_splits(base_strategy, transpose_b)
    lora = lora_strategies(base_strategy, transpose_b)
    factor = ((out_split, 1), (1, k))  # [out, r] @ [r, in] -> dW split (o, k) like W
    return {
        "loha_in_matmul": lora["lora_a_matmul"],
        "loha_out_matmul": lora["lora_b_matmul"],
        "hada_w1_matmul": factor,
        "hada_w2_matmul": factor,
        "loha_delta_matmul": ((dp, k), (out_split, k)),
    }


def lokr_strategies(base_strategy: Strategy, transpose_b: bool = True, *, in_m: int,
                    out_l: int) -> Dict[str, Strategy]:
    """LoKr's MatMuls for w1 [out_l, in_m] (the leading factors of out and in); a name that is
    absent is left to MindSpore (see the module docstring)."""
    dp, k, out_split = base_splits(base_strategy, transpose_b)
    k_1 = k if in_m % k == 0 else 1
    o_1 = out_split if out_l % out_split == 0 else 1
    strategies = {
        "lokr_w1_matmul": ((dp, k_1), (o_1, k_1)),
        "lokr_w1_ab_matmul": ((o_1, 1), (1, k_1)),
        "lokr_w2_ab_matmul": WHOLE,
    }
    if k == 1:
        strategies["lokr_w2_matmul"] = ((dp, 1), (1, 1))
    return strategies


def vera_strategies(base_strategy: Strategy, transpose_b: bool = True) -> Dict[str, Strategy]:
    """VeRA's ops: the shared projections whole in every cell, whatever the base's split."""
    dp, _, _ = base_splits(base_strategy, transpose_b)
    return {
        "vera_a_slice": ((1, 1),),
        "vera_b_slice": ((1, 1),),
        "vera_a_matmul": ((dp, 1), (1, 1)),
        "vera_b_matmul": ((dp, 1), (1, 1)),
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


def shard_adapter(layer, base, force: bool = False, rule: Rule = lora_strategies
                  ) -> Optional[Dict[str, Strategy]]:
    """Set the strategies ``rule`` gives for ``base``'s on ``layer``'s ops of those names (only
    under auto parallel, unless ``force``); returns them, or None when the base is not sharded.
    Names the layer lacks (another path of the method) are skipped."""
    strategy = base_strategy(base)
    if strategy is None or not (force or in_auto_parallel()):
        return None
    strategies = rule(strategy, getattr(base, "transpose_b", True))
    for name, value in strategies.items():
        op = getattr(layer, name, None)
        if isinstance(op, Primitive) or hasattr(op, "dropout"):  # MatMul, or MindFormers' Dropout
            op.shard(value)
        # other ops (nn.Dropout, MindSpore's functional dropout; Python * and +) keep the
        # strategies MindSpore derives for them
    return strategies
