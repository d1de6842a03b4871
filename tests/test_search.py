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


def test_threshold_rules(digits):
    s = _searcher(digits, 5000, threshold_init="min")
    s.init_thresholds()
    for k, scope in s.bank.scopes.items():
        if hasattr(scope, "t_alpha"):
            assert scope.t_alpha.item() == pytest.approx(torch.sigmoid(s.bank.op[k].alpha).item())
        if hasattr(scope, "t_omega"):
            assert 0 < scope.t_omega.item() < 0.05
    z = _searcher(digits, 5000, threshold_init="zero")
    z.init_thresholds()
    assert all(p.item() == 0 for p in z.bank.scopes.parameters())


def test_round_with_nothing_below_threshold_raises_lambda(digits):
    s = _searcher(digits, 5000, threshold_init="zero")
    s.init_thresholds()
    info = s.pruning_round()
    assert info["lambda_update"] == "raise" and info["pruned_params"] == 0
    assert s.state["delta"] == pytest.approx(4e-5) and s.state["lambda"] == pytest.approx(4e-5)
    s.pruning_round()
    assert s.state["delta"] == pytest.approx(1.6e-4) and s.state["lambda"] == pytest.approx(2e-4)


def test_overshooting_round_lands_just_under_the_target_and_halves_lambda(digits):
    s = _searcher(digits, 6000)
    s.state["lambda"] = 0.4
    with torch.no_grad():
        for scope in s.bank.scopes.values():
            for name, p in scope.named_parameters():
                p.fill_(0.6 if name != "t_omega" else 0.05)  # most units below their thresholds
    before = granular.count_params(s.gm).nonzero
    info = s.pruning_round()
    after = granular.count_params(s.gm).nonzero
    assert info["landed"] and s.state["done"]
    assert 0.99 * 6000 <= after <= 6000 < before  # within land_within (1%) of the target
    assert info["lambda_update"] == "halve" and s.state["lambda"] == pytest.approx(0.2)
    # last-unit protection: every sum keeps an op, every layer keeps a filter
    assert all(float(m.mask.sum()) >= 1 for m in s.bank.filter.values())


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


def test_killed_search_resumes_to_the_same_result(tmp_path):
    """A search stopped after 8 epochs and resumed equals the one that ran straight through."""
    args = ["search", USER_MODELS["resnet_like"], "--target-params", "4K", "--no-progress", "--seed", "3"]
    assert main(args + ["--epochs", "14", "--out", str(tmp_path / "a")]) in (0, 3)
    assert main(args + ["--epochs", "8", "--out", str(tmp_path / "b")]) == 3
    assert main(args + ["--epochs", "14", "--out", str(tmp_path / "b"), "--resume"]) in (0, 3)

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
    assert main(args + ["--target-params", "20K", "--epochs", "2", "--warmup-epochs", "1"]) == 3
    with open(run / "metrics.jsonl", "a") as f:  # killed after logging epoch 3, before its checkpoint
        f.write(json.dumps({"epoch": 3, "phase": "warmup"}) + "\n")
    assert main(args + ["--epochs", "3", "--resume"]) == 3  # the target is read from the run
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert main(args + ["--target-params", "30K", "--resume"]) == 2
    assert "searches for 20,000 parameters" in capsys.readouterr().err
