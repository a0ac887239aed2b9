"""LoraLinear numerics against numpy formulas, and targeting rules."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from mindformers.modules.layers import Linear
from mindformers_lora_ext.tuners.lora import LoraLinear
from mindformers_lora_ext.tuners.targeting import find_targets

RNG = np.random.default_rng(1234)


def _randomize(layer, bias):
    w = RNG.standard_normal(layer.weight.shape).astype(np.float32)
    a = RNG.standard_normal(layer.lora_A.shape).astype(np.float32)
    b = RNG.standard_normal(layer.lora_B.shape).astype(np.float32)
    layer.weight.set_data(Tensor(w))
    layer.lora_A.set_data(Tensor(a))
    layer.lora_B.set_data(Tensor(b))
    if bias:
        layer.bias.set_data(Tensor(RNG.standard_normal(layer.bias.shape).astype(np.float32)))
    return w, a, b


def _reference(x, w, a, b, bias, s, transpose_b):
    """y = x W^T + bias + s (x A^T) B^T in float64, W as the base cell stores it."""
    w_out_in = w if transpose_b else w.T
    y = x @ w_out_in.T.astype(np.float64) + s * (x @ a.T.astype(np.float64)) @ b.T.astype(np.float64)
    return y + (0 if bias is None else bias)


BASES = {
    "dense": lambda: nn.Dense(12, 10, has_bias=True),
    "linear": lambda: Linear(12, 10, has_bias=False, compute_dtype=ms.float32),
    "linear_not_transposed": lambda: Linear(12, 10, has_bias=True, transpose_b=False,
                                            compute_dtype=ms.float32),
}


@pytest.mark.parametrize("make", BASES.values(), ids=BASES.keys())
def test_forward_matches_numpy(make):
    base = make()
    layer = LoraLinear(base, rank=3, alpha=6.0)
    assert layer.weight is base.weight  # adopted, not copied
    w, a, b = _randomize(layer, base.has_bias)
    x = RNG.standard_normal((2, 5, 12)).astype(np.float32)  # 3-D input
    out = layer(Tensor(x)).asnumpy()
    bias = layer.bias.asnumpy().astype(np.float64) if base.has_bias else None
    ref = _reference(x.reshape(-1, 12).astype(np.float64), w, a, b, bias, 2.0, layer.transpose_b)
    assert out.shape == (2, 5, 10)
    np.testing.assert_allclose(out.reshape(-1, 10), ref, rtol=1e-4, atol=1e-4)


def test_initial_output_equals_base():
    base = nn.Dense(12, 10)
    x = Tensor(RNG.standard_normal((4, 12)).astype(np.float32))
    expected = base(x).asnumpy()
    layer = LoraLinear(base, rank=4, alpha=8)
    assert not layer.lora_B.asnumpy().any()
    bound = 1 / np.sqrt(12)  # kaiming-uniform with a = sqrt(5)
    assert np.abs(layer.lora_A.asnumpy()).max() <= bound and layer.lora_A.asnumpy().std() > bound / 4
    np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("pynative")
def test_gradients_match_numpy():
    layer = LoraLinear(nn.Dense(7, 5, has_bias=False), rank=2, alpha=3.0)
    w, a, b = _randomize(layer, False)
    x = RNG.standard_normal((6, 7)).astype(np.float32)
    g = RNG.standard_normal((6, 5)).astype(np.float32)

    def loss(inp):
        return (layer(inp) * Tensor(g)).sum()

    grad_fn = ms.value_and_grad(loss, grad_position=0, weights=[layer.lora_A, layer.lora_B])
    _, (dx, (da, db)) = grad_fn(Tensor(x))
    s = 1.5
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(db.asnumpy(), s * g64.T @ (x64 @ a.T), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(da.asnumpy(), s * (g64 @ b).T @ x64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.asnumpy(), g64 @ w + s * (g64 @ b) @ a, rtol=1e-4, atol=1e-4)


def test_dropout_only_on_the_adapter_path():
    base = nn.Dense(16, 8, has_bias=False)
    layer = LoraLinear(base, rank=4, alpha=4, dropout=0.5)
    w, a, b = _randomize(layer, False)
    x = RNG.standard_normal((64, 16)).astype(np.float32)
    layer.set_train(False)  # eval: dropout off, exact formula
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), _reference(x, w, a, b, None, 1.0, True),
                               rtol=1e-4, atol=1e-4)
    layer.set_train(True)
    trained = layer(Tensor(x)).asnumpy()
    assert not np.allclose(trained, _reference(x, w, a, b, None, 1.0, True), atol=1e-3)


class _Block(nn.Cell):
    def __init__(self):
        super().__init__()
        self.attention = nn.CellList([nn.Dense(4, 4), nn.Dense(4, 4)])
        self.wq = Linear(4, 4, compute_dtype=ms.float32)
        self.norm = nn.LayerNorm((4,))
        self.lm_head = nn.Dense(4, 9)


def test_targeting_rules():
    net = _Block()
    assert find_targets(net, ".*wq") == ["wq"]
    assert find_targets(net, ["0", "wq"]) == ["attention.0", "wq"]
    assert find_targets(net, "all-linear") == ["attention.0", "attention.1", "wq"]
    assert find_targets(net, "all-linear", exclude_layers=["1"]) == ["attention.0", "wq"]
    assert find_targets(net, "lm_head") == ["lm_head"]  # explicit naming still works


def test_targeting_errors_name_the_problem():
    net = _Block()
    with pytest.raises(ValueError, match=r"matches cell 'norm' of type LayerNorm"):
        find_targets(net, "norm")
    with pytest.raises(ValueError) as err:
        find_targets(net, ".*wk")
    assert "matches no cell of _Block" in str(err.value) and "attention.0" in str(err.value)
