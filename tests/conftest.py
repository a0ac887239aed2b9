"""Shared fixtures: one tiny Llama config, helpers for fresh-interpreter runs, mcore mode."""
import contextlib
import importlib
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny", "lora_ext.yaml")
RUN_MINDFORMER = os.path.join(ROOT, "tests", "run_mindformer.py")


def interop_modules(*names):
    """The modules ``names`` of the interop extra (torch, peft, transformers). Missing ones skip
    the caller, except where ``MINDFORMERS_LORA_EXT_REQUIRE_INTEROP=1`` (.ci/run sets it): there
    they fail, never skip."""
    if os.environ.get("MINDFORMERS_LORA_EXT_REQUIRE_INTEROP") == "1":
        modules = [importlib.import_module(name) for name in names]
    else:
        modules = [pytest.importorskip(name) for name in names]
    return modules[0] if len(modules) == 1 else tuple(modules)


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


@contextlib.contextmanager
def mindformers_context(use_legacy):
    """MindFormers' context singletons for one build, as ``build_context`` would make them from a
    YAML with this top-level ``use_legacy``, then the previous state back.

    MindFormers reads ``use_legacy`` only from its context (``is_legacy_model()``: the
    ``MFContextOperator`` singleton's value, True when there is none), and the registry shows
    mcore classes (``register(..., legacy=False)``) only when it is False. mcore model classes
    also pick their implementation from ``get_context("mode")``, the graph mode cached in the
    ``Context`` singleton, which an implicit ``Context()`` would set to MindFormers' default,
    PyNative. MindSpore allows ``set_cpu_affinity`` once per process, so the affinity call that
    ``Context`` makes is skipped here.
    """
    import mindspore as ms
    from mindformers.tools.register import MindFormerConfig
    # the module (mindformers.core.context re-exports its function build_context under its name)
    ctx_module = importlib.import_module("mindformers.core.context.build_context")
    context_cls, operator_cls = ctx_module.Context, ctx_module.MFContextOperator
    saved_instances = (context_cls._instance, operator_cls._instance)
    saved_environ, saved_mode = dict(os.environ), ms.get_context("mode")
    set_ms_affinity = ctx_module.set_ms_affinity
    context_cls._instance = operator_cls._instance = None
    ctx_module.set_ms_affinity = lambda *args: None
    os.environ.pop("RUN_MODE", None)  # "predict" would build the inference network
    try:
        context_cls(MindFormerConfig(use_legacy=use_legacy, use_parallel=False,
                                     context=dict(mode=0, device_target="CPU")))
        yield
    finally:
        ctx_module.set_ms_affinity = set_ms_affinity
        context_cls._instance, operator_cls._instance = saved_instances
        for key in set(os.environ) - set(saved_environ):  # MindFormers sets a few variables
            del os.environ[key]
        os.environ.update(saved_environ)
        ms.set_context(mode=saved_mode)


@contextlib.contextmanager
def mcore_mode():
    """:func:`mindformers_context` for mcore models (Qwen3 ...), with the test-side CPU
    stand-ins (tests/mcore_cpu.py) installed; both undone afterwards."""
    import mcore_cpu
    was_installed = mcore_cpu.is_installed()
    mcore_cpu.install()
    try:
        with mindformers_context(use_legacy=False):
            yield
    finally:
        if not was_installed:
            mcore_cpu.uninstall()


@pytest.fixture
def mcore_context():
    """:func:`mcore_mode` for one test."""
    with mcore_mode():
        yield


@contextlib.contextmanager
def float32_attention():
    """mcore ``Attention`` casts float32 q/k/v to float16 before flash attention (the Ascend
    kernel's dtype), which limits agreement between two float32 networks to about 1e-3; inside
    this block that cast is a float32 one (attention.py's ``mstype.float16`` seen as float32),
    for exact comparisons. Networks compile their graphs with it while inside."""
    import mindspore.common.dtype as mstype
    from mindformers.parallel_core.training_graph.transformer import attention
    fp32 = types.ModuleType("mstype_with_float32_attention")
    fp32.__dict__.update({k: v for k, v in vars(mstype).items() if not k.startswith("__")})
    fp32.float16 = mstype.float32
    sys.modules[fp32.__name__] = fp32  # graph mode imports it by name
    attention.mstype = fp32
    try:
        yield
    finally:
        attention.mstype = mstype
        sys.modules.pop(fp32.__name__, None)


def write_mcore_dataset(path, num_rows, skip_rows=0, seq_length=32, vocab_size=128):
    """The tiny counting rows (mindformers_lora_ext.tiny_data) for mcore models: ``input_ids``
    and ``labels`` of ``seq_length`` each, labels already shifted (legacy models take
    seq_length + 1 and shift inside; mcore GPTModel does not)."""
    import numpy as np
    from mindspore.mindrecord import FileReader, FileWriter
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    raw = write_tiny_dataset(path + ".raw", num_rows=num_rows, seq_length=seq_length, vocab_size=vocab_size,
                             skip_rows=skip_rows)
    reader = FileReader(raw)
    rows = [{"input_ids": row["input_ids"][:-1].astype(np.int32), "labels": row["labels"][1:].astype(np.int32)}
            for row in reader.get_next()]
    reader.close()
    writer = FileWriter(path, shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]},
                       "labels": {"type": "int32", "shape": [-1]}}, "tiny_counting_shifted")
    writer.write_raw_data(rows)
    writer.commit()
    return path
