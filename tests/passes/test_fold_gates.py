"""``fold_gates``: the training graph with its post-norm gates folded into the norms computes,
differentiates and updates running statistics exactly as the unfolded one (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granular
from granular.gates import FilterGate, OpGate
from granular.passes.fold_gates import FOLDED, GATED_NORM_ROOT, FoldGates, GatedNorm
from granular.passes._manager import run_passes
from granular.passes.pipelines import training_graph
from granular.passes.skip_pruned_ops import skip_pruned_ops
from granular.search_spaces.darts import DartsSearchNet


class NoAffine(nn.Module):
    """A norm without affine (the gate alone scales it) and a norm that feeds two readers."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False)
        self.c2, self.n2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        y = self.n2(self.c2(x))
        return self.head((y + y.relu()).mean((2, 3)))


def _gated(model, x, seed=0):
    gm = granular.prepare(model, x).double()
    granular.testing.random_masks_(gm, op=0.3, filter=0.3, weight=0.3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # live thresholds that mask some units, gates away from 0.5
        for scope in gm.granular_gates.scopes.values():
            for name, p in scope.named_parameters():
                p.fill_(1e-3 if name == "t_omega" else 0.45)
        for gate in list(gm.granular_gates.op.values()) + list(gm.granular_gates.filter.values()):
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return gm


def _step(gm, net, x, y, mode):
    """Output, parameter gradients and buffers after one forward/backward of ``net`` in ``mode``."""
    getattr(net, mode)()
    gm.zero_grad(set_to_none=True)
    out = net(x)
    F.cross_entropy(out, y).backward()
    grads = {k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None}
    return out.detach(), grads, {k: b.clone() for k, b in gm.named_buffers()}


@pytest.mark.parametrize("case", ["darts", "no_affine"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_folded_gates_are_exact_in_output_gradients_and_statistics(case, mode):
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    model = DartsSearchNet(num_classes=10, C=4, cells=2, nodes=2) if case == "darts" else NoAffine()
    gm = _gated(model, x.float())
    plain = skip_pruned_ops(gm)
    fold = FoldGates()
    folded = run_passes(skip_pruned_ops(gm), [fold])
    assert fold.count > 0
    state = copy.deepcopy(gm.state_dict())
    out_a, grad_a, buf_a = _step(gm, plain, x, y, mode)
    gm.load_state_dict(state)
    out_b, grad_b, buf_b = _step(gm, folded, x, y, mode)
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    assert grad_b.keys() == grad_a.keys()  # the gates and thresholds still get their gradients
    for k in grad_a:
        torch.testing.assert_close(grad_b[k], grad_a[k], rtol=1e-9, atol=1e-12, msg=k)
    for k in buf_a:
        torch.testing.assert_close(buf_b[k], buf_a[k], rtol=1e-10, atol=1e-12, msg=k)
    if mode == "train":  # the statistics moved, so the comparison above compared something
        assert any(not torch.equal(buf_a[k], state[k]) for k in buf_a if k.endswith("running_mean"))


def test_fold_removes_the_gate_nodes_after_norms_and_keeps_the_state_dict():
    x = torch.randn(2, 3, 8, 8)
    gm = _gated(DartsSearchNet(num_classes=10, C=4, cells=2, nodes=2), x).float()
    plain, folded = skip_pruned_ops(gm), training_graph(gm)

    def gates(net, cls):
        return sum(1 for n in net.graph.nodes if n.op == "call_module"
                   and isinstance(net.get_submodule(str(n.target)), cls))
    norms = [n for n in folded.graph.nodes if n.op == "call_module"
             and isinstance(folded.get_submodule(str(n.target)), GatedNorm)]
    assert norms and all(str(n.target).startswith(GATED_NORM_ROOT + ".") and n.meta[FOLDED] for n in norms)
    folded_filters = sum(1 for n in norms if folded.get_submodule(str(n.target))._parts[1] is not None)
    folded_ops = sum(1 for n in norms if folded.get_submodule(str(n.target))._parts[2] is not None)
    assert gates(folded, FilterGate) == gates(plain, FilterGate) - folded_filters
    assert gates(folded, OpGate) == gates(plain, OpGate) - folded_ops
    assert folded_ops > 0  # DARTS convolution ops end in a norm: their α folds too
    assert folded.state_dict().keys() == plain.state_dict().keys()
    assert {id(p) for p in folded.parameters()} == {id(p) for p in plain.parameters()}
    # the norms stay reachable (recalibration finds them) and follow train()/eval()
    bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len([m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)])
    folded.eval()
    assert not any(m.training for m in bns)
