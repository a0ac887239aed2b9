"""Export and import time and peak memory of an 8B-shaped adapter, HF PEFT layout vs MindFormers'
own names, side by side in one run.

The adapter: r=16 LoRA on every linear cell of a Qwen3-8B-shaped mcore model (36 layers, hidden
4096, 32 query / 8 kv heads of 128, FFN 12288: per layer ``linear_qkv`` [6144, 4096],
``linear_proj`` [4096, 4096], ``linear_fc1`` [24576, 4096], ``linear_fc2`` [4096, 12288]),
synthetic float32 tensors; no model weights are made. The fused row layouts are MindFormers' own:
``hf_map.for_network`` on one Qwen3 layer of that shape built under ``no_init_parameters`` (so
no weight memory), the same map for each of the 36 layers.

Timed (best of ``--repeat``), each with tracemalloc's peak of Python/numpy allocations:
* ``export``: ``to_peft_tensors`` (split q/k/v and gate/up rows) + ``write_adapter_dir``;
* ``import``: ``read_adapter_dir`` + ``from_peft_tensors`` (fuse back), checked bit-exact;
* ``plain write`` / ``plain read``: the same tensors under MindFormers' names, no split or fuse
  (what a PEFT-unaware save costs): the ratios show what the HF layout adds.

    python benchmarks/adapter_export_8b.py [--repeat 3] [--dir /tmp/adapter_bench]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
LAYERS, HIDDEN, HEADS, KV, HEAD_DIM, FFN, RANK = 36, 4096, 32, 8, 128, 12288, 16


def layer_map():
    """The HfMap of one 8B-shaped Qwen3 layer, from MindFormers' converter (no weights made)."""
    # pylint: disable=import-outside-toplevel
    from mindspore.nn.utils import no_init_parameters
    from conftest import mcore_mode
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
    from mindformers_lora_ext import hf_map
    with mcore_mode(), no_init_parameters():
        config = Qwen3Config(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                             num_key_value_heads=KV, head_dim=HEAD_DIM, intermediate_size=FFN, vocab_size=1024,
                             seq_length=128, max_position_embeddings=128)
        net = TrainingQwen3ForCausalLM(config)
        shapes = {"self_attention.linear_qkv": (HEADS + 2 * KV) * HEAD_DIM, "self_attention.linear_proj": HIDDEN,
                  "mlp.linear_fc1": 2 * FFN, "mlp.linear_fc2": HIDDEN}
        return hf_map.for_network(net, {f"decoder.layers.0.{k}": (0, v) for k, v in shapes.items()}), shapes


def full_map(one):
    from mindformers_lora_ext.hf_map import CellMap, HfMap  # pylint: disable=import-outside-toplevel
    cells = {}
    for layer in range(LAYERS):
        for name, cell in one.cells.items():
            cells[name.replace("layers.0.", f"layers.{layer}.")] = CellMap(
                tuple(m.replace("layers.0.", f"layers.{layer}.") for m in cell.modules), cell.rows)
    return HfMap(cells, one.family)


def synthetic_adapter(shapes):
    rng = np.random.default_rng(0)
    inputs = {"self_attention.linear_qkv": HIDDEN, "self_attention.linear_proj": HIDDEN,
              "mlp.linear_fc1": HIDDEN, "mlp.linear_fc2": FFN}
    arrays = {}
    for layer in range(LAYERS):
        for cell, out in shapes.items():
            prefix = f"decoder.layers.{layer}.{cell}"
            arrays[f"{prefix}.lora_A"] = rng.standard_normal((RANK, inputs[cell]), dtype=np.float32)
            arrays[f"{prefix}.lora_B"] = rng.standard_normal((out, RANK), dtype=np.float32)
    return arrays


def measure(func, repeat):
    best, peak, result = float("inf"), 0, None
    for _ in range(repeat):
        tracemalloc.start()
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return best, peak, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext import adapter_files, peft_format
    from mindformers_lora_ext.config import LoraExtConfig
    names, shapes = layer_map()
    names = full_map(names)
    arrays = synthetic_adapter(shapes)
    size = sum(a.nbytes for a in arrays.values())
    pet = LoraExtConfig(lora_rank=RANK, lora_alpha=32, target_modules=["linear_qkv", "linear_proj", "linear_fc1",
                                                                       "linear_fc2"])
    scratch = args.dir or tempfile.mkdtemp(prefix="adapter_bench-")
    peft_dir, plain_dir = os.path.join(scratch, "peft"), os.path.join(scratch, "plain")
    config = peft_format.peft_config_dict(pet, names)
    rows = [("export (split + write)", lambda: adapter_files.write_adapter_dir(
        peft_dir, peft_format.to_peft_tensors(arrays, pet, names), config)),
            ("plain write", lambda: adapter_files.write_adapter_dir(plain_dir, arrays, {"peft_type": "LORA"}))]
    results = {label: measure(func, args.repeat) for label, func in rows}

    def load_peft():
        _, tensors = adapter_files.read_adapter_dir(peft_dir)
        return peft_format.from_peft_tensors(tensors, pet, names)
    results["import (read + fuse)"] = measure(load_peft, args.repeat)
    results["plain read"] = measure(lambda: adapter_files.read_adapter_dir(plain_dir)[1], args.repeat)
    back = results["import (read + fuse)"][2]
    exact = sorted(back) == sorted(arrays) and all(np.array_equal(back[k], v) for k, v in arrays.items())
    files = len(adapter_files.read_adapter_dir(peft_dir)[1])
    print(f"8B-shaped Qwen3 adapter: {LAYERS} layers x 4 cells, r={RANK}, {len(arrays)} MindFormers tensors "
          f"-> {files} PEFT tensors, {size / 2**20:.1f} MiB float32; repeat {args.repeat}, {os.cpu_count()} CPUs")
    # tracemalloc sees numpy's buffers, not safetensors' own (Rust) ones: peaks are in adapter sizes
    print(f"{'step':<24}{'best s':>9}{'peak MiB':>10}{'x adapter':>11}")
    for label, (seconds, peak, _) in results.items():
        print(f"{label:<24}{seconds:>9.3f}{peak / 2**20:>10.1f}{peak / size:>11.2f}")
    ratio = lambda a, b: results[a][0] / results[b][0]  # noqa: E731
    print(f"time ratios: export / plain write {ratio('export (split + write)', 'plain write'):.2f}x, "
          f"import / plain read {ratio('import (read + fuse)', 'plain read'):.2f}x")
    print(f"round trip bit-exact: {exact}; sidecar {os.path.getsize(os.path.join(peft_dir, adapter_files.META_NAME))}"
          f" bytes (the name map)")
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
