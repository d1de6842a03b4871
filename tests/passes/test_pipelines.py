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


class _CountTargets(PassBase):
    """An analysis: records the call targets it sees, changes nothing."""

    mutates = False

    def __init__(self):
        self.seen = []

    def call(self, gm):
        self.seen = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return PassResult(gm, False)


@pytest.fixture
def recompiles(monkeypatch):
    """The GraphModules recompiled from here on (clear it after building the test's graph)."""
    seen = []
    real = fx.GraphModule.recompile

    def counting(self):
        seen.append(self)
        return real(self)

    monkeypatch.setattr(fx.GraphModule, "recompile", counting)
    return seen


def test_analyses_run_in_order_without_a_recompile(recompiles):
    """An analysis between two transforms sees the first one's graph; the manager does not
    recompile the graph for it (that cost half a second per analysis on a super-net)."""
    gm = fx.symbolic_trace(_Net())
    recompiles.clear()  # building gm compiled it once
    count = _CountTargets()
    out = run_passes(gm, [_ReluToSigmoid(), count])
    assert torch.sigmoid in count.seen and torch.relu not in count.seen
    assert len(recompiles) == 1  # the transform's, not the analysis's
    x = torch.randn(5)
    torch.testing.assert_close(out(x), torch.sigmoid(x) + 1)


class _NothingToDo(_ReluToSigmoid):
    """A transform that says it does not apply: it must not even run."""

    def applies(self, gm):
        return False

    def call(self, gm):
        raise AssertionError("a pass that does not apply ran")


def test_a_transform_that_does_not_apply_is_skipped_without_a_recompile(recompiles):
    gm = fx.symbolic_trace(_Net())
    recompiles.clear()  # building gm compiled it once
    out = run_passes(gm, [_NothingToDo()])
    assert out is gm and not recompiles


def test_a_failing_pass_raises_its_own_error():
    with pytest.raises(ValueError, match="the pass's own message"):
        run_passes(fx.symbolic_trace(_Net()), [_Fails()])


def test_the_shared_check_lints_after_each_pass():
    with pytest.raises(RuntimeError, match="used before it has been defined|before"):
        run_passes(fx.symbolic_trace(_Net()), [_Breaks()])


class _InplaceResidual(torch.nn.Module):
    """timm's block shape: ``act(branch + x)`` with an in-place ReLU, and ``x`` read again."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem, self.act0 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.a, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.act0(self.stem(x))
        y = self.act(self.bn(self.a(x)) + x)
        return self.head((y + self.b(x)).mean((2, 3)))


def test_a_pruned_branch_before_an_inplace_activation_trains_like_the_gated_graph():
    """Dropping the pruned branch leaves ``act_(x)``: without a copy the in-place ReLU would
    overwrite the ``x`` that ``b`` saved for backward (autograd refuses), so the training graph
    must give the gated graph's gradients."""
    import torch.nn.functional as F
    import granular
    from granular.passes.pipelines import training_graph
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    gm = granular.prepare(_InplaceResidual(), x)
    gm.granular_gates.op["bn"].mask.zero_()   # the residual branch a -> bn is pruned
    grads = []
    for net in (gm, training_graph(gm)):
        gm.zero_grad(set_to_none=True)
        net.train()
        F.cross_entropy(net(x), y).backward()
        grads.append({k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None and k.startswith("b.")})
    assert grads[1].keys() == grads[0].keys() == {"b.weight", "b.bias"}
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])
