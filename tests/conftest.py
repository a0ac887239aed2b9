"""Shared fixtures: one tiny Llama config, helpers for fresh-interpreter runs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny", "lora_ext.yaml")
RUN_MINDFORMER = os.path.join(ROOT, "tests", "run_mindformer.py")


@pytest.fixture(autouse=True, scope="session")
def _cpu_context():
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    import mindformers  # noqa: F401  the .pth hook loads our plugins here
    from mindformers_lora_ext import registry
    registry.load_plugins()


@pytest.fixture
def pynative():
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture
def tiny_config():
    """A fresh MindFormerConfig of the tiny lora_ext Llama."""
    from mindformers.tools.register import MindFormerConfig
    return MindFormerConfig(TINY_CONFIG)


def run_fresh(args, cwd, env=None, timeout=600):
    """Run ``python <args>`` in a fresh interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)  # the plugin must come from the installed package
    full_env.update(env or {})
    return subprocess.run([sys.executable] + list(args), cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True, check=False)


def randomize_layer(layer, rng):
    """Random values (from ``rng``) for every parameter of an adapted linear cell; returns them
    as float64 arrays by attribute name, W as [out, in]. DoRA magnitudes are kept positive."""
    import numpy as np
    from mindspore import Tensor
    arrays = {}
    for param in [layer.weight] + ([layer.bias] if layer.has_bias else []) + layer.adapter_parameters():
        value = rng.standard_normal(param.shape).astype(np.float32)
        if param.name.endswith("magnitude_vector"):
            value = np.abs(value) + 0.5
        param.set_data(Tensor(value))
        arrays[param.name.rsplit(".", 1)[-1]] = value.astype(np.float64)
    if not layer.transpose_b:
        arrays["weight"] = arrays["weight"].T
    return arrays


LORA_TYPES = ["lora_ext", "dora", "rslora", "pissa", "olora"]
# method keys of every pet type for the tiny Llama (its targets set separately)
METHOD_KEYS = {**{t: dict(lora_rank=8, lora_alpha=16) for t in LORA_TYPES},
               "vera": dict(r=16), "loha": dict(r=4, alpha=8), "lokr": dict(r=4, alpha=8),
               "adalora": dict(init_r=8, target_r=4, total_step=32, lora_alpha=16)}


def pet_config_over_tiny(pet: dict) -> dict:
    """``pet`` as a YAML pet_config on top of TINY_CONFIG: each key of lora_ext.yaml's pet_config
    that ``pet["pet_type"]`` does not take is set to null, which cancels the inherited key."""
    from mindformers_lora_ext.registry import pet_type_config_class
    accepted = pet_type_config_class(pet["pet_type"]).DEFAULTS
    inherited = ("lora_rank", "lora_alpha", "lora_dropout")
    return {**{k: None for k in inherited if k not in accepted and k not in pet}, **pet}


class CallbackContext:
    """The run_context a callback sees in MindSpore's training loop, for driving one in-process."""

    def __init__(self, network, step, loss=1.0):
        from types import SimpleNamespace
        import mindspore as ms
        self.params = SimpleNamespace(train_network=network, cur_step_num=step,
                                      net_outputs=(ms.Tensor(loss, ms.float32),), optimizer=None)
        self.stopped = False

    def original_args(self):
        return self.params

    def request_stop(self):
        self.stopped = True
