"""The search driver: target landing, the λ controller, thresholds, checkpoints and resume."""

import json

import pytest
import torch

import granular
from granular.cli import main
from granular.config import SearchConfig
from granular.data import load_data
from granular.errors import TargetError
from granular.driver import Searcher, check_target
from granular.masks import reachable_floor

from _models import USER_MODELS, user_model


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=96, seed=0)


def _searcher(digits, target, **cfg):
    gm = granular.prepare(user_model("resnet_like"), digits.example_input())
    return Searcher(gm, digits, SearchConfig(target_params=target, **cfg), progress=False)


def test_target_checks(digits):
    gm = granular.prepare(user_model("resnet_like"), digits.example_input())
    now = granular.count_params(gm)
    floor = reachable_floor(gm)
    assert floor.nonzero < now.nonzero
    with pytest.raises(TargetError, match="already has"):
        check_target(gm, now.nonzero)
    with pytest.raises(TargetError, match="below the smallest"):
        check_target(gm, floor.nonzero - 1)
    check_target(gm, floor.nonzero)


@pytest.mark.parametrize("weight_scale", ["global", "layer"])
def test_threshold_rules(digits, weight_scale):
    s = _searcher(digits, 5000, threshold_init="min", threshold_margin=0.2, weight_scale=weight_scale)
    s.init_thresholds()
    for k, scope in s.bank.scopes.items():
        if hasattr(scope, "t_alpha"):  # a margin below the gate, not on it
            assert scope.t_alpha.item() == pytest.approx(0.8 * torch.sigmoid(s.bank.op[k].alpha).item())
    every = torch.cat([s.struct.weight_of[k].detach().abs().flatten() for k in s.bank.weight])
    for k, m in s.bank.weight.items():  # weights are on the model's (or their layer's) normalised scale
        w = s.struct.weight_of[k].detach().abs()
        mean = every.mean() if weight_scale == "global" else w.mean()
        assert float(m.scale) == pytest.approx(float(mean), rel=1e-5)
        t = s.bank.scopes[s.struct.layer_scope[k]].t_omega.item()
        assert 0 <= t <= 0.8 * float((w / m.scale).min()) + 1e-7
    # nothing starts below its threshold: a round right after the initialisation has nothing to commit
    assert s._candidates() == []
    assert s.state["lambda"] > 0
    z = _searcher(digits, 5000, threshold_init="zero")
    z.init_thresholds()
    assert all(p.item() == 0 for p in z.bank.scopes.parameters())


def test_lambda_rises_when_the_thresholds_supply_less_than_the_quota(digits):
    s = _searcher(digits, 5000, lambda_init=1e-3, lambda_grow_max=4.0)
    s.init_thresholds()
    info = s.pruning_round()
    assert info["lambda_update"] == "raise" and info["pruned_params"] == 0 and info["supply"] == 0
    assert s.state["lambda"] == pytest.approx(4e-3)
    assert info["quota"] > 0 and not info["deadline"]


def test_no_unit_is_pruned_while_lambda_is_zero(digits):
    s = _searcher(digits, 5000, lambda_init=0.0, epochs=12, warmup_epochs=1, prune_every=1)
    s.run()
    assert s.state["lambda"] == 0
    before_deadline = [r for r in s.history if "round" in r and not r["deadline"]]
    assert before_deadline and all(r["pruned_params"] == 0 for r in before_deadline)


def test_a_round_commits_at_most_its_quota_furthest_below_first(digits):
    s = _searcher(digits, 6000, epochs=30, lambda_init=0.4)
    s.init_thresholds()
    with torch.no_grad():
        for scope in s.bank.scopes.values():
            for name, p in scope.named_parameters():
                p.fill_(0.6 if name != "t_omega" else 0.5)  # most units below their thresholds
    before = granular.count_params(s.gm).nonzero
    left = s.rounds_left()
    assert left > 3
    info = s.pruning_round()
    after = granular.count_params(s.gm).nonzero
    assert info["supply"] > info["quota"] > 0 and info["commit"] == "capped"
    assert before - after <= info["quota"] and after >= info["round_goal"]
    assert not s.state["done"]
    # the units the quota left below their thresholds are anchored back under them
    assert s._candidates() == []
    assert info["lambda_update"] == "ease"  # far more supply than quota: λ eases toward the quota's rate
    # last-unit protection: every sum keeps an op, every layer keeps a filter
    assert all(float(m.mask.sum()) >= 1 for m in s.bank.filter.values())


def test_a_round_sets_aside_a_unit_that_alone_would_pass_its_quota(digits):
    s = _searcher(digits, 6000, epochs=30)
    count = lambda: granular.count_params(s.gm)  # noqa: E731
    saved = s._masks()
    before = count().nonzero
    op = next(k for keys in s.struct.sums if len(keys) >= 2 for k in keys)
    big = [(-1.0, "op", op, None)]
    without_op = s._try(saved, big, count).nonzero
    small = [(-0.5, "weight", next(iter(s.bank.weight)), i) for i in range(40)]
    # the op first in line removes more than the quota allows; the weights after it fit
    goal = before - (before - without_op) // 2
    units, after = s._prefix(saved, big + small, goal, count, within=True)
    s._restore(saved)
    assert units == small and after.nonzero == before - 40 >= goal


def test_the_last_round_lands_within_3_percent_below_the_target(digits):
    s = _searcher(digits, 6000, epochs=30, lambda_init=1e-3)
    s.init_thresholds()  # nothing below threshold: the deadline takes the units closest to theirs
    s.state["epoch"] = 28  # warm-up 5, a round every 2 epochs: epoch 28 ends the last one
    assert s.rounds_left() == 1
    info = s.pruning_round()
    after = granular.count_params(s.gm).nonzero
    assert info["deadline"] and info["commit"] == "deadline" and s.state["done"]
    assert 0.97 * 6000 <= after <= 6000


def test_a_landing_fills_with_the_smallest_weights_of_the_model_not_of_each_layer(digits):
    """The deadline's fillers are ranked by raw distance to the threshold: a layer whose
    weights are 10x larger keeps them, even when thresholds are per-layer normalised."""
    s = _searcher(digits, 6000, epochs=30, lambda_init=1e-3, weight_scale="layer")
    big = max(s.bank.weight, key=lambda k: s.struct.weight_of[k].numel())
    with torch.no_grad():
        s.struct.weight_of[big].mul_(10)
    s.init_thresholds()
    s.state["epoch"] = 28
    d = s.decide_round(s.round_goal(None), lambda: granular.count_params(s.gm))
    weights = [u for u in d.units if u[1] == "weight"]
    assert d.plan.deadline and weights
    share_big = sum(u[2] == big for u in weights) / s.struct.weight_of[big].numel()
    share_all = len(weights) / sum(w.numel() for w in s.struct.weight_of.values())
    assert share_big < 0.3 * share_all


def test_protection_that_reopens_an_op_rebuilds_the_training_graph(digits):
    s = _searcher(digits, 5000)
    sums = [keys for keys in s.struct.sums if len(keys) >= 2]
    a, b = sums[0][:2]
    with torch.no_grad():
        for k in sums[0]:
            if k != a:
                s.bank.op[k].mask.zero_()  # a is the last op of its sum
        s.bank.op[b].alpha.fill_(5.0)      # b is the one protection prefers
    s.net = s.build_net()
    alive_before = s.alive_ops()
    from granular.driver.rounds import RoundDecision
    from granular.driver.controller import RoundPlan
    # the round commits a: protection re-opens b. The count of alive ops is unchanged, the set is not
    d = RoundDecision(units=[(-1.0, "op", a, None)], below=1, supply=1, plan=RoundPlan(0, 1, False), target=0,
                      before=granular.count_params(s.gm).nonzero, after=granular.count_params(s.gm),
                      how="all", saved=s._masks())
    s.apply_round(d)
    assert len(s.alive_ops()) == len(alive_before) and s.alive_ops() != alive_before
    from granular.passes.fold_gates import GatedNorm
    live = set()  # the modules the training graph runs, the gates fold_gates folded into norms included
    for n in s.net.graph.nodes:
        if n.op == "call_module":
            m = s.net.get_submodule(str(n.target))
            live.update(id(p) for p in (m._parts if isinstance(m, GatedNorm) else (m,)) if p is not None)
    assert id(s.bank.op[b]) in live and id(s.bank.op[a]) not in live


def test_mu_acts_from_the_first_step(digits):
    plain = _searcher(digits, 5000)
    costly = _searcher(digits, 5000, mu=1.0)
    assert costly.state["op_cost"] and max(costly.state["op_cost"].values()) == pytest.approx(1.0)
    plain.init_thresholds(), costly.init_thresholds()
    assert float(costly._resource_loss().detach()) > float(plain._resource_loss().detach())


def test_a_weight_only_search_reaches_its_target_by_pruning_before_the_deadline(tmp_path):
    from granular.config import GateConfig
    data = load_data("digits", batch_size=96, seed=0)
    gm = granular.prepare(user_model("vgg_like"), data.example_input(),
                          GateConfig(op_gates=False, filter_gates=False, weight_masks=True))
    dense = granular.count_params(gm).nonzero
    target = int(0.4 * dense)
    s = Searcher(gm, data, SearchConfig(target_params=target, epochs=16, warmup_epochs=2, prune_every=1), progress=False)
    result = s.run()
    assert result.reached and 0.97 * target <= result.params.nonzero <= target
    rounds = [r for r in s.history if "round" in r]
    # the thresholds did the work: most of the pruning happened before the deadline round
    early = sum(r["pruned_params"] for r in rounds if not r["deadline"])
    assert early > 0.7 * (dense - result.params.nonzero)


def test_search_meets_target_and_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    code = main(["search", USER_MODELS["vgg_like"], "--target-params", "20K", "--epochs", "40",
                 "--out", str(run), "--no-progress"])
    assert code == 0
    meta = json.loads((run / "model" / "granular.json").read_text())
    assert 0.97 * 20000 <= meta["nonzero_parameters"] <= 20000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["phase"] == "warmup" and rows[-1]["params"] == meta["nonzero_parameters"]
    for key in ("threshold_alpha", "threshold_beta", "threshold_omega", "keep_op", "keep_filter",
                "keep_weight", "loss", "val_acc", "lambda"):
        assert key in rows[-1]
    cfg = json.loads((run / "config.json").read_text())
    assert SearchConfig.from_dict(cfg["search"]).target_params == 20000
    arch = json.loads((run / "arch.json").read_text())
    assert arch["params"]["nonzero"] == meta["nonzero_parameters"]
    assert all("width" in layer for layer in arch["layers"].values() if layer["kept"])
    model = granular.load(run / "model")
    assert sum(int(torch.count_nonzero(p)) for p in model.parameters()) == meta["nonzero_parameters"]


def test_killed_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    """A search killed after epoch 8's checkpoint and resumed equals the one that ran straight
    through (the budget controller plans from the same epoch budget in both)."""
    from granular.driver.checkpoint import CheckpointMixin
    args = ["search", USER_MODELS["resnet_like"], "--target-params", "4K", "--no-progress", "--seed", "3",
            "--epochs", "14"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    write = CheckpointMixin.checkpoint

    def killed_after_8(self):
        write(self)
        if self.state["epoch"] == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointMixin, "checkpoint", killed_after_8)
    assert main(args + ["--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(CheckpointMixin, "checkpoint", write)
    assert main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    assert rows("a") == rows("b")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temp files."""
    run = tmp_path / "run"
    assert main(["search", USER_MODELS["vgg_like"], "--target-params", "20K", "--epochs", "1",
                 "--out", str(run), "--no-progress"]) == 3
    good = (run / "checkpoint.pt").read_bytes()

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    s = _searcher(load_data("digits", batch_size=96), 5000)
    s.run_dir = run
    with pytest.raises(OSError):
        s.checkpoint()
    assert (run / "checkpoint.pt").read_bytes() == good
    assert not list(run.glob("*.tmp"))


def test_resume_rewrites_a_log_row_the_checkpoint_never_saw(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["search", USER_MODELS["vgg_like"], "--out", str(run), "--no-progress"]
    # a round every 2 epochs: epoch 2 ends before the first one, so the target is not reached
    assert main(args + ["--target-params", "20K", "--epochs", "2", "--warmup-epochs", "1", "--prune-every", "2"]) == 3
    with open(run / "metrics.jsonl", "a") as f:  # killed after logging epoch 3, before its checkpoint
        f.write(json.dumps({"epoch": 3, "phase": "warmup"}) + "\n")
    # the target is read from the run; epoch 3's round is the budget's last, so it lands
    assert main(args + ["--epochs", "3", "--resume"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert main(args + ["--target-params", "30K", "--resume"]) == 2
    assert "searches for 20,000 parameters" in capsys.readouterr().err


def test_mu_costs_survive_resume(digits, tmp_path):
    s = _searcher(digits, 5000, mu=1.0, epochs=3, warmup_epochs=1, prune_every=1)
    s.run_dir = tmp_path
    s.cfg.epochs = 2  # stop after one round: the checkpoint holds the costs that round left
    s.run()
    costs = dict(s.state["op_cost"])
    assert costs and any(0 < v < 1 for v in costs.values())
    again = _searcher(digits, 5000, mu=1.0, epochs=3, warmup_epochs=1, prune_every=1)
    again.state["op_cost"] = {}
    again.resume(tmp_path / "checkpoint.pt")
    assert again.state["op_cost"] == costs
    assert float(again._resource_loss().detach()) == pytest.approx(float(s._resource_loss().detach()))
