"""CpuSafeTrainOneStepCell: trains on CPU, skips a step whose gradients are not finite."""
import numpy as np
from mindspore import Tensor, nn

from mindformers_lora_ext.wrappers import CpuSafeTrainOneStepCell


class _Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 3)

    def construct(self, x):
        return (self.dense(x) ** 2).mean()


def test_finite_step_updates_and_inf_step_is_skipped():
    net = _Net()
    step = CpuSafeTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1))
    w0 = net.dense.weight.asnumpy().copy()
    out = step(Tensor(np.ones((2, 4), np.float32)))
    assert not bool(out[1].asnumpy()) and np.abs(net.dense.weight.asnumpy() - w0).max() > 1e-4
    w1 = net.dense.weight.asnumpy().copy()
    x = np.ones((2, 4), np.float32)
    x[0, 0] = np.inf
    out = step(Tensor(x))
    assert bool(out[1].asnumpy())
    np.testing.assert_array_equal(net.dense.weight.asnumpy(), w1)
    out = step(Tensor(np.ones((2, 4), np.float32)))  # and training goes on afterwards
    assert not bool(out[1].asnumpy()) and np.abs(net.dense.weight.asnumpy() - w1).max() > 1e-4
