"""Accuracy: the one evaluation loop that the search, retraining and fine-tuning share, and
the paper's accuracy density."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["topk_correct", "count_correct", "accuracy_density"]


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    """How many rows of ``logits`` have the label ``y`` among their ``k`` largest."""
    if k == 1:
        return int((logits.argmax(1) == y).sum())
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == y[:, None]).any(1).sum())


@torch.no_grad()
def count_correct(model: nn.Module, loader, device, ks: Sequence[int] = (1,)) -> tuple[list[int], int]:
    """Top-k hits for each ``k`` in ``ks``, and the samples seen, of ``model`` in eval mode
    over ``loader``. ``model`` may return logits or ``(logits, aux)``; its mode is restored."""
    was = model.training
    model.eval()
    hits, total = [0] * len(ks), 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            for i, k in enumerate(ks):
                hits[i] += topk_correct(logits, y, k)
            total += y.numel()
    finally:
        model.train(was)
    return hits, total


def accuracy_density(top1: float, nonzero: int) -> float:
    """The paper's accuracy density: top-1 accuracy in % per million (nonzero) parameters."""
    return 100.0 * top1 / max(nonzero / 1e6, 1e-12)
