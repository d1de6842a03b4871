"""Multi-stage search (Algorithm 2): live graphs, stage graphs with heads, per-stage counts,
regrowth, the single-resolution message, and resume across stages."""

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import granular
from granular.accounting import count_params_by_stage
from granular.cli import main
from granular.config import SearchConfig
from granular.data import load_data
from granular.errors import GranularError
from granular.meta import tensor_shape
from granular.driver.multistage import MultiStageSearcher, _allocate
from granular.passes.skip_pruned_ops import skip_pruned_ops
from granular.passes.split_stages import AUX_HEAD, assign_stages, stage_boundary, stage_graph
from granular.driver import Searcher, make_searcher
from granular.files import CHECKPOINT
from granular.search_spaces import build_search_space
from granular.testing import random_masks_


@pytest.fixture(scope="module")
def small_digits():
    """192 training and 96 validation digits: enough for a few quick epochs."""
    d = load_data("digits", batch_size=48, seed=0)
    return dataclasses.replace(d, train_set=Subset(d.train_set, range(192)), val_set=Subset(d.val_set, range(96)))


def _darts(data, seed=0):
    torch.manual_seed(seed)
    model = build_search_space("darts:tiny", num_classes=data.num_classes, in_channels=data.in_channels)
    return granular.prepare(model, data.example_input())


def test_live_graph_skips_pruned_ops_exactly(small_digits):
    gm = _darts(small_digits)
    random_masks_(gm, seed=3, op=0.5)
    live = skip_pruned_ops(gm)
    assert len(live.graph.nodes) < len(gm.graph.nodes) * 0.8  # the pruned ops are gone
    x = torch.randn(4, *small_digits.example_input().shape[1:])
    for mode in (True, False):
        gm.train(mode)
        live.train(mode)
        torch.testing.assert_close(live(x), gm(x), rtol=0, atol=0)
    assert {id(p) for p in live.parameters()} <= {id(p) for p in gm.parameters()}  # shared, never copied


def test_stage_graph_is_the_prefix_of_the_gated_graph_plus_a_head(small_digits):
    gm = _darts(small_digits)
    random_masks_(gm, seed=1)
    gm.eval()
    assign_stages(gm, 3)
    by_stage = count_params_by_stage(gm)
    assert sum(c.nonzero for c in by_stage.values()) == granular.count_params(gm).nonzero
    assert sum(c.total for c in by_stage.values()) == granular.count_params(gm).total
    x = torch.randn(2, *small_digits.example_input().shape[1:])
    end = stage_boundary(gm, 0)
    seen = {}
    interp = torch.fx.Interpreter(gm)
    orig = interp.run_node
    interp.run_node = lambda n: seen.setdefault(n.name, orig(n)) if n is end else orig(n)
    interp.run(x)
    from granular.heads import aux_head_for
    c, h, w = tensor_shape(end)[1:]
    head = aux_head_for(c, (h, w), 10, 0, by_stage[0].total).eval()
    sg = stage_graph(gm, 0, head)
    torch.testing.assert_close(sg(x), head(seen[end.name]), rtol=0, atol=0)
    later = {id(p) for n, p in gm.named_parameters() if n.startswith("cells.2.")}
    assert later and not later & {id(p) for p in sg.parameters()}  # the last stage is not built
    head_params = sum(p.numel() for p in sg.get_submodule(AUX_HEAD).parameters())
    assert 0.05 * by_stage[0].total <= head_params <= 0.1 * by_stage[0].total  # "about 10% of the stage"


def _multi(data, **kw):
    cfg = SearchConfig(**{"target_params": 40_000, "epochs": 12, "warmup_epochs": 1, "multi_stage": "on",
                          "batch_size": 48, "bn_recalibration_batches": 1, **kw})
    return make_searcher(_darts(data), data, cfg, progress=False)


@torch.no_grad()
def _prune_ops(s, keys):
    """Push ``keys`` below their thresholds and run a last round of the current stage (one
    that may commit every unit below threshold)."""
    for k in keys:
        s.bank.op[k].alpha.fill_(-10.0)
        s.bank.scopes[k].t_alpha.fill_(0.5)
    return s.pruning_round(goal=0, count=s.built_count, rounds_left=1,
                           allowed=lambda kind, key: kind == "op" and key in keys)


def test_regrowth_restores_exactly_the_op_it_picked(small_digits):
    s = _multi(small_digits, regrow=0.5)
    assert isinstance(s, MultiStageSearcher) and s.n_stages == 3
    s.enter_phase(1, fresh=True)
    ops = sorted(k for k in s.bank.op if s.unit_stage[("op", k)] == 1 and "sep_conv" in k)[:6]
    before = {k: {n: t.clone() for n, t in s._op_tensors(k).items()} for k in ops}
    _prune_ops(s, ops)
    assert all(float(s.bank.op[k].mask) == 0 for k in ops)
    alphas = {k: s.bank.op[k].alpha.clone() for k in ops}
    with torch.no_grad():  # what training does to pruned ops meanwhile must not leak into regrowth
        for k in ops:
            s.bank.op[k].alpha.add_(3.0)
            for t in s._op_tensors(k).values():
                if t.is_floating_point():
                    t.add_(1.0)
    info = s.regrow()
    assert info["quota"] == 3 and len(info["regrown_ops"]) == 3
    for k in ops:
        tensors = s._op_tensors(k)
        if k in info["regrown_ops"]:
            assert float(s.bank.op[k].mask) == 1
            assert torch.equal(s.bank.op[k].alpha, alphas[k])
            for n, t in tensors.items():
                assert torch.equal(t, before[k][n]), n
        else:
            assert float(s.bank.op[k].mask) == 0
            assert all(not torch.equal(t, before[k][n]) for n, t in tensors.items() if t.is_floating_point())
    assert info["regrown_units"]["op"] == 3
    assert any(k in n.name for k in info["regrown_ops"] for n in s.net.graph.nodes)  # trains again


def test_regrow_zero_disables_regrowth(small_digits):
    s = _multi(small_digits, regrow=0.0)
    s.enter_phase(1, fresh=True)
    ops = sorted(k for k in s.bank.op if s.unit_stage[("op", k)] == 1)[:5]
    _prune_ops(s, ops)
    masks = s._masks()
    info = s.regrow()
    assert info["quota"] == 0 and info["regrown_ops"] == []
    after = s._masks()
    assert all(torch.equal(v, after[k]) for k, v in masks.items())


def test_quota_allocation_follows_potential_within_capacity():
    share = _allocate(5, {"a": 3.0, "b": 1.0, "c": 0.0}, {"a": 10, "b": 10, "c": 10})
    assert share == {"a": 4, "b": 1, "c": 0}
    share = _allocate(5, {"a": 3.0, "b": 1.0}, {"a": 1, "b": 10})
    assert share == {"a": 1, "b": 4}


def test_killed_multi_stage_run_resumes_in_its_stage(small_digits, tmp_path, monkeypatch):
    short = {"epochs": 7, "prune_every": 1, "land": False}  # two epochs a stage: warm-up, then one round
    full = _multi(small_digits, **short)
    full.run_dir = tmp_path / "full"
    full.run_dir.mkdir()
    result = full.run()
    phases = [r["phase"] for r in result.history]
    assert phases[0] == "stage1-warmup" and any(p.startswith("stage2") for p in phases)
    kill_at = next(i for i, p in enumerate(phases) if p.startswith("stage2")) + 1  # inside stage 2

    killed = _multi(small_digits, **short)
    killed.run_dir = tmp_path / "killed"
    killed.run_dir.mkdir()
    calls = {"n": 0}
    real = Searcher.train_epoch

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > kill_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Searcher, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    monkeypatch.setattr(Searcher, "train_epoch", real)

    resumed = _multi(small_digits, **short)
    resumed.run_dir = killed.run_dir
    resumed.resume(killed.run_dir / CHECKPOINT)
    assert resumed.state["epoch"] == kill_at and resumed.phase == 1  # stage 2, where it died
    again = resumed.run()
    assert [r["phase"] for r in again.history] == phases
    assert again.params == result.params
    for a, b in zip(again.history, result.history):
        assert a["params"] == b["params"] and a.get("regrowth") == b.get("regrowth")
    rows = [json.loads(line) for line in (killed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, len(phases) + 1))


def test_single_resolution_model_stops_or_falls_back(small_digits, tmp_path, capsys):
    flat = tmp_path / "flat.py"
    flat.write_text("import torch.nn as nn\n\ndef build(num_classes=10, in_channels=1, **kw):\n"
                    "    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),\n"
                    "                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
                    "                         nn.Flatten(), nn.Linear(16, num_classes))\n")
    out = tmp_path / "run"
    code = main(["search", f"{flat}:build", "--target-params", "2K", "--multi-stage", "--epochs", "1",
                 "--warmup-epochs", "0", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "single resolution" in err and "--stage-fallback" in err
    assert len([line for line in err.strip().splitlines() if "error" in line.lower()]) == 1
    assert not out.exists()  # stopped before writing anything
    code = main(["search", f"{flat}:build", "--target-params", "2K", "--multi-stage", "--stage-fallback",
                 "--epochs", "1", "--warmup-epochs", "0", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert "searching it in one stage" in err and "single-stage" in err
    assert json.loads((out / "config.json").read_text())["search"]["single_resolution"] == "fallback"
    gm = granular.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3)), torch.randn(1, 1, 8, 8))
    with pytest.raises(GranularError, match="single resolution"):
        MultiStageSearcher(gm, small_digits, SearchConfig(target_params=10, multi_stage="on"), progress=False)


def test_multi_stage_search_reaches_its_target_and_stages_keep_their_thresholds(small_digits):
    s = _multi(small_digits, target_params=40_000, epochs=12, prune_every=1)
    seen = []
    real = s.enter_phase

    def spy(phase, fresh):
        stage1 = {sid: float(sc.t_alpha.detach()) for sid, sc in s.bank.scopes.items()
                  if hasattr(sc, "t_alpha") and s.scope_stage.get(sid) == 0}
        real(phase, fresh)
        s.init_thresholds()  # what the loop does when the phase's search starts
        s.state["thresholds_initialised"] = False
        seen.append((phase, stage1, {sid: float(s.bank.scopes[sid].t_alpha.detach()) for sid in stage1}, s.state["lambda"]))

    s.enter_phase = spy
    result = s.run()
    assert result.reached and 0.97 * 40_000 <= result.params.nonzero <= 40_000
    assert [p for p, *_ in seen][:1] == [1]
    for phase, before, after, lam in seen:  # a new phase leaves stage 1's thresholds and λ as they were
        assert before == after and lam > 0
    stage_ends = [r["stage_end"] for r in result.history if "stage_end" in r]
    assert [e["stage"] for e in stage_ends] == list(range(1, s.n_stages + 1))  # every stage, then the final phase
    assert all(e["goal_met"] and e["params"] <= e["goal"] for e in stage_ends)
