"""A train-one-step wrapper whose overflow check runs on CPU.

MindFormers' ``MFTrainOneStepCell`` inherits MindSpore's Ascend overflow check, which reads
``NPUGetFloatStatusV2``: that op has no CPU kernel, so a CPU run fails at graph compile.
On CPU this wrapper declares overflow when any gradient holds a NaN or an inf (summed over
devices when distributed); on every other target it is ``MFTrainOneStepCell`` unchanged.
"""
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, context, ops
from mindspore.common import dtype as mstype
from mindspore.ops import functional as F
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
    If a cell of the network has ``grad_tap_names()``, the gradients of those parameters are
    copied each step into frozen buffers (``tapped_gradients()``), which callbacks read.
    """

    def __init__(self, network, optimizer, **kwargs):
        super().__init__(network, optimizer, **kwargs)
        self.cpu_target = context.get_context("device_target") == "CPU"
        self._setup_grad_taps()

    def _setup_grad_taps(self):
        """Gradient buffers for the parameters the network asks to observe (AdaLoRA's
        sensitivities): ``grad_tap_names()`` on any of its cells."""
        wanted = []
        # a bound method, not the cell: a Cell attribute would register the cell a second time
        self._missing_tap_reader = None
        for _, cell in self.network.cells_and_names():
            if hasattr(cell, "grad_tap_names"):
                wanted = list(cell.grad_tap_names())
                self._missing_tap_reader = getattr(cell, "missing_tap_reader", None)
                break
        self._tap_reader_checked = False
        position = {p.name: i for i, p in enumerate(self.weights)}
        missing = [n for n in wanted if n not in position]
        if missing:
            raise ValueError(f"gradient taps for parameters the optimizer does not update: {missing[:3]}")
        self.tap_index = tuple(position[n] for n in wanted)
        self.grad_taps = ParameterTuple(
            Parameter(Tensor(np.zeros(self.weights[i].shape, np.float32)), name=f"grad_tap.{self.weights[i].name}",
                      requires_grad=False) for i in self.tap_index)

    def __call__(self, *args, **kwargs):
        # Taps are only useful if a callback reads them (AdaLoRA: without its rank allocator the
        # ranks never shrink). Checked at the first step: callbacks' on_train_begin ran by then.
        if not self._tap_reader_checked:
            self._tap_reader_checked = True
            problem = self._missing_tap_reader() if self._missing_tap_reader else None
            if problem:
                raise ValueError(problem)
        return super().__call__(*args, **kwargs)

    def get_overflow_status(self, status, compute_output):
        # compute_output: the unscaled, all-reduced gradients, in optimizer order
        for i, index in enumerate(self.tap_index):
            status = F.depend(status, F.assign(self.grad_taps[i], ops.cast(compute_output[index], mstype.float32)))
        if not self.cpu_target:
            return super().get_overflow_status(status, compute_output)
        flags = self.hyper_map(_not_finite, compute_output)
        flag_sum = F.depend(ops.AddN()(flags), status)
        if self.is_distributed:
            flag_sum = self.allreduce(flag_sum)
        return flag_sum > 0

    def tapped_gradients(self):
        """Parameter name -> last step's gradient (float32 numpy), for the tapped parameters."""
        return {self.weights[index].name: self.grad_taps[i].asnumpy()
                for i, index in enumerate(self.tap_index)}


_boot.resume_after_import(__name__)  # see _boot: plugins deferred while we were importing
