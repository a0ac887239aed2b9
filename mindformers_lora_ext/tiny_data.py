"""A tiny learnable causal-LM dataset, written as a MindRecord for MindFormers' MindDataset.

Each row counts upwards from a random start through the token ids ``[first_id, vocab_size)``
and wraps around, so the next token is a fixed function of the current one: a task a LoRA
on the attention projections of a random tiny Llama can learn in a few dozen steps.
"""
import os

import numpy as np


def write_tiny_dataset(path: str, num_rows: int, seq_length: int, vocab_size: int,
                       seed: int = 0, first_id: int = 3, skip_rows: int = 0) -> str:
    """Write ``num_rows`` rows of ``input_ids`` and ``labels`` (int32, length seq_length + 1).

    Ids 0-2 (pad, bos, eos in Llama configs) are never used. ``skip_rows``: leave out the
    first rows the same seed would give (the rest of a run, for resume tests). Returns ``path``.
    """
    from mindspore.mindrecord import FileWriter  # pylint: disable=import-outside-toplevel

    if vocab_size <= first_id + 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no ids above {first_id}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    span = vocab_size - first_id
    rng = np.random.default_rng(seed)
    writer = FileWriter(path, shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]},
                       "labels": {"type": "int32", "shape": [-1]}}, "tiny_counting")
    rows = []
    for start in rng.integers(0, span, size=skip_rows + num_rows)[skip_rows:]:
        ids = (first_id + (start + np.arange(seq_length + 1)) % span).astype(np.int32)
        rows.append({"input_ids": ids, "labels": ids.copy()})
    writer.write_raw_data(rows)
    writer.commit()
    return path
