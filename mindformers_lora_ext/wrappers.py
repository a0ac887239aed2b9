"""A train-one-step wrapper whose overflow check runs on CPU.

MindFormers' ``MFTrainOneStepCell`` inherits MindSpore's Ascend overflow check, which reads
``NPUGetFloatStatusV2``: that op has no CPU kernel, so a CPU run fails at graph compile.
On CPU this wrapper declares overflow when any gradient holds a NaN or an inf (summed over
devices when distributed); on every other target it is ``MFTrainOneStepCell`` unchanged.
"""
from mindspore import context, ops
from mindspore.common import dtype as mstype
from mindformers.wrapper import MFTrainOneStepCell
from mindformers_lora_ext import _boot

_not_finite = ops.MultitypeFuncGraph("_not_finite")


@_not_finite.register("Tensor")
def _tensor_not_finite(grad):
    """1.0 (float32, shape ()) when ``grad`` holds a NaN or an inf, else 0.0."""
    return 1.0 - ops.cast(ops.IsFinite()(grad).all(), mstype.float32)


class CpuSafeTrainOneStepCell(MFTrainOneStepCell):
    """``MFTrainOneStepCell`` with an overflow check that has CPU kernels.

    YAML: ``runner_wrapper: {type: CpuSafeTrainOneStepCell, ...}`` with the parent's arguments.
    A step whose gradients are not all finite is skipped (the optimizer is not called).
    """

    def __init__(self, network, optimizer, **kwargs):
        super().__init__(network, optimizer, **kwargs)
        self.cpu_target = context.get_context("device_target") == "CPU"

    def get_overflow_status(self, status, compute_output):
        if not self.cpu_target:
            return super().get_overflow_status(status, compute_output)
        flags = self.hyper_map(_not_finite, compute_output)
        flag_sum = ops.AddN()(flags)
        if self.is_distributed:
            flag_sum = self.allreduce(flag_sum)
        return flag_sum > 0


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
