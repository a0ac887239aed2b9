"""Inference forward cost: base model vs adapter model (unmerged) vs adapter model merged.

One run, one process, the small Llama (hidden 512, 4 layers, seq 256, batch 2) in eval mode,
lora_ext (fused kernel, and the composition) / dora rank 8 on wq/wk/wv/wo. "merged" is
``pet_config.merge_on_load: true``: the adapters fold at ``set_train(False)``, before the first
forward, so the compiled graph skips them (what a merged checkpoint served as a plain model gives).
Prints median ms per forward and ratios to the base model.

    python benchmarks/merged_forward.py [--steps 20]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = dict(seq_length=256, hidden_size=512, num_layers=4, num_heads=8, vocab_size=128, batch_size=2)


def _median_ms(net, ids, steps):
    net.set_train(False)
    net(ids)  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = net(ids)
        (out[0] if isinstance(out, tuple) else out).asnumpy()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.chdir(tempfile.mkdtemp(prefix="merged_forward_"))
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=0, device_target="CPU")
    from mindformers.models.build_model import build_model, build_network  # pylint: disable=import-outside-toplevel
    from mindformers.tools.register import MindFormerConfig  # pylint: disable=import-outside-toplevel
    from mindformers.tools.register.config import DictConfig  # pylint: disable=import-outside-toplevel

    def config(pet_type=None, **extra):
        cfg = MindFormerConfig(os.path.join(ROOT, "configs", "tiny", "lora_ext.yaml"))
        cfg.model.model_config.update(DIMS)
        if pet_type is None:
            del cfg.model.model_config["pet_config"]
        else:
            cfg.model.model_config.pet_config = DictConfig(pet_type=pet_type, lora_rank=8, lora_alpha=16,
                                                           target_modules=".*wq|.*wk|.*wv|.*wo", **extra)
        return cfg.model

    ids = ms.Tensor(np.random.default_rng(0).integers(3, 128, (2, DIMS["seq_length"])), ms.int32)
    rows = {"base": _median_ms(build_model(config()), ids, args.steps)}
    rows["lora_ext composition"] = _median_ms(build_network(config("lora_ext", use_fused_kernel=False)),
                                              ids, args.steps)
    for pet_type in ("lora_ext", "dora"):
        rows[pet_type] = _median_ms(build_network(config(pet_type)), ids, args.steps)
        merged = build_network(config(pet_type, merge_on_load=True))
        rows[f"{pet_type} merged"] = _median_ms(merged, ids, args.steps)
        assert all(layer.merged for layer in merged.network._adapter_layers.values())  # pylint: disable=protected-access
    print(f"{'model':<16} {'ms/forward':>10} {'vs base':>8}")
    for name, value in rows.items():
        print(f"{name:<16} {value:>10.2f} {value / rows['base']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
