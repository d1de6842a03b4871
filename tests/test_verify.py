"""The export invariant where models are written: ``search`` and ``export`` check the compact
model on a batch of the run's data and refuse to save one that computes something else."""

import pytest
import torch

import granular
from granular.cli import main
from granular.data import load_data
from granular.errors import ExportError
from granular.verify import verify_export

from _models import USER_MODELS, assert_one_line_error, user_model


@pytest.fixture(scope="module")
def pruned():
    data = load_data("digits", batch_size=32, seed=0, limit=100)
    gm = granular.prepare(user_model("resnet_like"), data.example_input())
    granular.testing.random_masks_(gm, op=0.3, filter=0.3, weight=0.3, seed=0)
    return gm.eval(), data


def test_a_faithful_export_passes(pruned):
    gm, data = pruned
    x = next(iter(data.val_loader()))[0]
    assert verify_export(gm, granular.export(gm), x) <= 1e-4


def test_an_export_that_computes_something_else_is_refused(pruned):
    gm, data = pruned
    compact = granular.export(gm)
    with torch.no_grad():
        next(p for p in compact.parameters() if p.dim() > 1).mul_(1.5)
    x = next(iter(data.val_loader()))[0]
    with pytest.raises(ExportError, match="relative"):
        verify_export(gm, compact, x)


def test_granular_export_refuses_to_save_a_wrong_model(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code = main(["search", USER_MODELS["resnet_like"], "--target-params", "6K", "--epochs", "3", "--warmup-epochs",
                 "1", "--prune-every", "1", "--batch-size", "480", "--out", str(run), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    import granular.cli.export as cli_export
    real = cli_export.export

    def wrong(gm):
        compact = real(gm)
        with torch.no_grad():
            for p in compact.parameters():
                p.add_(0.1)
        return compact
    monkeypatch.setattr(cli_export, "export", wrong)
    code = main(["export", str(run), "--out", str(tmp_path / "e")])
    assert_one_line_error(code, capsys.readouterr().err, "does not compute what the pruned one does", "not saved")
    assert not (tmp_path / "e").exists()
    monkeypatch.setattr(cli_export, "export", real)
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "model.safetensors").is_file()


def test_check_export_never_compares_a_constant_output():
    """A zero-initialised classifier (torchvision's ViT has one) makes every output its bias:
    a comparison of outputs then passes whatever export did. check_export gives such layers
    random weights, and refuses outright when the gated output is still constant."""
    from torch import nn

    from granular.testing import check_export, randomize_norms_
    model = user_model("resnet_like")
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(head.weight)
    randomize_norms_(model, seed=0)
    assert head.weight.any()

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = user_model("resnet_like")

        def forward(self, x):
            return self.body(x) * 0.0

    result = check_export(Constant(), torch.randn(2, 1, 8, 8), seed=0)
    assert not result.ok and "same number everywhere" in result.reason
