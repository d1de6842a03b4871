"""The command line: bad input gives one line, a non-zero exit and no traceback."""

import json
import subprocess
import sys
import textwrap

import pytest

from granular.cli import main

from _models import USER_MODELS, assert_one_line_error

VGG = USER_MODELS["vgg_like"]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_model_file_without_a_model(tmp_path, capsys):
    f = tmp_path / "empty_model.py"
    f.write_text("import torch\n\ndef helper(x):\n    return x\n")
    code, err = _run(capsys, "search", str(f), "--target-params", "1K", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "no model found", "empty_model.py")


def test_untraceable_model_names_module_and_construct(tmp_path, capsys):
    f = tmp_path / "branchy.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3, padding=1)
            def forward(self, x):
                y = self.conv(x)
                if y.mean() > 0:
                    return y
                return -y

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = Gate()
                self.fc = nn.Linear(4 * 64, 10)
            def forward(self, x):
                return self.fc(torch.flatten(self.gate(x), 1))
    """))
    code, err = _run(capsys, "search", str(f), "--target-params", "1K", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "'gate' (Gate)", "control flow", "leaf_modules")


def test_target_at_or_above_model_size(tmp_path, capsys):
    code, err = _run(capsys, "search", VGG, "--target-params", "1M", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "already has", "nothing to prune")


def test_target_below_reachable(tmp_path, capsys):
    code, err = _run(capsys, "search", VGG, "--target-params", "5", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "below the smallest model", "at least")


@pytest.mark.parametrize("bad", ["abc", "12Q", "-5", "0"])
def test_non_numeric_target(tmp_path, capsys, bad):
    code, err = _run(capsys, "search", VGG, "--target-params", bad, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, bad)


def test_missing_dataset_directory(tmp_path, capsys):
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--dataset",
                     f"imagefolder:{tmp_path / 'nope'}", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "does not exist")


def test_unknown_spec(tmp_path, capsys):
    code, err = _run(capsys, "search", "resnet9000", "--target-params", "20K", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown model spec", "darts:tiny")


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--epochs", "1", "--out", str(run),
                     "--no-progress")
    assert code == 3, err  # one epoch cannot reach the target: said plainly, exit 3
    assert "target not reached" in err
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--out", str(run), "--resume")
    assert_one_line_error(code, err, "corrupt", "checkpoint")


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--out", str(run))
    assert_one_line_error(code, err, "already holds a search", "--resume")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "granular.cli", "search", VGG, "--target-params", "lots",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_inspect_a_timm_model(capsys):
    assert main(["inspect", "timm:test_resnet"]) == 0
    out = capsys.readouterr().out
    assert "units per granularity" in out and "operation (α)" in out and "reachable floor" in out
    assert "operation units" in out and "layer1_0" in out


def test_inspect_reports_untraceable_module_and_goes_on(tmp_path, capsys):
    f = tmp_path / "partly.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gate(nn.Module):
            def forward(self, x):
                return x if x.mean() > 0 else -x

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Conv2d(1, 8, 3, padding=1)
                self.b = nn.Conv2d(8, 8, 3, padding=1)
                self.gate = Gate()
                self.head = nn.Linear(8, 10)
            def forward(self, x):
                return self.head(self.gate(self.b(torch.relu(self.a(x)))).mean((2, 3)))
    """))
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "not traceable" in out and "gate" in out and "--leaf Gate" in out
    code, err = _run(capsys, "inspect", str(f), "--strict")
    assert_one_line_error(code, err, "'gate' (Gate)", "--leaf Gate")


def test_unknown_zoo_model_suggests_close_names(capsys):
    code, err = _run(capsys, "inspect", "timm:resnet1")
    assert_one_line_error(code, err, "timm has no model 'resnet1'", "did you mean")


def test_torchvision_model_on_grayscale_data_says_how_to_fix(tmp_path, capsys):
    code, err = _run(capsys, "search", "torchvision:resnet18", "--target-params", "1M", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "3-channel images", "timm:resnet18")


def test_model_without_prunable_units_says_so(tmp_path, capsys):
    f = tmp_path / "single.py"
    f.write_text("from torch import nn\n\ndef model(num_classes=10, in_channels=1):\n"
                 "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))\n")
    code, err = _run(capsys, "inspect", str(f))
    assert_one_line_error(code, err, "no prunable units")


def test_search_a_timm_model(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["search", "timm:test_resnet", "--dataset", "fake", "--target-params", "150K", "--epochs", "2",
                 "--warmup-epochs", "1", "--prune-every", "1", "--batch-size", "32", "--out", str(out),
                 "--no-progress"])
    # multi-stage (3 resolutions): two epochs end inside the first stage, so the target is not reached
    err = capsys.readouterr().err
    assert code == 3 and "target not reached" in err, err
    assert json.loads((out / "config.json").read_text())["spec"] == "timm:test_resnet"
    assert (out / "model" / "model.safetensors").is_file()


def test_leaf_that_names_no_module_class(tmp_path, capsys):
    code, err = _run(capsys, "search", VGG, "--target-params", "1K", "--leaf", "NoSuchBlock",
                     "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "--leaf NoSuchBlock", "no module of class")


def test_granularities_choose_the_gates(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--epochs", "1", "--out", str(run),
                     "--no-progress", "--granularities", "filter")
    assert code == 3, err  # one epoch: not reached, but the run directory is written
    gates = json.loads((run / "config.json").read_text())["search"]["gates"]
    assert (gates["op_gates"], gates["filter_gates"], gates["weight_masks"]) == (False, True, False)
    ck = __import__("torch").load(run / "checkpoint.pt", weights_only=False)
    names = [k for k in ck["model"] if k.startswith("granular_gates.")]
    assert any(".filter." in k for k in names) and not any(".weight." in k or ".op." in k for k in names)


def test_unknown_granularity(tmp_path, capsys):
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--out", str(tmp_path / "r"),
                     "--granularities", "op,channel")
    assert_one_line_error(code, err, "--granularities", "channel")
    assert not (tmp_path / "r").exists()


def test_search_lr_sets_the_weights_learning_rate_only(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--epochs", "1", "--out", str(run),
                     "--no-progress", "--lr", "0.05")
    assert code == 3, err
    assert json.loads((run / "config.json").read_text())["search"]["lr_weights"] == 0.05
    ck = __import__("torch").load(run / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in ck["opt_w"]["param_groups"]] == [0.05]
    assert 0.05 not in [g["lr"] for g in ck["opt_a"]["param_groups"]]  # gates and thresholds keep theirs


def test_search_lr_defaults_by_gate_start(tmp_path, capsys):
    """A user's model starts its gates as the identity and searches at 0.03; the search
    spaces start them at σ(0) = 0.5 and keep the paper's 0.01."""
    import torch
    from granular import prepare
    from granular.config import SearchConfig, weights_lr
    from granular.meta import GATE_START
    from granular.search_spaces import build_search_space

    run = tmp_path / "run"
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--epochs", "1", "--out", str(run),
                     "--no-progress")
    assert code == 3, err
    assert json.loads((run / "config.json").read_text())["search"]["lr_weights"] is None
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in ck["opt_w"]["param_groups"]] == [0.03]
    gm = prepare(build_search_space("darts:tiny", 10, 1), torch.randn(2, 1, 8, 8))
    assert gm.meta[GATE_START] == "half" and weights_lr(SearchConfig(), gm.meta[GATE_START]) == 0.01
    assert weights_lr(SearchConfig(lr_weights=0.2), "half") == 0.2


def test_search_lr_ramp_rises_from_zero_over_its_epochs(tmp_path, capsys):
    """The weights' rate rises linearly over --lr-ramp epochs: one epoch into a two-epoch
    ramp the saved optimiser holds half the rate."""
    import torch

    run = tmp_path / "run"
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--epochs", "1", "--lr-ramp", "2",
                     "--out", str(run), "--no-progress")
    assert code == 3, err
    assert json.loads((run / "config.json").read_text())["search"]["lr_ramp_epochs"] == 2
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in ck["opt_w"]["param_groups"]] == [pytest.approx(0.015)]
    code, err = _run(capsys, "search", VGG, "--target-params", "20K", "--lr-ramp", "-1", "--out",
                     str(tmp_path / "bad"), "--no-progress")
    assert code != 0 and "lr_ramp_epochs must be non-negative" in err
