"""Shared builders for the tests: the DARTS presets and the user-style models in tests/models/."""

from __future__ import annotations

from pathlib import Path

import torch

from granular.spec import build_model

MODELS = Path(__file__).parent / "models"
USER_MODELS = {
    "vgg_like": str(MODELS / "vgg_like.py"),
    "resnet_like": str(MODELS / "resnet_like.py") + ":build_model",
    "mobile_like": str(MODELS / "mobile_like.py"),
}


def user_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(USER_MODELS[name], num_classes=10, in_channels=1)


def example(batch: int = 2, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def assert_one_line_error(code, err, *needles):
    """The CLI's contract for bad input: exit 2 and one ``error: ...`` line naming the problem."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
