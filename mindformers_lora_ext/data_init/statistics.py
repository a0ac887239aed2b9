"""Statistics passes over calibration batches, in graph mode: what data-driven inits read.

* Input statistics: during a pass each target adapter layer carries an :class:`InputStatistics`
  cell (``AdoptedLinear.input_statistics``) that adds its input rows to frozen float32 buffers,
  by ``F.assign_add`` inside the compiled forward graph. ``moments`` (EVA): sum m x x^T, sum m x,
  sum m, m the token's mask weight; ``covariance`` (CorDA): per forward call, X = the rows / |max X|,
  sum X^T X and the number of calls.
* Gradients (LoRA-GA): :class:`GradientSum` adds dL/dW of the target base weights (frozen, but
  differentiated all the same) to float32 buffers.

Token masks reach the layers through one shared frozen Parameter per row order, set before
each batch: a layer's input rows are the batch's tokens flattened batch-major for legacy models
([B, S, h] or [B*S, h]) and sequence-major for mcore ones ([S, B, h]); the mask of token (b, s)
is 0 for padding (``input_ids == pad_token_id``) and, with a label mask, for tokens whose own
label equals ``label_mask_value`` (HF PEFT's rule: labels aligned with input_ids; mcore datasets
hold labels already shifted by one, so token s reads label s - 1 there).

Under data parallel the buffers are summed over the ranks (``AllReduce``) before they are read,
so every rank computes the same initialisation. The buffers are removed from the layers when the
pass ends; the forward graph compiled for the pass is not reused for training.
"""
import math
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.ops import functional as F
from mindspore.ops import operations as P

MOMENTS, COVARIANCE = "moments", "covariance"


class TokenMask:
    """The shared mask Parameters, [rows, 1] float32, one per row order."""

    def __init__(self):
        self.batch_major = Parameter(Tensor(np.ones((1, 1), np.float32)), name="data_init.token_mask_bs",
                                     requires_grad=False)
        self.seq_major = Parameter(Tensor(np.ones((1, 1), np.float32)), name="data_init.token_mask_sb",
                                   requires_grad=False)

    def set(self, mask: np.ndarray) -> None:
        """``mask`` [B, S] of 0/1."""
        mask = np.asarray(mask, np.float32)
        self.batch_major.set_data(Tensor(mask.reshape(-1, 1)), slice_shape=True)
        self.seq_major.set_data(Tensor(np.ascontiguousarray(mask.T).reshape(-1, 1)), slice_shape=True)


def token_mask(columns: Dict[str, np.ndarray], seq_length: int, pad_token_id: Optional[int],
               label_mask_value: Optional[int], labels_shifted: bool) -> np.ndarray:
    """[B, seq_length] float32 mask of the tokens a layer sees for one batch (module docstring).
    ``label_mask_value`` None: no label mask."""
    ids = columns.get("input_ids")
    if ids is None:
        raise ValueError(f"the calibration batches have no 'input_ids' column (columns: {sorted(columns)})")
    ids = np.asarray(ids)[:, :seq_length]
    mask = np.ones(ids.shape, bool) if pad_token_id is None else ids != pad_token_id
    labels = columns.get("labels")
    if label_mask_value is not None and labels is not None:
        labels = np.asarray(labels)
        if labels_shifted:  # labels[s] is token s + 1's: token s's own label is labels[s - 1]
            own = np.concatenate([np.full((labels.shape[0], 1), label_mask_value + 1), labels[:, :seq_length - 1]], 1)
        else:
            own = labels[:, :seq_length]
        mask &= own != label_mask_value
    return mask.astype(np.float32)


class InputStatistics(nn.Cell):
    """Accumulates one layer's input rows x2d [N, in] (any float dtype) into float32 buffers.

    ``moments``: ``scatter`` [in, in] += X^T diag(m) X, ``total`` [in] += m^T X, ``count`` [1] += sum m.
    ``covariance``: ``scatter`` += (X / |max X|)^T (X / |max X|), ``count`` [1] += 1.
    """

    def __init__(self, prefix: str, in_channels: int, mode: str, mask: Optional[Parameter] = None,
                 dtype=mstype.float32):
        super().__init__()
        if mode not in (MOMENTS, COVARIANCE):
            raise ValueError(f"statistics mode {mode!r}")
        self.moments = mode == MOMENTS
        self.dtype = dtype
        self.scatter = Parameter(Tensor(np.zeros((in_channels, in_channels), np.float32), dtype),
                                 name=f"{prefix}.data_init_scatter", requires_grad=False)
        self.count = Parameter(Tensor(np.zeros(1, np.float32)), name=f"{prefix}.data_init_count",
                               requires_grad=False)
        if self.moments:
            self.total = Parameter(Tensor(np.zeros(in_channels, np.float32)), name=f"{prefix}.data_init_total",
                                   requires_grad=False)
            self.mask = mask
        self.gram = P.MatMul(transpose_a=True)
        self.cast = P.Cast()

    def rename(self, prefix: str) -> None:
        """Name the buffers ``<prefix>.data_init_*`` (attaching a cell renames its parameters)."""
        for attr, param in self.parameters_and_names(expand=False):
            if param is not getattr(self, "mask", None):
                param.name = f"{prefix}.data_init_{attr}"

    def construct(self, x2d):
        x = self.cast(x2d, mstype.float32)
        if self.moments:
            weighted = x * self.mask
            update = F.assign_add(self.scatter, self.cast(self.gram(weighted, x), self.dtype))
            update = F.depend(update, F.assign_add(self.total, F.reduce_sum(weighted, 0)))
            update = F.depend(update, F.assign_add(self.count, F.reshape(F.reduce_sum(self.mask), (1,))))
        else:
            x = x / F.abs(F.reduce_max(x))
            update = F.assign_add(self.scatter, self.cast(self.gram(x, x), self.dtype))
            update = F.depend(update, F.assign_add(self.count, F.ones((1,), mstype.float32)))
        return F.depend(x2d, update)

    def buffers(self) -> Dict[str, np.ndarray]:
        """The buffers as float32 numpy arrays, by attribute name."""
        names = ("scatter", "total", "count") if self.moments else ("scatter", "count")
        return {name: getattr(self, name).asnumpy().astype(np.float32) for name in names}


class ForwardPass(nn.Cell):
    """``network(*batch)``: the train step's forward, compiled on its own for a pass."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, *batch):
        out = self.network(*batch)
        return out[0] if isinstance(out, tuple) else out


class GradientSum(nn.Cell):
    """``loss = network(*batch)``; buffers[i] += dloss/dweights[i] (float32). Returns the loss."""

    def __init__(self, network, weights: Sequence[Parameter]):
        super().__init__(auto_prefix=False)
        self.forward = ForwardPass(network)
        self.weights = ParameterTuple(list(weights))
        self.sums = ParameterTuple([Parameter(Tensor(np.zeros(w.shape, np.float32)), name=f"{w.name}.lora_ga_grad",
                                              requires_grad=False) for w in weights])
        self.grad = ops.GradOperation(get_by_list=True)
        self.cast = P.Cast()

    def construct(self, *batch):
        loss = self.forward(*batch)
        grads = self.grad(self.forward, self.weights)(*batch)
        done = loss
        for total, grad in zip(self.sums, grads):
            done = F.depend(done, F.assign_add(total, self.cast(grad, mstype.float32)))
        return done

    def buffers(self) -> List[np.ndarray]:
        """The gradient sums as float32 numpy arrays, in ``weights`` order."""
        return [total.asnumpy() for total in self.sums]


def data_parallel_size() -> int:
    """The number of ranks statistics are summed over (1 unless data parallel with > 1 rank)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    if ms.get_auto_parallel_context("parallel_mode") != "data_parallel":
        return 1
    from mindspore.communication import get_group_size  # pylint: disable=import-outside-toplevel
    return int(get_group_size())


def summed_over_ranks(arrays: List[np.ndarray]) -> List[np.ndarray]:
    """Each buffer (float32, as accumulated) summed over the data-parallel ranks, as float64."""
    if data_parallel_size() == 1:
        return [np.asarray(value, np.float64) for value in arrays]
    reduce = P.AllReduce()
    return [reduce(Tensor(np.asarray(value, np.float32))).asnumpy().astype(np.float64) for value in arrays]


class Progress:
    """Prints ``<label>: batch i/n, t s, ~r s left`` lines (every batch up to 20, else ~20 lines;
    the time left from the batches after the first, which compiles)."""

    def __init__(self, label: str, total: int, printer: Callable[[str], None]):
        self.label, self.total, self.printer = label, total, printer
        self.start = time.perf_counter()
        self.every = max(1, math.ceil(total / 20))
        self.first_batch_s = None

    def step(self, done: int) -> None:
        elapsed = time.perf_counter() - self.start
        if done == 1:
            self.first_batch_s = elapsed  # includes compiling the pass's graph
            self.printer(f"{self.label}: batch 1/{self.total}, {elapsed:.1f} s (with the graph compile)")
            return
        if done % self.every and done != self.total:
            return
        rate = (elapsed - self.first_batch_s) / (done - 1)
        self.printer(f"{self.label}: batch {done}/{self.total}, {elapsed:.1f} s, "
                     f"~{rate * (self.total - done):.1f} s left")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def column_arrays(names: Sequence[str], batch: Iterable) -> Dict[str, np.ndarray]:
    """A dataset row tuple as {column name: numpy array}."""
    return {name: value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
            for name, value in zip(names, batch)}
