"""Fused LoRA forward/backward as AscendC custom ops for MindSpore (func_type="aot").

    y  = x W^T + s_eff ((x * keep) A^T) B^T                  (op LoraFused, aclnnLoraFused)
    dx, dA, dB (no dW)                                         (op LoraFusedGrad, aclnnLoraFusedGrad)
    s_eff = s / (1 - p); keep from the counter-based RNG of RNG.md (seed, offset)

NOT YET BUILT OR RUN ON ASCEND HARDWARE. What exists and is tested on CPU: the op
registration below (the ops construct; calling them needs Ascend + the built package),
the tiling arithmetic (tiling.py, mirrored by op_host/lora_fused_tiling_calc.h) and a
numpy emulation of the kernel loops (tiling.emulate_forward / emulate_backward).

Sources: op_host/ (OpDef, infer shape, tiling), op_kernel/ (AscendC kernels),
lora_fused.json (msopgen definition), build.sh (builds the package with CANN).

Because the kernels have never run on hardware, is_available() also requires the
opt-in environment variable MINDFORMERS_LORA_EXT_ASCEND_KERNEL=1.
"""
import os

OP_TYPE = "LoraFused"
GRAD_OP_TYPE = "LoraFusedGrad"
OP_NAME = "aclnn" + OP_TYPE
GRAD_OP_NAME = "aclnn" + GRAD_OP_TYPE

# Names and order MUST equal the OpDef in op_host/lora_fused.cpp and lora_fused.json.
FORWARD_INPUTS = ("x", "weight", "lora_a", "lora_b", "scale", "dropout_p", "seed_offset")
FORWARD_OUTPUTS = ("y",)
BACKWARD_INPUTS = ("dy",) + FORWARD_INPUTS
BACKWARD_OUTPUTS = ("dx", "d_lora_a", "d_lora_b")
# Tensor dtypes of x / weight / lora_a / lora_b / dy and of the outputs (one kernel each);
# scale and dropout_p are float32 [1], seed_offset is int64 [2] = (seed, offset).
TENSOR_DTYPES = ("float16", "bfloat16", "float32")

VENDOR = "lora_ext"
OPT_IN_ENV = "MINDFORMERS_LORA_EXT_ASCEND_KERNEL"
# Files an installed custom-op package (vendors/<name>/) has for these ops.
PACKAGE_FILES = (
    os.path.join("op_api", "include", "aclnn_lora_fused.h"),
    os.path.join("op_api", "include", "aclnn_lora_fused_grad.h"),
    os.path.join("op_api", "lib", "libcust_opapi.so"),
)
SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))


class Availability:
    """Truthy when the Ascend ops can be used; `reason` says why (not)."""

    __slots__ = ("ok", "reason", "package_path")

    def __init__(self, ok, reason, package_path=None):
        self.ok = bool(ok)
        self.reason = reason
        self.package_path = package_path

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return f"Availability(ok={self.ok}, reason={self.reason!r})"


def _load_priority(config_ini):
    """vendors/config.ini's `load_priority = a,b,c` list (empty when absent)."""
    try:
        with open(config_ini, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip().lower() == "load_priority":
                    return [v.strip() for v in value.split(",") if v.strip()]
    except OSError:
        pass
    return []


def _candidate_vendor_dirs(env):
    """Where MindSpore 2.9 looks for a custom op's aclnn header (CustomInfoGenerator):
    each ASCEND_CUSTOM_OPP_PATH entry, then $ASCEND_OPP_PATH/vendors/<name> in the
    load_priority order of vendors/config.ini."""
    for entry in env.get("ASCEND_CUSTOM_OPP_PATH", "").split(":"):
        if entry:
            yield entry
    opp = env.get("ASCEND_OPP_PATH", "")
    if opp:
        vendors = os.path.join(opp, "vendors")
        for name in _load_priority(os.path.join(vendors, "config.ini")):
            yield os.path.join(vendors, name)


def find_installed_package(env=None):
    """The vendors/<name> directory holding the built LoraFused ops, or None."""
    env = os.environ if env is None else env
    for d in _candidate_vendor_dirs(env):
        if all(os.path.isfile(os.path.join(d, f)) for f in PACKAGE_FILES):
            return d
    return None


def _device_target():
    import mindspore as ms
    return ms.get_context("device_target")


def is_available(device_target=None, env=None):
    """Availability(False, reason) unless: MindSpore targets Ascend, the custom-op package
    is installed where MindSpore looks (ASCEND_CUSTOM_OPP_PATH, or a vendor listed in
    $ASCEND_OPP_PATH/vendors/config.ini) and the opt-in
    variable MINDFORMERS_LORA_EXT_ASCEND_KERNEL=1 is set."""
    env = os.environ if env is None else env
    try:
        target = _device_target() if device_target is None else device_target
    except Exception as exc:  # noqa: BLE001  (no MindSpore: simply unavailable)
        return Availability(False, f"MindSpore is not usable: {exc}")
    if target != "Ascend":
        return Availability(False, f"MindSpore device_target is {target!r}, not 'Ascend'")
    path = find_installed_package(env)
    if path is None:
        return Availability(
            False,
            f"the {OP_TYPE}/{GRAD_OP_TYPE} custom-op package is not installed (no "
            f"{PACKAGE_FILES[0]} under ASCEND_CUSTOM_OPP_PATH or the vendors listed in "
            f"$ASCEND_OPP_PATH/vendors/config.ini); "
            f"build it with {os.path.join(SOURCE_DIR, 'build.sh')} (needs CANN) and export "
            f"ASCEND_CUSTOM_OPP_PATH=<install>/vendors/{VENDOR}")
    if env.get(OPT_IN_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        return Availability(
            False, f"package found at {path}, but these kernels have not been validated on "
                   f"hardware yet: set {OPT_IN_ENV}=1 to use them", path)
    return Availability(True, f"package found at {path}", path)


def _reg_info(op_name, inputs, outputs):
    from mindspore.ops import CustomRegOp, DataType
    tensor = {"float16": DataType.F16_Default, "bfloat16": DataType.BF16_Default,
              "float32": DataType.F32_Default}
    scalar_types = {"scale": DataType.F32_Default, "dropout_p": DataType.F32_Default,
                    "seed_offset": DataType.I64_Default}
    reg = CustomRegOp(op_name)
    for i, name in enumerate(inputs):
        reg = reg.input(i, name, "required")
    for i, name in enumerate(outputs):
        reg = reg.output(i, name, "required")
    for dt in TENSOR_DTYPES:
        row = [scalar_types.get(name, tensor[dt]) for name in inputs] + [tensor[dt]] * len(outputs)
        reg = reg.dtype_format(*row)
    return reg.target("Ascend").get_op_info()


def forward_reg_info():
    return _reg_info(OP_NAME, FORWARD_INPUTS, FORWARD_OUTPUTS)


def backward_reg_info():
    return _reg_info(GRAD_OP_NAME, BACKWARD_INPUTS, BACKWARD_OUTPUTS)


def _forward_shape(x, weight, lora_a, lora_b, scale, dropout_p, seed_offset):
    return list(x[:-1]) + [weight[0]]


def _forward_dtype(x, weight, lora_a, lora_b, scale, dropout_p, seed_offset):
    return x


def _backward_shape(dy, x, weight, lora_a, lora_b, scale, dropout_p, seed_offset):
    return (list(x), list(lora_a), list(lora_b))


def _backward_dtype(dy, x, weight, lora_a, lora_b, scale, dropout_p, seed_offset):
    return (x, x, x)


def make_bprop(backward_op):
    """bprop of the forward op: (*inputs, out, dout) -> one gradient per input.
    The frozen weight and the scalar inputs get zeros (no dW is computed)."""
    from mindspore import ops

    def bprop(x, weight, lora_a, lora_b, scale, dropout_p, seed_offset, out, dout):
        dx, d_lora_a, d_lora_b = backward_op(dout, x, weight, lora_a, lora_b, scale, dropout_p, seed_offset)
        return (dx, ops.zeros_like(weight), d_lora_a, d_lora_b, ops.zeros_like(scale),
                ops.zeros_like(dropout_p), ops.zeros_like(seed_offset))

    return bprop


def build_ops():
    """(forward_op, backward_op): ops.Custom AOT ops bound to aclnnLoraFused /
    aclnnLoraFusedGrad, the forward carrying a bprop that calls the backward op.

    Constructing them works anywhere MindSpore imports (also on CPU); running them needs
    an Ascend device and the package built by build.sh (see is_available()).
    Build them AFTER MindSpore's device target is Ascend: ops.Custom (2.9) decides at
    construction whether it is an AscendC op (device_target == "Ascend" and
    func_type == "aot") and then reads the installed aclnn header and compiles a small
    callback; ops built under a CPU context never take the Ascend path.
    Call as forward_op(x, weight, lora_a, lora_b, scale, dropout_p, seed_offset) with
    scale / dropout_p float32 tensors of shape [1] and seed_offset an int64 tensor [2].
    """
    from mindspore import ops
    backward = ops.Custom(GRAD_OP_NAME, out_shape=_backward_shape, out_dtype=_backward_dtype,
                          func_type="aot", reg_info=backward_reg_info())
    forward = ops.Custom(OP_NAME, out_shape=_forward_shape, out_dtype=_forward_dtype,
                         func_type="aot", bprop=make_bprop(backward), reg_info=forward_reg_info())
    return forward, backward


__all__ = ["Availability", "BACKWARD_INPUTS", "BACKWARD_OUTPUTS", "FORWARD_INPUTS", "FORWARD_OUTPUTS",
           "GRAD_OP_NAME", "OP_NAME", "build_ops", "find_installed_package", "is_available",
           "make_bprop", "backward_reg_info", "forward_reg_info"]
