"""Trainable token rows (HF PEFT's ``trainable_token_indices``): a few rows of an embedding table
train, the rest stays frozen and bit-identical.

The embedding cell is kept and called as it is (its own gather, layouts and parallel morphs); the
rows of the chosen token ids in its output are then replaced by ``trainable_tokens_delta`` [n, h]
(PEFT's name: it holds the rows' values, starting at the table's own rows, not a difference):
out[t] = delta[pos(t)] if t is one of the ids, else table[t], selected exactly (no arithmetic on
the frozen rows). Only delta gets gradients; adapter files hold it alone
(``<hf embedding>.token_adapter.trainable_tokens_delta``), and merging writes its rows into the
table (unmerge puts the original rows back).

Supported: legacy Llama's ``LlamaEmbedding`` (``embedding_weight``), mcore
``VocabParallelEmbedding`` and ``nn.Embedding`` (``weight`` / ``embedding_table``), with the table not
tied to an output head (PEFT updates a tied head too; refused here rather than trained apart).
"""
from typing import Dict, List, Sequence

import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from mindformers_lora_ext.config import KEY_PREFIX
from mindformers_lora_ext.tuners.base_layer import param_array, to_numpy
from mindformers_lora_ext.tuners.lora_init import FromBase
from mindformers_lora_ext import _boot

# embedding cell attribute holding the [vocab, h] table, by cell type name
TABLE_ATTRS = ("embedding_weight", "weight", "embedding_table")


def embedding_types() -> tuple:
    """Embedding cell types whose rows can train (imported lazily)."""
    # pylint: disable=import-outside-toplevel
    from mindformers.models.llama.llama_layer import LlamaEmbedding
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import VocabParallelEmbedding
    return (LlamaEmbedding, VocabParallelEmbedding, nn.Embedding)


def table_of(cell) -> Parameter:
    """The [vocab, h] table Parameter of an embedding cell."""
    for attr in TABLE_ATTRS:
        table = getattr(cell, attr, None)
        if isinstance(table, Parameter) and len(table.shape) == 2:
            return table
    raise TypeError(f"{type(cell).__name__} has no 2-D table ({', '.join(TABLE_ATTRS)})")


def input_embedding(network) -> str:
    """The name of the network's one embedding cell (the list form of
    ``trainable_token_indices``); raises if there is none or several."""
    found = [name for name, cell in network.cells_and_names() if name and isinstance(cell, embedding_types())]
    if len(found) != 1:
        raise ValueError(f"{KEY_PREFIX}.trainable_token_indices as a list needs one embedding cell, "
                         f"{type(network).__name__} has {len(found)} ({found}): name it, "
                         f"{{<embedding cell>: [ids]}}")
    return found[0]


def check_not_tied(network, table: Parameter, name: str) -> None:
    """Refuse a table another cell also holds (an output head tied to the embeddings)."""
    for cell_name, cell in network.cells_and_names():
        if cell_name == name or cell_name.startswith(name + "."):
            continue
        if any(param is table for _, param in cell.parameters_and_names(expand=False)):
            raise ValueError(f"{KEY_PREFIX}.trainable_token_indices: the table of {name!r} is also "
                             f"{cell_name!r}'s (tie_word_embeddings?); trainable rows of a tied table are "
                             f"not supported (HF PEFT updates the tied head too)")


class TrainableTokens(nn.Cell):
    """Embedding cell ``base`` with rows ``token_indices`` trainable (module docstring).

    ``construct(input_ids)`` -> the base's output ([..., h]) with those tokens' rows taken from
    ``trainable_tokens_delta`` [n, h] (the table's dtype). ``merged``: the rows live in the table.
    """

    def __init__(self, base, token_indices: Sequence[int]):
        super().__init__(auto_prefix=False)
        table = table_of(base)
        vocab, hidden = table.shape
        bad = [i for i in token_indices if i >= vocab]
        if bad:
            raise ValueError(f"{KEY_PREFIX}.trainable_token_indices: token id(s) {bad} are not rows of the "
                             f"embedding table ({vocab} rows)")
        self.insert_child_to_cell("base_layer", base)  # keeps the table's name
        self.table = table
        self.token_indices: List[int] = list(token_indices)
        count = len(self.token_indices)
        rows = np.asarray(self.token_indices, np.int64)
        # materialised with the table (after a checkpoint loaded under no_init_parameters)
        self.trainable_tokens_delta = Parameter(
            initializer(FromBase(lambda: to_numpy(self.table)[rows]), [count, hidden], table.dtype),
            name="trainable_tokens_delta")
        positions = np.full(vocab, count, np.int32)
        positions[rows] = np.arange(count, dtype=np.int32)
        self.positions = Tensor(positions)
        self.padding_row = Tensor(np.zeros((1, hidden), np.float32))
        self.hidden = hidden
        self.count = count
        # the base cells gather from the table: their output has its dtype (a constant here, since
        # graph mode reads an mcore embedding Morph's output dtype as the ids' int32)
        self.table_dtype = table.dtype
        self.merged = False
        self._original = None  # the table's rows before merge()
        self.gather = P.Gather()
        self.concat = P.Concat()
        self.reshape = P.Reshape()
        self.cast = P.Cast()
        self.shape = P.Shape()
        self.less = P.Less()
        self.select = P.Select()

    def construct(self, input_ids):
        # also after merge(): the selected rows then equal the table's, so graphs compiled either
        # side of a merge stay right
        out = self.base_layer(input_ids)
        flat = self.reshape(out, (-1, self.hidden))
        pos = self.gather(self.positions, self.reshape(input_ids, (-1,)), 0)
        rows = self.concat((self.trainable_tokens_delta, self.cast(self.padding_row, self.table_dtype)))
        picked = self.gather(rows, pos, 0)
        hit = F.broadcast_to(self.reshape(self.less(pos, self.count), (-1, 1)), self.shape(flat))
        return self.reshape(self.select(hit, picked, flat), self.shape(out))

    def name_parameters(self, prefix: str) -> None:
        self.trainable_tokens_delta.name = f"{prefix}.trainable_tokens_delta"

    def adapter_parameters(self) -> list:
        return [self.trainable_tokens_delta]

    def merge(self) -> None:
        """Write the trained rows into the table."""
        if self.merged:
            raise RuntimeError("trainable tokens are already merged")
        table = param_array(self.table)
        self._original = table[self.token_indices].copy()
        self.table.set_data(Tensor(merged_table(table, param_array(self.trainable_tokens_delta), self.token_indices),
                                   self.table.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Put the table's original rows back."""
        if not self.merged:
            raise RuntimeError("trainable tokens are not merged")
        self.table.set_data(Tensor(merged_table(param_array(self.table), self._original, self.token_indices),
                                   self.table.dtype))
        self.merged = False


def merged_table(table: np.ndarray, delta: np.ndarray, token_indices: Sequence[int]) -> np.ndarray:
    """A checkpoint's table with the rows ``token_indices`` replaced by ``delta``."""
    out = np.array(table, copy=True)
    out[list(token_indices)] = delta.astype(out.dtype)
    return out


def token_ids_of(value, cell: str) -> List[int]:
    """The ids ``trainable_token_indices`` gives embedding ``cell`` (a list: the one embedding)."""
    if isinstance(value, list):
        return value
    for key, ids in (value or {}).items():
        if cell == key or cell.endswith("." + key):
            return ids
    raise KeyError(f"trainable_token_indices = {value!r} names no ids for {cell!r}")


def resolve_targets(network, value) -> Dict[str, List[int]]:
    """``trainable_token_indices`` (list or {cell suffix: ids}) -> {embedding cell name: ids}."""
    # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.tuners.targeting import find_cells
    if isinstance(value, list):
        return {input_embedding(network): value}
    out = {}
    for suffix, ids in value.items():
        for name, cell in find_cells(network, "trainable_token_indices", [suffix]).items():
            if not isinstance(cell, embedding_types()):
                raise ValueError(f"{KEY_PREFIX}.trainable_token_indices names {name!r}, a "
                                 f"{type(cell).__name__}, not an embedding cell "
                                 f"({', '.join(t.__name__ for t in embedding_types())})")
            out[name] = ids
    return out


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
