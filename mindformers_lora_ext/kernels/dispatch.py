"""Which implementation a LoRA layer uses: the fused kernel or the plain MindSpore composition.

``use_fused_kernel`` (config key, default ``"auto"``):

* ``False``: always the composition ``x W^T + s (drop(x) A^T) B^T`` (MatMul/Dropout/Mul/Add).
* ``True``: the fused op wherever one is built for this device and dtype, even where the
  ``auto`` rule below would not pick it; otherwise the composition (with the warning below).
* ``"auto"``: the fused op where the rule below says it is not slower than the composition
  (:data:`AUTO_RULE` by device and dtype; on CPU float32 also :func:`cpu_auto_rule`, by
  instruction set and layer size) and it is built; otherwise the composition, silently when the
  rule says no.

The rule, by device and compute dtype:

* CPU float32: fused only where whole training steps measured it faster. The layer benchmark
  (``benchmarks/fused_kernel.py``) does not predict the step: the op won alone (fwd+bwd 0.82-0.98x
  the composition, AVX-512) yet whole Llama steps took 1.27x (h512) and 0.995-1.07x (h1024, AVX2)
  the composition's time. So :data:`CPU_AUTO_RULE_FILE` (``cpu_auto_rule.json``, written by
  ``benchmarks/auto_rule.py`` from whole training steps, fused vs what ``auto`` runs otherwise
  (the composition with the kernels' dropout), side by side) gives per instruction set the
  smallest in x out from which the fused step was at most 0.95x the composition's at every
  measured size, or null: never. An instruction set the file does not name (not measured) gets
  the composition. ``$MINDFORMERS_LORA_EXT_CPU_AUTO_RULE`` names a rule file measured on your
  machine instead (``auto_rule.py --output``).
* CPU float16/bfloat16: composition (the CPU kernel is float32 only).
* Ascend float32/float16/bfloat16: fused when ``kernels.ascend`` is available and builds;
  that module owns the decision (``is_available()``).
* anything else (GPU, ...): composition.

The composition's input dropout (:func:`resolve_dropout`): on CPU float32 under ``auto`` and
``True``, the fused op's Philox dropout alone (``PhiloxDropout``; MindSpore's CPU ``Dropout`` op
took 2.3-2.5 ms for a [512, 512] input against 0.6-0.7 ms, and keeps a mask for backward where
this regenerates it); ``False`` keeps ``nn.Dropout``. The library is built for it.

DoRA's dropout correction (:func:`resolve_dropped_matmul`, ``cpu/dropped_matmul.cc``) follows the
same key, but only ``True`` uses it (CPU float32): whole training steps were not reliably faster
with it than with the second matmul (dropout 0.05, ``step_time.py --setups dora,dora_fused``:
Llama h1024 1481 vs 1578 ms in one run, 1559 vs 1535 ms in another; h512 661 vs 617 ms), though
0.62-0.70x the dense product alone (``benchmarks/dropped_kernel.py``, N=512, 1024x1024).

Failures never stop training: a compiler error, a library that does not load or an op that
cannot be constructed logs ONE warning per (device, reason) on the ``mindformers_lora_ext.kernels``
logger, and the layer uses the composition.

Ascend hook (:func:`_ascend_ops`): imports ``mindformers_lora_ext.kernels.ascend``; if that module
has ``is_available()`` it must be truthy (else its ``reason`` is the fallback reason), then
``build_ops()`` returns ``(forward_op, backward_op)``. Two calling conventions exist, recorded
in ``Backend.convention`` and handled by ``layer``:

* "cpu" (``cpu_ops``): forward ``(x, W, A, B, sp, seed) -> (y, h, seed)``, sp = float32 [2] =
  (scaling, p), seed = int32 [2] (Philox4x32-10 key); the bprop calls the backward op.
* "ascend" (``kernels/ascend``): forward ``(x, W, A, B, scale, p, seed_offset) -> y``, scale and
  p float32 [1], seed_offset int64 [2] = (seed, offset) (Threefry-2x32-20, see ascend/RNG.md);
  its forward op carries its own bprop.
"""
import json
import logging
import os
import threading
from functools import lru_cache
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mindspore as ms
from mindspore.common import dtype as mstype

logger = logging.getLogger("mindformers_lora_ext.kernels")

USE_FUSED_CHOICES = ("auto", True, False)

# (device, dtype name) -> picked by "auto". Missing entries: not picked.
AUTO_RULE = {
    ("CPU", "float32"): True,  # where cpu_auto_rule() also picks it (instruction set, layer size)
    ("Ascend", "float32"): True,
    ("Ascend", "float16"): True,
    ("Ascend", "bfloat16"): True,
}
# (device, dtype name) the fused op can run at all (True may force these).
SUPPORTED = {
    ("CPU", "float32"),
    ("Ascend", "float32"),
    ("Ascend", "float16"),
    ("Ascend", "bfloat16"),
}

_DTYPE_NAMES = {mstype.float32: "float32", mstype.float16: "float16", mstype.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Backend:
    """A built fused pair: ``forward`` (with bprop attached) and ``backward`` primitives;
    ``convention`` ("cpu" | "ascend") is how the forward op is called (module docstring)."""
    name: str
    device: str
    forward: object
    backward: object
    convention: str = "cpu"
    dropped_matmul: object = None  # DoRA's dropout correction (cpu_ops.make_dropped_matmul) or None
    dropout: object = None  # the fused op's dropout alone (cpu_ops.make_philox_dropout) or None
    isa: str = ""  # CPU: the instruction set the library runs ("avx512", "avx2", "generic")


_LOCK = threading.RLock()
_BUILT = {}      # device -> Backend | Exception (the failure, remembered: no retry per process)
_WARNED = set()  # (device, reason) already logged


def warn_once(device: str, reason: str) -> None:
    """Log ``reason`` once per process for ``device``."""
    with _LOCK:
        if (device, reason) in _WARNED:
            return
        _WARNED.add((device, reason))
    logger.warning("mindformers-lora-ext: fused LoRA kernel unavailable on %s, using the MindSpore "
                   "composition: %s", device, reason)


def reset() -> None:
    """Forget built backends and logged warnings (tests; after changing the environment)."""
    with _LOCK:
        _BUILT.clear()
        _WARNED.clear()


def check_use_fused(value):
    """Validate a ``use_fused_kernel`` value: "auto", True or False (the strings "true"/"false"
    from YAML are accepted too); returns "auto", True or False."""
    if value is True or value is False:
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.strip().lower()]
    raise ValueError(f"use_fused_kernel must be 'auto', True or False, got {value!r}")


def dtype_name(dtype) -> str:
    """``mstype.float32`` -> "float32" (other types: their str)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def current_device() -> str:
    """The context's device target ("CPU", "Ascend", "GPU")."""
    return ms.get_context("device_target")


def _cpu_ops():
    from mindformers_lora_ext.kernels.build import build_cpu_library, library_isa  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.kernels.cpu_ops import make_cpu_ops, make_dropped_matmul, make_philox_dropout  # pylint: disable=import-outside-toplevel
    lib = build_cpu_library()
    return (*make_cpu_ops(lib), {"dropped_matmul": make_dropped_matmul(lib), "dropout": make_philox_dropout(lib),
                                 "isa": library_isa(lib)})


def _ascend_ops():
    # ===== Ascend hook: the AscendC kernels live in kernels/ascend (a separate module) =====
    try:
        from mindformers_lora_ext.kernels import ascend  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise RuntimeError(f"no Ascend kernels in this build ({exc})") from exc
    if hasattr(ascend, "is_available"):
        availability = ascend.is_available()
        if not availability:
            raise RuntimeError(getattr(availability, "reason", "kernels.ascend.is_available() is False"))
    forward, backward = ascend.build_ops()
    if getattr(forward, "bprop", None) is None:
        raise RuntimeError("kernels.ascend.build_ops() returned a forward op without a bprop")
    return forward, backward, {}
    # ===== end of the Ascend hook =====


_BUILDERS = {"CPU": ("cpu-aot", "cpu", _cpu_ops), "Ascend": ("ascend-aot", "ascend", _ascend_ops)}


def build_backend(device: str) -> Backend:
    """The fused ops for ``device``, built once per process; raises the (remembered) failure."""
    with _LOCK:
        if device not in _BUILT:
            if device not in _BUILDERS:
                _BUILT[device] = RuntimeError(f"no fused LoRA kernel for device {device}")
            else:
                name, convention, builder = _BUILDERS[device]
                try:
                    forward, backward, extra = builder()
                    _BUILT[device] = Backend(name, device, forward, backward, convention, **extra)
                except Exception as exc:  # pylint: disable=broad-except  (never stop training)
                    _BUILT[device] = exc
        result = _BUILT[device]
    if isinstance(result, Exception):
        raise result
    return result


CPU_AUTO_RULE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_auto_rule.json")
ENV_CPU_AUTO_RULE = "MINDFORMERS_LORA_EXT_CPU_AUTO_RULE"  # a rule file of your machine's instead


def cpu_auto_rule_file() -> str:
    """The rule file in force: ``$MINDFORMERS_LORA_EXT_CPU_AUTO_RULE`` (e.g. written by
    ``benchmarks/auto_rule.py --output`` on this machine) if set, else :data:`CPU_AUTO_RULE_FILE`."""
    return os.environ.get(ENV_CPU_AUTO_RULE) or CPU_AUTO_RULE_FILE


@lru_cache(maxsize=None)
def _read_rule(path: str) -> Dict[str, Optional[int]]:
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)["isa"]
        return {isa: entry["min_weight_elements"] for isa, entry in table.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{ENV_CPU_AUTO_RULE if path != CPU_AUTO_RULE_FILE else 'CPU auto rule'} "
                         f"{path!r} is not a readable rule file like {CPU_AUTO_RULE_FILE} "
                         f"({type(exc).__name__}: {exc})") from exc


def cpu_auto_rule() -> Dict[str, Optional[int]]:
    """Instruction set -> the smallest in x out where CPU ``auto`` picks the fused kernel (None:
    never), from :func:`cpu_auto_rule_file` (module docstring)."""
    return _read_rule(cpu_auto_rule_file())


def _cpu_auto_refusal(weight_elements: Optional[int], isa: Optional[str] = None) -> Optional[str]:
    """Why CPU ``auto`` takes the composition for a layer of ``weight_elements`` (in x out) on
    ``isa`` (None: on any instruction set, before the library is built), or None: fused."""
    rule = cpu_auto_rule()
    thresholds = [rule.get(isa)] if isa else list(rule.values())
    thresholds = [t for t in thresholds if t is not None]
    where = f"on {isa}" if isa else "on any instruction set"
    if not thresholds:
        return (f"auto rule: whole training steps measured no win of the fused kernel {where} "
                f"({cpu_auto_rule_file()}, benchmarks/auto_rule.py)")
    if weight_elements is not None and weight_elements < min(thresholds):
        return (f"auto rule: the composition is faster for {weight_elements} weight elements {where} "
                f"(fused from {min(thresholds)}; {cpu_auto_rule_file()})")
    return None


def resolve(use_fused="auto", dtype=mstype.float32, device: Optional[str] = None,
            weight_elements: Optional[int] = None) -> Tuple[Optional[Backend], str]:
    """(backend or None, reason). None means: use the composition; ``reason`` says why.
    ``weight_elements``: in x out of the layer (the CPU ``auto`` rule is by size)."""
    use_fused = check_use_fused(use_fused)
    device = device or current_device()
    key = (device, dtype_name(dtype))
    if use_fused is False:
        return None, "use_fused_kernel is False"
    cpu_auto = use_fused == "auto" and key == ("CPU", "float32")
    if cpu_auto:
        refusal = _cpu_auto_refusal(weight_elements)
        if refusal:
            return None, refusal
    if key not in SUPPORTED:
        reason = f"no fused kernel for {key[1]} on {device}"
        if use_fused is True:
            warn_once(device, reason)
        return None, reason
    if use_fused == "auto" and not AUTO_RULE.get(key, False):
        return None, f"auto rule: the composition is faster for {key[1]} on {device}"
    backend, reason = _built(device)
    if backend is not None and cpu_auto:
        refusal = _cpu_auto_refusal(weight_elements, backend.isa)
        if refusal:
            return None, refusal
    return backend, reason


def _built(device: str) -> Tuple[Optional[Backend], str]:
    """(backend, "fused"), or (None, the build failure, warned once per device and reason)."""
    try:
        return build_backend(device), "fused"
    except Exception as exc:  # pylint: disable=broad-except
        reason = f"{type(exc).__name__}: {exc}"
        warn_once(device, reason)
        return None, reason


def resolve_dropout(use_fused="auto", dtype=mstype.float32, device: Optional[str] = None):
    """(the LoRA input dropout op or None, reason) for the composition path: the fused op's
    Philox dropout alone (``cpu/fused_lora.cc``, ``cpu_ops.make_philox_dropout``) on CPU float32
    under ``auto`` and ``True``; None means MindSpore's ``nn.Dropout``. A failed build falls back
    with one warning."""
    use_fused = check_use_fused(use_fused)
    if use_fused is False:
        return None, "use_fused_kernel is False"
    return _cpu_op("dropout", "dropout kernel", dtype, device or current_device())


def resolve_dropped_matmul(use_fused="auto", dtype=mstype.float32, device: Optional[str] = None):
    """(DoRA's dropout-correction op or None, reason); see ``tuners/lora.py`` (Dora). Only
    ``use_fused_kernel: true`` uses it (CPU float32; a failed build falls back with one warning):
    "auto" does not: whole steps were not reliably faster with it (module docstring)."""
    use_fused = check_use_fused(use_fused)
    if use_fused is False:
        return None, "use_fused_kernel is False"
    if use_fused == "auto":  # step_time.py --dropout 0.05: whole steps 0.94x / 1.02x (h1024), 1.07x (h512)
        return None, "auto rule: whole training steps were not reliably faster with it than with the second matmul"
    return _cpu_op("dropped_matmul", "DoRA dropout kernel", dtype, device or current_device())


def _cpu_op(attr: str, what: str, dtype, device: str):
    """(the CPU backend's ``attr`` op or None, reason): float32 on CPU only, built on first use."""
    if device != "CPU" or dtype_name(dtype) != "float32":
        return None, f"no {what} for {dtype_name(dtype)} on {device}"
    backend, reason = _built(device)
    if backend is None:
        return None, reason
    op = getattr(backend, attr)
    if op is None:
        return None, f"no {what} in the {backend.name} backend"
    return op, "fused"
