"""Trace fidelity (docs/design.md, invariant 3) and tracing errors."""

import pytest
import torch
from torch import nn

from granular.errors import TraceError
from granular.passes.trace import trace
from granular.search_spaces import build_search_space

from _models import USER_MODELS, example, user_model


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_traced_user_model_matches_eager(name):
    model = user_model(name).eval()
    x = example(4)
    gm = trace(model, x[:2])
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output",))


def test_traced_darts_matches_eager():
    model = build_search_space("darts:tiny", 10, 1).eval()
    x = example(3)
    gm = trace(model, x[:2])
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_shape_propagation_leaves_bn_statistics_alone():
    model = user_model("vgg_like").train()
    before = model.features[1].running_mean.clone()
    trace(model, example(2) * 5 + 3)
    torch.testing.assert_close(model.features[1].running_mean, before)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(x)


def test_untraceable_model_names_module_node_and_fix():
    with pytest.raises(TraceError) as err:
        trace(_Wrapper(), torch.randn(2, 4))
    msg = str(err.value)
    assert "\n" not in msg
    assert "'gate' (_DataDependent)" in msg and "control flow" in msg and "leaf_modules" in msg
    assert "node 'gt'" in msg or "node 'sum" in msg


def test_leaf_module_makes_it_traceable():
    gm = trace(_Wrapper(), torch.randn(2, 4), leaf_modules=[_DataDependent])
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_wrong_input_shape_is_one_line():
    with pytest.raises(TraceError) as err:
        trace(user_model("vgg_like"), torch.randn(2, 3, 8, 8))
    assert "\n" not in str(err.value) and "(2, 3, 8, 8)" in str(err.value)


class _TimmUser(nn.Module):
    """A user's model built from timm layers that timm registers as FX leaves."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d, Conv2dSame
        self.conv = Conv2dSame(1, 8, 3, stride=2)   # data-dependent padding inside: must stay a leaf
        self.bn = BatchNormAct2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_timm_leaf_registry_is_honoured():
    model = _TimmUser().eval()
    x = example(3, size=9)
    gm = trace(model, x[:2])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "conv" in targets  # kept whole, as timm's registry asks
    # BatchNormAct2d is a leaf too, then split into plain modules that share its state
    assert {"bn.bn", "bn.drop", "bn.act"} <= targets
    assert type(gm.get_submodule("bn.bn")) is nn.BatchNorm2d
    assert gm.get_submodule("bn.bn").running_mean is model.bn.running_mean
    assert type(model.bn).__name__ == "BatchNormAct2d"  # the user's model is left as it was
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    model.train()
    gm.train()
    torch.testing.assert_close(gm(x), model(x))  # batch statistics in training mode, as the leaf did


def test_readers_after_an_in_place_op_read_its_result():
    """``y.mul_(c)`` leaves its result unread; trace rewires the later readers of ``y`` to the
    in-place node, so data flow passes through it (and the values are unchanged)."""
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)

        def forward(self, x):
            y = self.bn(x)
            y.mul_(2.0)
            y.add_(1.0)
            return self.fc(y) + y.sum(1, keepdim=True)

    model = M().eval()
    x = torch.randn(4, 6)
    gm = trace(model, x)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["add_"].args[0] is nodes["mul_"]
    assert nodes["fc"].args[0] is nodes["add_"] and nodes["sum_1"].args[0] is nodes["add_"]
    torch.testing.assert_close(gm(x), model(x))


class _CachesInEval(torch.nn.Module):
    """Caches a tensor derived from a parameter in a dict in eval mode, as timm's
    EfficientFormer does with its attention biases."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.bias = torch.nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        if self.training:
            b = self.bias * 2
        else:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2
            b = self.cache["b"]
        return self.fc(x) + b


def test_a_model_traced_twice_does_not_keep_the_first_traces_proxies():
    """The first trace cached a proxy of its own graph in the module's dict; the second trace
    of the same model then failed ("getitem_6 ... does not belong to this Graph")."""
    model, x = _CachesInEval().eval(), torch.randn(2, 4)
    first = trace(model, x)
    assert model.cache == {}
    second = trace(model, x)
    torch.testing.assert_close(second(x), model(x))
    torch.testing.assert_close(first(x), model(x))
