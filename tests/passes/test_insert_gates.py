"""insert_gates: gates are graph nodes, parameters are real, open gates are inert (invariant 4)."""

import pytest
import torch
from torch import nn

import granular
from granular.config import GateConfig
from granular.gates import FilterGate
from granular.meta import GATE
from granular.search_spaces import build_search_space
from granular.testing import open_gates_, randomize_norms_

from _models import USER_MODELS, example, user_model


def _models():
    yield "darts:tiny", build_search_space("darts:tiny", 10, 1)
    for name in sorted(USER_MODELS):
        yield name, user_model(name)


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_open_gates_reproduce_the_ungated_network(name, model):
    randomize_norms_(model, seed=1)
    x = example(4, seed=2)
    gm = granular.prepare(model, x[:2])
    open_gates_(gm)
    for mode in ("eval", "train"):
        gm.train(mode == "train")
        model.train(mode == "train")
        torch.manual_seed(3)  # dropout draws the same mask in both
        out = gm(x)
        torch.manual_seed(3)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_gates_are_nodes_and_parameters():
    gm = granular.prepare(user_model("resnet_like"), example())
    code = gm.code
    assert "granular_gates.op." in code and "granular_gates.filter." in code and "granular_gates.weight." in code
    kinds = {n.meta[GATE].kind for n in gm.graph.nodes if GATE in n.meta}
    assert kinds == {"op", "filter", "weight"}
    names = dict(gm.named_parameters())
    assert any(k.endswith(".alpha") for k in names) and any(k.endswith(".t_omega") for k in names)
    assert all(isinstance(p, nn.Parameter) for k, p in names.items() if k.startswith("granular_gates"))
    masks = [k for k, _ in gm.named_buffers() if k.endswith(".mask")]
    assert masks, "stored masks are buffers"


def test_filter_gate_follows_the_batchnorm():
    gm = granular.prepare(user_model("resnet_like"), example())
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FilterGate):
            src = n.args[0]
            assert src.op == "call_module" and isinstance(gm.get_submodule(src.target), nn.BatchNorm2d) \
                or src.op == "call_function", n.format_node()


def test_gated_graph_trains_gates_and_thresholds():
    gm = granular.prepare(user_model("resnet_like"), example())
    bank = gm.granular_gates
    for s in bank.scopes.values():
        for name, p in s.named_parameters():
            # t_α, t_β near σ(0) = 0.5 so the estimator passes gradient; t_ω low so weights live
            p.data.fill_(0.01 if name == "t_omega" else 0.45)
    gm.train()
    loss = gm(example(4)).square().mean()
    loss.backward()
    assert any(float(m.alpha.grad.abs()) > 0 for m in bank.op.values())
    assert any(float(m.beta.grad.abs().sum()) > 0 for m in bank.filter.values())
    assert any(float(s.t_omega.grad.abs()) > 0 for s in bank.scopes.values() if hasattr(s, "t_omega"))
    assert any(s.t_alpha.grad is not None and float(s.t_alpha.grad.abs()) > 0
               for s in bank.scopes.values() if hasattr(s, "t_alpha"))


def test_eval_mode_uses_stored_masks_only():
    gm = granular.prepare(user_model("resnet_like"), example())
    x = example(2)
    gm.eval()
    before = gm(x)
    for s in gm.granular_gates.scopes.values():
        for p in s.parameters():
            p.data.fill_(10.0)  # every live mask would be 0 in training mode
    torch.testing.assert_close(gm(x), before)


def _trained_cnn():
    """A small CNN trained on digits for a few hundred steps: its weights and BN statistics are
    far from their initial values, as a user's trained model is."""
    from granular.data import load_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    data = load_data("digits", seed=0, batch_size=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        for x, y in data.train_loader(0):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), data


@pytest.mark.parametrize("start", ["auto", "identity"])
def test_prepare_keeps_a_trained_models_function(start):
    model, data = _trained_cnn()
    x = next(iter(data.val_loader()))[0]
    gm = granular.prepare(model, x[:2], GateConfig(start=start)).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
        acc = lambda m: float((m(x).argmax(1) == next(iter(data.val_loader()))[1]).float().mean())  # noqa: E731
    assert acc(model) > 0.5 and acc(gm) == acc(model)


def test_search_space_presets_keep_the_papers_half_start():
    gm = granular.prepare(build_search_space("darts:tiny", 10, 1), example())
    bank = gm.granular_gates
    gains = [float(g.gain) for g in [*bank.op.values(), *bank.filter.values()]]
    assert gains and set(gains) == {1.0}  # σ(0) = 0.5: the gate is a half, as in the paper
    half = granular.prepare(user_model("resnet_like"), example(), GateConfig(start="half"))
    assert {float(g.gain) for g in half.granular_gates.filter.values()} == {1.0}
    ident = granular.prepare(user_model("resnet_like"), example())
    assert {float(g.gain) for g in ident.granular_gates.filter.values()} == {2.0}


class _PaddedModes(nn.Module):
    """1-d and 2-d convs with reflect, replicate and circular padding, and prunable 1x1 convs
    after them."""

    def __init__(self):
        super().__init__()
        self.a1 = nn.Conv1d(4, 8, 1)
        self.bn1 = nn.BatchNorm1d(8)
        self.dw1 = nn.Conv1d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.c1 = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.a2 = nn.Conv2d(4, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate")
        self.p1, self.q1 = nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8)
        self.p2, self.q2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y1 = self.c1(self.dw1(self.bn1(self.a1(x)).relu()))
        y2 = self.c2(self.bn2(self.a2(x.unsqueeze(-1).expand(-1, -1, -1, 5))).relu())
        y1, y2 = self.q1(self.p1(y1)).relu(), self.q2(self.p2(y2)).relu()
        return self.head(torch.cat([y1.mean(-1), y2.mean((2, 3))], 1))


def test_convs_with_non_zero_padding_modes_keep_their_function():
    """The gated conv is ``torch.convNd`` with zero padding, so a conv padded another way is
    kept whole (its channels fixed): a reflect Conv1d was rewritten (prepare changed the
    output by 1e-2, and export rebuilt it with zero padding). The 1x1 convs still prune."""
    from granular.testing import check_export, random_masks_
    torch.manual_seed(0)
    model, x = _PaddedModes().eval(), torch.randn(4, 4, 16)
    gm = granular.prepare(model, x)
    open_gates_(gm)
    gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    for seed in (0, 1):
        result = check_export(_PaddedModes().eval(), x, seed=seed)
        assert result.ok, result.reason
    random_masks_(gm, op=0.3, filter=0.5, weight=0.3, seed=0)
    compact = granular.export(gm.eval())
    assert [c.out_channels for c in (compact.p1, compact.p2)] != [8, 8]
    modes = {name: m.padding_mode for name, m in compact.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
    assert modes["dw1"] == "reflect" and modes["c1"] == "circular" and modes["c2"] == "replicate", modes
