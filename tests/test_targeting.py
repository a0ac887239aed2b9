"""Targeting rules: which cells an adapter replaces (regex, suffix list, all-linear, layers)."""
import mindspore as ms
import pytest
from mindspore import nn

from mindformers.modules.layers import Linear
from mindformers_lora_ext.tuners.targeting import checkpoint_prefix, find_cells, find_targets, layer_index


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


class _Stack(nn.Cell):
    def __init__(self):
        super().__init__()
        self.layers = nn.CellList([_Block(), _Block(), _Block()])


def test_layers_to_transform_keeps_only_those_blocks():
    net = _Stack()
    assert find_targets(net, ["wq"], layers_to_transform=[0, 2]) == ["layers.0.wq", "layers.2.wq"]
    assert layer_index("model.layers.12.attention.wq") == 12
    assert layer_index("model.blocks.3.wq", ["blocks"]) == 3 and layer_index("lm_head") is None
    with pytest.raises(ValueError, match=r"layers_to_transform = \[1, 5\]: layer\(s\) \[5\] have no target"):
        find_targets(net, ["wq"], layers_to_transform=[1, 5])
    with pytest.raises(ValueError, match="have no target"):
        find_targets(net, ["wq"], layers_to_transform=[0], layers_pattern=["h"])


def test_find_cells_for_modules_to_save():
    net = _Stack()
    assert list(find_cells(net, "modules_to_save", ["2.lm_head"])) == ["layers.2.lm_head"]
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no cell of _Stack"):
        find_cells(net, "modules_to_save", ["lm_head", "head"])


class _Unprefixed(nn.Cell):
    """As mcore Qwen3's ForCausalLM: built with auto_prefix=False, so its ``model`` child's
    parameters carry no ``model.`` prefix while the cell path has one."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.model = _Stack()


def test_checkpoint_prefix_is_the_base_weight_name_not_the_cell_path():
    net = _Unprefixed()
    cells = dict(net.cells_and_names())
    assert cells["model.layers.1.wq"].weight.name == "layers.1.wq.weight"
    assert checkpoint_prefix("model.layers.1.wq", cells["model.layers.1.wq"]) == "layers.1.wq"
    plain = _Stack()
    assert checkpoint_prefix("layers.1.wq", dict(plain.cells_and_names())["layers.1.wq"]) == "layers.1.wq"
    assert checkpoint_prefix("proj", nn.Dense(2, 2)) == "proj"  # a lone cell: its weight is "weight"
