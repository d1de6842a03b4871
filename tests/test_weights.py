"""--weights FILE: a state dict (.pt/.pth/.safetensors) goes into the model before tracing;
bad files get one line and exit 2; the run records the file, and a search starts from it."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from granular.cli import main
from granular.errors import CheckpointError
from granular.spec import build_model
from granular.weights import load_weights, read_state_dict

from _models import assert_one_line_error

TINY_CNN = textwrap.dedent("""
    from torch import nn

    def model(num_classes=10, in_channels=1):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
""")


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "model.py").write_text(TINY_CNN)
    return str(tmp_path / "model.py")


def _model(spec, seed=1, num_classes=10):
    torch.manual_seed(seed)
    return build_model(spec, num_classes=num_classes, in_channels=1)


def _search(tmp_path, spec, *extra, out="r"):
    return main(["search", spec, "--target-params", "700", "--epochs", "1", "--warmup-epochs", "0",
                 "--batch-size", "64", "--out", str(tmp_path / out), "--no-progress", *extra])


def _same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["raw.pt", "state_dict.pth", "model.pt", "raw.safetensors"])
def test_loads_each_layout(tmp_path, spec, layout):
    trained = _model(spec, seed=1).state_dict()
    kind, _, suffix = layout.partition(".")
    path = tmp_path / layout
    if suffix == "safetensors":
        save_file(trained, str(path))
    else:
        torch.save(trained if kind == "raw" else {kind: trained, "epoch": 3}, path)
    model = load_weights(_model(spec, seed=2), path)
    assert _same_state(model.state_dict(), trained)


def test_timm_style_reads_timm_checkpoints(tmp_path, spec):
    trained = _model(spec, seed=1).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in trained.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, tmp_path / "ck.pth.tar")
    model = load_weights(_model(spec, seed=2), tmp_path / "ck.pth.tar", timm_style=True)
    assert _same_state(model.state_dict(), ema)  # timm's rule: the EMA weights, DDP prefix stripped


def test_search_records_the_weights_and_resumes_without_them(tmp_path, spec, capsys):
    path = tmp_path / "w.safetensors"
    save_file(_model(spec, seed=1).state_dict(), str(path))
    # one epoch after no warm-up: a round every epoch, and the only one is the budget's last, so it lands
    assert _search(tmp_path, spec, "--weights", str(path)) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["weights"] == str(path.resolve())
    path.unlink()  # the checkpoint supersedes the file: resume, export and report need it no more
    code = main(["search", spec, "--resume", "--epochs", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 0, capsys.readouterr().err  # the search is done: resuming it exports it again
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "e")]) == 0


def test_missing_file(tmp_path, spec, capsys):
    code = _search(tmp_path, spec, "--weights", str(tmp_path / "nope.pt"))
    assert_one_line_error(code, capsys.readouterr().err, "nope.pt", "no such file")
    assert not (tmp_path / "r").exists()


def test_keys_that_do_not_match(tmp_path, spec, capsys):
    state = _model(spec).state_dict()
    state["head.weight"] = state.pop("8.weight")
    torch.save(state, tmp_path / "w.pt")
    code = _search(tmp_path, spec, "--weights", str(tmp_path / "w.pt"))
    assert_one_line_error(code, capsys.readouterr().err, "missing 8.weight", "unexpected head.weight")


def test_shapes_that_do_not_match(tmp_path, spec, capsys):
    torch.save(_model(spec, num_classes=5).state_dict(), tmp_path / "w.pt")
    code = _search(tmp_path, spec, "--weights", str(tmp_path / "w.pt"))
    assert_one_line_error(code, capsys.readouterr().err, "8.weight is [5, 16] in the file but [10, 16] in the model")


@pytest.mark.parametrize("content", [b"not a pickle", None])
def test_not_a_state_dict(tmp_path, content):
    path = tmp_path / "w.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        read_state_dict(path)
    assert "\n" not in str(excinfo.value) and "w.pt" in str(excinfo.value)


# --------------------------------------------------------------------------- a search starts from them


@pytest.fixture
def trained(tmp_path, spec):
    """The tiny CNN trained briefly on digits, saved, and its validation accuracy."""
    from granular.data import load_data

    data = load_data("digits", batch_size=64, seed=0)
    model = _model(spec, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for epoch in range(8):
        for x, y in data.train_loader(epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.val_loader())
    path = tmp_path / "trained.pt"
    torch.save(model.state_dict(), path)
    return path, model.state_dict(), correct / len(data.val_set)


def _first_searcher(tmp_path, spec, path):
    """The searcher `granular search --weights` would run, before its first training step."""
    from granular.cli.rundir import build_run
    from granular.config import SearchConfig
    from granular.driver import make_searcher

    cfg = SearchConfig(target_params=700, epochs=1, warmup_epochs=0, batch_size=64)
    run = {"spec": spec, "dataset": "digits", "weights": str(path), "search": cfg.to_dict()}
    data, gm, cfg = build_run(run)
    return make_searcher(gm, data, cfg, run_dir=None, progress=False)


def test_the_gated_graph_holds_the_loaded_weights(tmp_path, spec, trained):
    path, state, accuracy = trained
    assert accuracy > 0.5  # the brief training learned something, so a reset would show
    gm_state = _first_searcher(tmp_path, spec, path).gm.state_dict()
    assert all(torch.equal(gm_state[k], v) for k, v in state.items())


def test_first_evaluation_is_the_loaded_models_accuracy(tmp_path, spec, trained):
    path, _, accuracy = trained
    searcher = _first_searcher(tmp_path, spec, path)
    assert searcher.evaluate(searcher.net) == pytest.approx(accuracy, abs=1e-9)


def test_a_timm_model_takes_a_timm_checkpoint(tmp_path):
    from granular.cli.rundir import build_run
    from granular.config import SearchConfig

    torch.manual_seed(3)
    trained = build_model("timm:test_resnet", num_classes=10, in_channels=3, image_size=32).state_dict()
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in trained.items()}}, tmp_path / "ck.pth")
    run = {"spec": "timm:test_resnet", "dataset": "fake", "weights": str(tmp_path / "ck.pth"),
           "search": SearchConfig(target_params=1000, batch_size=32).to_dict()}
    gm_state = build_run(run)[1].state_dict()
    assert all(torch.equal(gm_state[k], v) for k, v in trained.items())
