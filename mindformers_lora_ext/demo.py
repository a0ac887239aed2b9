"""``mindformers-lora demo``: fine-tune a tiny Llama on CPU with a shipped tiny config."""
import glob
import json
import os

from mindformers_lora_ext.tiny_data import write_tiny_dataset

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Installed: configs copied into the package at build time. Editable/source: the repo's configs.
_CONFIG_DIRS = (os.path.join(_PACKAGE_DIR, "configs"),
                os.path.join(os.path.dirname(_PACKAGE_DIR), "configs", "tiny"))


def tiny_configs() -> dict:
    """Config name (a pet type, or ``loraplus``) -> path of the shipped tiny CPU config."""
    for directory in _CONFIG_DIRS:
        found = sorted(glob.glob(os.path.join(directory, "*.yaml")))
        if found:
            return {os.path.splitext(os.path.basename(p))[0]: p for p in found}
    return {}


def run_demo(name: str = "lora_ext", steps: int = 32, output_dir: str = "mindformers_lora_demo"):
    """Write tiny data, train tiny config ``name`` for ``steps`` steps through the
    run_mindformer.py path; returns the summary."""
    # pylint: disable=import-outside-toplevel
    from mindformers.tools.register import MindFormerConfig
    from mindformers_lora_ext.launcher import run_main

    configs = tiny_configs()
    if name not in configs:
        raise ValueError(f"no tiny config {name!r}; shipped: {sorted(configs)}")
    if steps < 1:
        raise ValueError(f"steps = {steps}: expected >= 1")
    output_dir = os.path.abspath(output_dir)
    config = MindFormerConfig(configs[name])
    batch = config.runner_config.batch_size
    model_config = config.model.model_config
    data = write_tiny_dataset(os.path.join(output_dir, "data", "train.mindrecord"),
                              num_rows=steps * batch, seq_length=model_config.seq_length,
                              vocab_size=model_config.vocab_size, seed=config.seed or 0)
    config.train_dataset.data_loader.dataset_dir = data
    config.output_dir = os.path.join(output_dir, "output")
    summary_file = os.path.join(output_dir, "summary.json")
    config.callbacks = list(config.callbacks or []) + [
        {"type": "TrainingSummary", "summary_file": summary_file, "check_frozen": True}]
    print(f"[mindformers-lora-ext] demo: pet_type {config.model.model_config.pet_config.pet_type}, "
          f"config {configs[name]}, "
          f"{steps} steps, outputs in {output_dir}", flush=True)
    run_main(config)
    with open(summary_file, encoding="utf-8") as handle:
        summary = json.load(handle)
    print(f"[mindformers-lora-ext] demo done: loss {summary['first_loss']:.4f} -> "
          f"{summary['last_loss']:.4f}; trainable {summary['trainable_params']} of "
          f"{summary['total_params']} params; frozen params changed: "
          f"{len(summary['changed_frozen'])}; summary {summary_file}; "
          f"MindFormers outputs {config.output_dir}", flush=True)
    return summary
