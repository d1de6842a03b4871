"""Passes run under one PassManager: recompiled and linted after each pass, errors surfaced as the pass's own."""

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.passes._manager import run_passes


class _Net(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


class _ReluToSigmoid(PassBase):
    """Rewrites the graph and leaves recompiling to the manager."""

    def call(self, gm):
        for n in gm.graph.nodes:
            if n.target is torch.relu:
                n.target = torch.sigmoid
        return PassResult(gm, True)


class _Fails(PassBase):
    def call(self, gm):
        raise ValueError("the pass's own message")


class _Breaks(PassBase):
    """Leaves a node that reads a node defined after it: lint must catch it."""

    def call(self, gm):
        nodes = list(gm.graph.nodes)
        add = next(n for n in nodes if n.op == "call_function" and n.target is not torch.relu)
        nodes[1].args = (add,)
        return PassResult(gm, True)


def test_the_manager_recompiles_after_each_pass():
    gm = fx.symbolic_trace(_Net())
    out = run_passes(gm, [_ReluToSigmoid()])
    x = torch.randn(5)
    torch.testing.assert_close(out(x), torch.sigmoid(x) + 1)


def test_a_failing_pass_raises_its_own_error():
    with pytest.raises(ValueError, match="the pass's own message"):
        run_passes(fx.symbolic_trace(_Net()), [_Fails()])


def test_the_shared_check_lints_after_each_pass():
    with pytest.raises(RuntimeError, match="used before it has been defined|before"):
        run_passes(fx.symbolic_trace(_Net()), [_Breaks()])
