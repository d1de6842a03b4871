"""The live-masking cap (between rounds the live thresholds mask at most the next round's share
of each layer and each sum) and the step guard that drops non-finite steps."""

import pytest
import torch

import granular
from granular.config import SearchConfig
from granular.data import load_data
from granular.driver import Searcher
from granular.driver.livecap import LiveCap
from granular.errors import GranularError

from _models import user_model


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=96, seed=0)


def _searcher(digits, **cfg):
    gm = granular.prepare(user_model("resnet_like"), digits.example_input())
    cfg.setdefault("target_params", 5000)
    return Searcher(gm, digits, SearchConfig(**cfg), progress=False)


def _live_masked(s):
    """Per filter gate: (kept filters below the live threshold, kept filters)."""
    out = {}
    for k, g in s.bank.filter.items():
        t = s.bank.scopes[s.struct.filter_scope[k]].t_beta
        kept = g.mask > 0
        out[k] = (int(((torch.sigmoid(g.beta) < t) & kept).sum()), int(kept.sum()))
    return out


def test_the_cap_lowers_thresholds_that_pass_more_than_its_share_of_a_layer(digits):
    s = _searcher(digits)
    s.init_thresholds()
    with torch.no_grad():
        for g in s.bank.filter.values():  # gates in near lockstep, as in a trained layer
            g.beta.copy_(0.01 * torch.randn_like(g.beta))
        for scope in s.bank.scopes.values():
            if hasattr(scope, "t_beta"):
                scope.t_beta.fill_(0.9)  # every filter below its threshold
    before = {sid: sc.t_beta.item() for sid, sc in s.bank.scopes.items() if hasattr(sc, "t_beta")}
    cap = LiveCap(s.bank, s.struct.filter_scope, s._active()[0])
    cap.apply(1.0)  # a cap of the whole layer changes nothing
    assert all(below == kept for below, kept in _live_masked(s).values())
    cap.apply(0.25)
    for k, (below, kept) in _live_masked(s).items():
        assert below <= int(0.25 * kept), k
        assert below < kept  # a layer keeps a live filter
    assert any(below > 0 for below, _ in _live_masked(s).values())  # the cap is a ceiling, not zero
    for sid, t in before.items():  # thresholds only move down
        assert s.bank.scopes[sid].t_beta.item() <= t
    cap.apply(0.0)
    assert all(below == 0 for below, _ in _live_masked(s).values())


def test_the_cap_keeps_a_share_of_each_sum_alive(digits):
    s = _searcher(digits)
    s.init_thresholds()
    sums = [a for a in s._active()[0] if len(a) > 1]
    assert sums, "resnet_like has sums of two gated ops"
    with torch.no_grad():
        for scope in s.bank.scopes.values():
            if hasattr(scope, "t_alpha"):
                scope.t_alpha.fill_(0.9)  # every op below its threshold
    LiveCap(s.bank, s.struct.filter_scope, s._active()[0]).apply(0.5)
    for keys in sums:
        below = [k for k in keys if float(torch.sigmoid(s.bank.op[k].alpha)) < float(s.bank.scopes[k].t_alpha)]
        assert len(below) <= int(0.5 * len(keys)) and len(below) < len(keys)


@pytest.mark.parametrize("live_cap", [1.0, 0.0])
def test_training_under_a_strong_push_masks_no_more_than_the_cap(digits, live_cap):
    s = _searcher(digits, epochs=12, warmup_epochs=1, lambda_init=30.0, live_cap=live_cap)
    s.init_thresholds()
    s.state["params"] = granular.count_params(s.gm).nonzero
    s.plan_live_cap()
    fraction = s.state["live_fraction"]
    s.train_epoch(1, warmup=False)
    worst = max(below / kept for below, kept in _live_masked(s).values())
    if live_cap:
        assert 0 < fraction < 1 and worst <= fraction
    else:  # without the cap the same push masks more of some layer than the cap would allow
        assert fraction is None and worst > 0.5


def test_no_live_masking_when_no_round_is_left(digits):
    s = _searcher(digits, epochs=12, warmup_epochs=1)
    s.init_thresholds()
    s.state["params"] = granular.count_params(s.gm).nonzero
    s.state["epoch"] = 12
    s.plan_live_cap()
    assert s.state["live_fraction"] == 0.0


class _Poisoned:
    """The data, with a NaN in the training batches listed in ``bad``."""

    def __init__(self, data, bad):
        self.data, self.bad = data, bad

    def __getattr__(self, name):
        return getattr(self.data, name)

    def train_loader(self, epoch):
        out = []
        for i, (x, y) in enumerate(self.data.train_loader(epoch)):
            if i in self.bad:
                x = x.clone()
                x.view(-1)[0] = float("nan")
            out.append((x, y))
        return out


def test_a_non_finite_step_is_dropped_not_written_into_the_model(digits):
    s = _searcher(_Poisoned(digits, {1}), epochs=12, warmup_epochs=1)
    s.init_thresholds()
    stats = s.train_epoch(1, warmup=False)
    assert stats["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in s.gm.parameters())
    clean = _searcher(digits, epochs=12, warmup_epochs=1).train_epoch(1, warmup=False)
    assert "skipped_steps" not in clean


def test_a_diverged_search_stops_with_one_line(digits):
    s = _searcher(_Poisoned(digits, set(range(100))), epochs=12, warmup_epochs=1)
    with pytest.raises(GranularError, match="diverged.*--resume"):
        s.train_epoch(0, warmup=True)
