"""LoraPlusAdamW: B-side lr = ratio x base lr (float and schedule), weight decay, arguments."""
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn
from mindformers.core.lr import ConstantWarmUpLR
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.trainer.optimizer_grouped_parameters import get_optimizer_grouped_parameters

from mindformers_lora_ext import registry
from mindformers_lora_ext.optimizers import LoraPlusAdamW, is_lora_b

BETAS, EPS, RATIO = (0.9, 0.999), 1e-8, 16.0


class _Layer(nn.Cell):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.weight = Parameter(Tensor(rng.normal(size=(2, 2)).astype(np.float32)), requires_grad=False)
        self.lora_A = Parameter(Tensor(rng.normal(size=(2, 2)).astype(np.float32)))
        self.lora_B = Parameter(Tensor(rng.normal(size=(2, 2)).astype(np.float32)))
        self.lora_B_bias = Parameter(Tensor(rng.normal(size=(2,)).astype(np.float32)))


class _Norm(nn.Cell):
    def __init__(self):
        super().__init__()
        self.weight = Parameter(Tensor(np.array([1.0, -2.0], np.float32)))


class _Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.layer = _Layer()
        self.norm = _Norm()


G2 = np.array([[0.5, -2.0], [3.0, -0.25]], np.float32)  # same gradient for lora_A and lora_B
GRADS = {"layer.lora_A": G2, "layer.lora_B": G2, "layer.lora_B_bias": np.array([0.3, -1.5], np.float32),
         "norm.weight": np.array([-0.7, 0.2], np.float32)}


def _values(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _step(opt):
    opt(tuple(Tensor(GRADS[p.name]) for p in opt.parameters))


def _numpy_adamw(p0, grads, lrs, wd):
    """Independent AdamW (decoupled decay, bias-corrected); one (lr) per step."""
    p, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = p * (1 - lr * wd)
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        p = p - lr * (m / (1 - BETAS[0] ** t)) / (np.sqrt(v / (1 - BETAS[1] ** t)) + EPS)
    return p


def _check(net, before, lrs, expect):
    """``expect``: name -> (lr multiplier, weight decay); the frozen weight must not move."""
    after = _values(net)
    for name, (mult, wd) in expect.items():
        want = _numpy_adamw(before[name], [GRADS[name]] * len(lrs), [lr * mult for lr in lrs], wd)
        np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(after["layer.weight"], before["layer.weight"])


def test_first_step_update_ratio_is_the_lr_ratio_float_lr():
    net = _Net()
    opt = LoraPlusAdamW(net.trainable_params(), learning_rate=1e-3, betas=BETAS, eps=EPS,
                        weight_decay=0.0, loraplus_lr_ratio=RATIO)
    assert "layer.weight" not in [p.name for p in opt.parameters]
    assert not is_lora_b(opt.parameters[-1].name)  # the lr MindFormers logs is the base one
    before = _values(net)
    _step(opt)
    after = _values(net)
    d_a = after["layer.lora_A"] - before["layer.lora_A"]
    d_b = after["layer.lora_B"] - before["layer.lora_B"]
    assert np.abs(d_a).min() > 1e-4
    np.testing.assert_allclose(d_b / d_a, RATIO, rtol=1e-4)
    _check(net, before, [1e-3], {"layer.lora_A": (1, 0), "layer.lora_B": (RATIO, 0),
                                 "layer.lora_B_bias": (RATIO, 0), "norm.weight": (1, 0)})


def test_weight_decay_float_lr_parameter_list():
    net = _Net()
    opt = LoraPlusAdamW(net.trainable_params(), learning_rate=2e-3, betas=BETAS, eps=EPS,
                        weight_decay=0.1, loraplus_lr_ratio=RATIO)
    before = _values(net)
    _step(opt)
    _step(opt)
    # A-side and other params: plain AdamW; lora_B: ratio x lr, same decay; 1-D B: no decay.
    _check(net, before, [2e-3, 2e-3], {"layer.lora_A": (1, 0.1), "layer.lora_B": (RATIO, 0.1),
                                       "layer.lora_B_bias": (RATIO, 0.0), "norm.weight": (1, 0.1)})


def test_schedule_and_mindformers_groups_with_loraplus_weight_decay():
    net = _Net()
    schedule = ConstantWarmUpLR(learning_rate=4e-3, warmup_steps=4, warmup_lr_init=1e-3)
    groups = get_optimizer_grouped_parameters(model=net, weight_decay=0.1)  # as the trainer does
    opt = LoraPlusAdamW(groups, learning_rate=schedule, betas=BETAS, eps=EPS, weight_decay=0.1,
                        loraplus_lr_ratio=RATIO, loraplus_weight_decay=0.05)
    before = _values(net)
    for _ in range(3):
        _step(opt)
    lrs = [1e-3 + 3e-3 * t / 4 for t in range(3)]  # the schedule at global steps 0, 1, 2
    _check(net, before, lrs, {"layer.lora_A": (1, 0.1), "layer.lora_B": (RATIO, 0.05),
                              "layer.lora_B_bias": (RATIO, 0.0), "norm.weight": (1, 0.0)})


def test_mindformers_lora_naming_counts_as_b_side():
    a = Parameter(Tensor(np.ones((2, 2), np.float32)), name="wq.mindpet_delta_lora_a")
    b = Parameter(Tensor(np.ones((2, 2), np.float32)), name="wq.mindpet_delta_lora_b")
    opt = LoraPlusAdamW([a, b], learning_rate=0.5, loraplus_lr_ratio=4)
    assert float(opt.get_lr_parameter(b).asnumpy()) == 2.0
    assert float(opt.get_lr_parameter(a).asnumpy()) == 0.5
    assert [is_lora_b(n) for n in ("x.lora_B", "x.lora_B_bias", "x.lora_A", "x.lora_magnitude_vector",
                                   "x.lora_Bx")] == [True, True, False, False, False]


@pytest.mark.parametrize("kwargs,needle", [
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be a finite real number > 0.0, got 0"),
    ({"loraplus_lr_ratio": -2.0}, "got -2.0"),
    ({"loraplus_lr_ratio": "16"}, "got '16'"),
    ({"loraplus_lr_ratio": True}, "got True"),
    ({"loraplus_lr_ratio": float("nan")}, "got nan"),
    ({"loraplus_lr_ratio": None}, "got None"),
    ({"loraplus_weight_decay": -0.1}, "loraplus_weight_decay must be a finite real number >= 0.0"),
    ({"weight_decay": "0.1"}, "weight_decay must be a finite real number >= 0.0, got '0.1'"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        LoraPlusAdamW(_Net().trainable_params(), **kwargs)


def test_no_b_side_parameter_is_an_error_naming_some_parameters():
    params = [p for p in _Net().trainable_params() if not is_lora_b(p.name)]
    with pytest.raises(ValueError, match=r"no LoRA B-side parameter .* among the 2 trainable "
                                         r"parameters, e\.g\. \['layer\.lora_A', 'norm\.weight'\]"):
        LoraPlusAdamW(params)


def test_registered_and_built_from_a_yaml_optimizer_section():
    """Needs ``register_optimizer(LoraPlusAdamW)`` in mindformers_lora_ext.builtin."""
    from mindformers.core.optim import build_optim  # pylint: disable=import-outside-toplevel
    regs = {r.name: r for r in registry.registered("optimizer")}
    assert "LoraPlusAdamW" in regs and regs["LoraPlusAdamW"].obj is LoraPlusAdamW
    assert MindFormerRegister.get_cls(MindFormerModuleType.OPTIMIZER, "LoraPlusAdamW") is LoraPlusAdamW
    net = _Net()
    section = {"type": "LoraPlusAdamW", "betas": [0.9, 0.999], "eps": 1.e-8, "weight_decay": 0.0,
               "loraplus_lr_ratio": 16, "loraplus_weight_decay": None}
    opt = build_optim(section, default_args={"params": get_optimizer_grouped_parameters(model=net),
                                             "learning_rate": 1e-3})
    assert isinstance(opt, LoraPlusAdamW) and opt.loraplus_lr_ratio == 16.0
