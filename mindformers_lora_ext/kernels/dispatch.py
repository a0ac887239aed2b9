"""Which implementation a LoRA layer uses: the fused kernel or the plain MindSpore composition.

``use_fused_kernel`` (config key, default ``"auto"``):

* ``False``: always the composition ``x W^T + s (drop(x) A^T) B^T`` (MatMul/Dropout/Mul/Add).
* ``True``: the fused op wherever one is built for this device and dtype, even where the
  ``auto`` rule below would not pick it; otherwise the composition (with the warning below).
* ``"auto"``: the fused op where the rule table :data:`AUTO_RULE` says it is not slower than the
  composition and it is built; otherwise the composition, silently when the rule says no.

The rule, by device and compute dtype, from ``benchmarks/fused_kernel.py`` (x86 with AVX-512,
2 cores shared with other jobs, MindSpore 2.9, graph mode, median of 7, one training step =
forward + backward of loss = sum(y * dy); times in ms, OMP_NUM_THREADS=1 for both sides):

    N     in=out  r   p     dense    comp    fused   fused/comp  fused/dense
    2048  1024   16  0      60.5     73.2    63.8    0.87        1.05
    2048  1024   16  0.05   60.2     84.5    69.4    0.82        1.15
    2048  4096   16  0     914.1    966.6   856.3    0.89        0.94
    2048  4096   16  0.05  837.5    965.3   853.6    0.88        1.02
     512  4096   16  0     202.9    217.6   213.5    0.98        1.05
     512  4096   16  0.05  229.1    257.8   250.4    0.97        1.09   (another run; this row's
                                                                       first run was disturbed)

* CPU float32: fused. Its training step was never slower than the composition beyond noise:
  0.82-0.98x above, 0.54-1.01x in three runs with 2 threads (default); the one case near parity
  is a small N with large layers (N=512, 4096^2, p=0: step 0.88-1.01x, but the forward alone
  1.02-1.14x). It also keeps far less for backward (no dropped copy of x, no mask): 240-283 MB
  vs 736 MB over frozen Dense layers for a 4-block Llama-like stack, dropout 0.05, 2048 tokens.
  But small layers lose: a whole small Llama (hidden 512, 4 layers, seq 256, batch 2) trained
  1.27x slower per step with the fused op on its 512x512 q/k/v/o than with the composition, and
  its eval forward took 1.68x the composition's (benchmarks/step_time.py, merged_forward.py).
  So on CPU ``auto`` also needs in x out >= :data:`AUTO_MIN_WEIGHT_ELEMENTS` (1024 x 1024, the
  smallest size measured faster above); ``True`` ignores the size.
* CPU float16/bfloat16: composition (the CPU kernel is float32 only).
* Ascend float32/float16/bfloat16: fused when ``kernels.ascend`` is available and builds;
  that module owns the decision (``is_available()``).
* anything else (GPU, ...): composition.

DoRA's dropout correction (:func:`resolve_dropped_matmul`, ``cpu/dropped_matmul.cc``) follows the
same key, but only ``True`` uses it (CPU float32): in whole training steps it was slower than the
second matmul (1.37x at h512, 1.10x at h1024, dropout 0.05), though faster in isolation.

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
import logging
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import mindspore as ms
from mindspore.common import dtype as mstype

logger = logging.getLogger("mindformers_lora_ext.kernels")

USE_FUSED_CHOICES = ("auto", True, False)

# (device, dtype name) -> picked by "auto". Missing entries: not picked.
AUTO_RULE = {
    ("CPU", "float32"): True,
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
    from mindformers_lora_ext.kernels.build import build_cpu_library  # pylint: disable=import-outside-toplevel
    from mindformers_lora_ext.kernels.cpu_ops import make_cpu_ops, make_dropped_matmul  # pylint: disable=import-outside-toplevel
    lib = build_cpu_library()
    return (*make_cpu_ops(lib), make_dropped_matmul(lib))


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
    return forward, backward
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
                    forward, backward, *extra = builder()
                    _BUILT[device] = Backend(name, device, forward, backward, convention,
                                             dropped_matmul=extra[0] if extra else None)
                except Exception as exc:  # pylint: disable=broad-except  (never stop training)
                    _BUILT[device] = exc
        result = _BUILT[device]
    if isinstance(result, Exception):
        raise result
    return result


AUTO_MIN_WEIGHT_ELEMENTS = 1024 * 1024  # CPU: below this the composition was faster (above)


def resolve(use_fused="auto", dtype=mstype.float32, device: Optional[str] = None,
            weight_elements: Optional[int] = None) -> Tuple[Optional[Backend], str]:
    """(backend or None, reason). None means: use the composition; ``reason`` says why.
    ``weight_elements``: in x out of the layer (the CPU ``auto`` rule needs it large)."""
    use_fused = check_use_fused(use_fused)
    device = device or current_device()
    key = (device, dtype_name(dtype))
    if use_fused == "auto" and device == "CPU" and weight_elements is not None \
            and weight_elements < AUTO_MIN_WEIGHT_ELEMENTS:
        return None, f"auto rule: the composition is faster for {weight_elements} weight elements on CPU"
    if use_fused is False:
        return None, "use_fused_kernel is False"
    if key not in SUPPORTED:
        reason = f"no fused kernel for {key[1]} on {device}"
        if use_fused is True:
            warn_once(device, reason)
        return None, reason
    if use_fused == "auto" and not AUTO_RULE.get(key, False):
        return None, f"auto rule: the composition is faster for {key[1]} on {device}"
    return _built(device)


def _built(device: str) -> Tuple[Optional[Backend], str]:
    """(backend, "fused"), or (None, the build failure, warned once per device and reason)."""
    try:
        return build_backend(device), "fused"
    except Exception as exc:  # pylint: disable=broad-except
        reason = f"{type(exc).__name__}: {exc}"
        warn_once(device, reason)
        return None, reason


def resolve_dropped_matmul(use_fused="auto", dtype=mstype.float32, device: Optional[str] = None):
    """(DoRA's dropout-correction op or None, reason); see ``tuners/lora.py`` (Dora). Only
    ``use_fused_kernel: true`` uses it (CPU float32; a failed build falls back with one warning):
    "auto" does not, since whole steps measured slower with it (module docstring)."""
    use_fused = check_use_fused(use_fused)
    device = device or current_device()
    if use_fused is False:
        return None, "use_fused_kernel is False"
    if use_fused == "auto":  # step_time.py --dropout 0.05: whole steps 1.37x (h512), 1.10x (h1024)
        return None, "auto rule: the second matmul was faster in whole training steps"
    if device != "CPU" or dtype_name(dtype) != "float32":
        return None, f"no DoRA dropout kernel for {dtype_name(dtype)} on {device}"
    backend, reason = _built(device)
    if backend is None:
        return None, reason
    if backend.dropped_matmul is None:
        return None, f"no DoRA dropout kernel in the {backend.name} backend"
    return backend.dropped_matmul, "fused"
