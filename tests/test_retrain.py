"""``granular retrain`` and ``export --finetune``: the discovered architecture, trained again."""

from __future__ import annotations

import json

import pytest
import torch

import granular
from granular.cli import main
from granular.config import RetrainConfig
from granular.retrain import _alignment_width, aligned_, build_retrain_model
from granular.search_spaces import build_search_space, describe_op

from _models import USER_MODELS, user_model


def test_alignment_rule_follows_method_md():
    assert _alignment_width([6, 8], 8) == 7          # mean >= C/2
    assert _alignment_width([1, 2, 6], 8) == 6       # mean < C/2, max >= C/2
    assert _alignment_width([1, 2], 8) == 4          # both below: C/2


def _gated_darts(seed=0):
    torch.manual_seed(seed)
    gm = granular.prepare(build_search_space("darts:tiny", 10, 1), torch.randn(2, 1, 8, 8))
    granular.testing.random_masks_(gm, op=0.3, filter=0.5, weight=0.3, seed=seed)
    return gm


def test_aligned_architecture_gives_each_node_one_width():
    gm = _gated_darts()
    bank = gm.granular_gates
    widths = aligned_(gm)
    assert widths and all("out" in roles for roles in widths.values())
    by_node: dict = {}
    for key, gate in bank.op.items():
        d = describe_op(key)
        if d and float(gate.mask) > 0:
            outs = [k for k in bank.filter if k.startswith(key)]
            last = sorted(outs)[-1] if outs else None
            if last:
                by_node.setdefault((d["cell"], d.get("dst")), set()).add(tuple(bank.filter[last].mask.tolist()))
    # every op feeding one node keeps the same channel set, of the cell's aligned width
    assert by_node and all(len(sets) == 1 for sets in by_node.values())
    gm.eval()
    compact = granular.export(gm)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compact(x), gm(x), atol=1e-5)


def test_from_scratch_model_reinitialises_restores_norms_and_keeps_weight_zeros():
    gm = _gated_darts(1)
    gm.eval()
    exported = granular.export(gm)
    compact, info = build_retrain_model(gm, RetrainConfig(arch="exact"))
    assert info["norms_restored"] > 0
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in compact.modules())
    zeros_before = {n: (p == 0) for n, p in exported.named_parameters() if p.dim() > 1}
    after = dict(compact.named_parameters())
    for name, z in zeros_before.items():
        assert torch.equal(after[name] == 0, z), name          # the searched sparsity pattern, exactly
        assert not torch.equal(after[name], dict(exported.named_parameters())[name])   # new values
    compact.train()
    assert compact(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    code = main(["search", USER_MODELS["resnet_like"], "--target-params", "6K", "--epochs", "3",
                 "--warmup-epochs", "1", "--prune-every", "1", "--out", str(out), "--no-progress"])
    assert code == 0  # the last round lands on the target
    return out


def test_retrain_runs_an_epoch_and_writes_its_metrics(searched, capsys):
    out = searched / "rt"
    code = main(["retrain", str(searched), "--epochs", "1", "--out", str(out), "--no-progress",
                 "--aux-weight", "0.4", "--drop-path", "0.1", "--label-smoothing", "0.1"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["val_top1"] <= rows[0]["val_top5"] <= 1
    assert result["top1"] == pytest.approx(rows[0]["val_top1"])
    assert result["accuracy_density"] == pytest.approx(100 * result["top1"] / (result["nonzero"] / 1e6))
    model = granular.load(out / "model")
    assert sum(int(torch.count_nonzero(p)) for p in model.parameters()) == result["nonzero"]
    assert sum(p.numel() for p in model.parameters()) == result["params"]


def test_killed_retrain_resumes_to_the_same_result(searched, capsys, monkeypatch):
    from granular.data import DataBundle

    whole, killed = searched / "whole", searched / "killed"
    argv = ["--epochs", "2", "--no-progress", "--drop-path", "0.2"]
    assert main(["retrain", str(searched), "--out", str(whole), *argv]) == 0
    assert main(["retrain", str(searched), "--out", str(whole), *argv]) == 2
    assert "--resume" in capsys.readouterr().err          # an existing retrain is never overwritten

    loader = DataBundle.train_loader

    def dies_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return loader(self, epoch)
    monkeypatch.setattr(DataBundle, "train_loader", dies_in_epoch_two)
    assert main(["retrain", str(searched), "--out", str(killed), *argv]) == 130
    monkeypatch.setattr(DataBundle, "train_loader", loader)
    assert main(["retrain", str(searched), "--out", str(killed), "--resume", "--no-progress"]) == 0

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(killed) == rows(whole) and len(rows(whole)) == 2
    assert json.loads((killed / "result.json").read_text())["top1"] == \
        json.loads((whole / "result.json").read_text())["top1"]


def test_export_finetune_starts_from_the_searched_function(searched, capsys):
    out = searched / "ft"
    assert main(["export", str(searched), "--finetune", "--epochs", "1", "--lr", "1e-9", "--out", str(out),
                 "--no-progress"]) == 0
    tuned = granular.load(out / "model")
    exported = granular.load(searched / "model")
    from granular.data import load_data
    x = load_data("digits", batch_size=96, seed=0).example_input()
    with torch.no_grad():   # with a vanishing learning rate, fine-tuning keeps the searched function,
        a, b = tuned(x), exported(x)   # up to its norms' statistics, re-estimated in training mode
    assert float((a - b).norm() / b.norm()) < 0.05
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) > 0.95


def test_finetuning_keeps_every_exact_zero_so_the_count_stays_the_searched_one(monkeypatch):
    """Regression: an exported bias of exactly 0 counts as pruned, but fine-tuning moved it,
    and the fine-tuned model ended 13 parameters above the target its search landed on."""
    import granular.retrain as retrain
    from granular.data import load_data

    data = load_data("digits", batch_size=96, seed=0, limit=300)
    gm = granular.prepare(user_model("resnet_like"), data.example_input())
    granular.testing.random_masks_(gm, op=0.0, filter=0.3, weight=0.5, seed=0)
    export = retrain.export

    def zero_biases(g):   # as when every weight into a channel was masked
        m = export(g)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p[0] = 0.0
        return m
    monkeypatch.setattr(retrain, "export", zero_biases)
    cfg = RetrainConfig(epochs=1, finetune=True, lr=0.05)
    compact, info = build_retrain_model(gm, cfg)
    assert info["norms_restored"] == 0   # folding a norm back would move the zero bias entry
    biases = [p for p in compact.parameters() if p.dim() == 1]
    before = sum(int(torch.count_nonzero(p)) for p in compact.parameters())
    retrain.train_compact(compact, data, cfg)
    assert sum(int(torch.count_nonzero(p)) for p in compact.parameters()) <= before
    assert biases and all(float(b[0]) == 0.0 for b in biases)


def test_finetune_norms_start_as_the_exported_function_and_fold_back_exactly():
    from granular.data import load_data
    from granular.passes import fold_norms
    from granular.passes.restore_norms import NORM_ROOT
    from granular.retrain import calibrate_norms, train_compact

    data = load_data("digits", batch_size=96, seed=0, limit=300)
    model = user_model("resnet_like")
    torch.manual_seed(0)
    with torch.no_grad():   # trained norms: nonzero folded biases (a fresh norm folds to bias 0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.bias.uniform_(-0.5, 0.5)
    gm = granular.prepare(model, data.example_input())
    granular.testing.random_masks_(gm, op=0.0, filter=0.3, weight=0.5, seed=0)
    gm.eval()
    exported = granular.export(gm)
    compact, info = build_retrain_model(gm, RetrainConfig(finetune=True))
    norms = [m for m in compact.get_submodule(NORM_ROOT).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert info["norms_restored"] == len(norms) > 0
    x = data.example_input()
    assert calibrate_norms(compact, [x]) == len(norms)
    compact.eval()
    with torch.no_grad():
        assert torch.allclose(compact(x), exported(x), rtol=1e-4, atol=1e-4)  # calibrated: the identity
        for m in norms:   # then norms that have trained: the fold must carry them exactly
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
        y = compact(x)
    zeros = {n: p == 0 for n, p in compact.named_parameters() if p.dim() > 1}
    assert fold_norms(compact) == len(norms)
    assert not hasattr(compact, NORM_ROOT)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in compact.modules())
    with torch.no_grad():
        assert torch.allclose(compact(x), y, rtol=1e-4, atol=1e-5)
    params = dict(compact.named_parameters())
    assert all(torch.equal(params[n] == 0, z) for n, z in zeros.items())   # the searched sparsity
    # a whole fine-tune ships folded, with the searched count
    compact, _ = build_retrain_model(gm, RetrainConfig(finetune=True, epochs=1))
    out = train_compact(compact, data, RetrainConfig(finetune=True, epochs=1))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in compact.modules())
    assert out["params"] == sum(p.numel() for p in exported.parameters())
    assert out["nonzero"] <= sum(int(torch.count_nonzero(p)) for p in exported.parameters())


def test_filter_pruned_model_trains_from_scratch_and_its_zeros_stay_zero():
    """Regression: fixed-zero rows behind restored BatchNorms got gradients of ~1e5, the clip
    then shrank every useful gradient to nothing, and the model trained to chance (15%)."""
    from granular.config import GateConfig
    from granular.data import load_data
    from granular.retrain import train_compact

    data = load_data("digits", batch_size=96, seed=0, limit=600)
    torch.manual_seed(0)
    gm = granular.prepare(build_search_space("darts:tiny", 10, 1), data.example_input(), GateConfig(weight_masks=False))
    granular.testing.random_masks_(gm, op=0.3, filter=0.5, weight=0.0, seed=0)
    compact, _ = build_retrain_model(gm, RetrainConfig(epochs=2))
    zeros = {n: (p == 0).clone() for n, p in compact.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
    assert zeros
    out = train_compact(compact, data, RetrainConfig(epochs=2))
    assert out["history"][-1]["train_acc"] > 0.6
    params = dict(compact.named_parameters())
    assert all(bool((params[n][z] == 0).all()) for n, z in zeros.items())
