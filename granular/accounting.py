"""Exact parameter accounting: :func:`count_params` is the size of :func:`export`'s result.

Both functions share :func:`granular.passes.export.plan_export`, so the count includes
everything the compact model has: stem, norms that stay, folded biases, the classifier.
Masked weights count as zeros: ``total`` is the dense size, ``nonzero`` the nonzeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from granular.passes.export import build_export, plan_export

__all__ = ["ParamCount", "count_params", "export", "count_module"]


class ParamCount(NamedTuple):
    """A parameter count: dense size and nonzeros."""

    total: int
    nonzero: int

    def __str__(self) -> str:
        return f"{self.nonzero:,} nonzero of {self.total:,}"


def _count(params) -> ParamCount:
    total = nonzero = 0
    for p in params:
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return ParamCount(total, nonzero)


def count_params(gm: fx.GraphModule) -> ParamCount:
    """The exact parameter count of ``export(gm)``, without building it."""
    return _count(plan_export(gm).parameters())


def count_module(module: nn.Module) -> ParamCount:
    """The parameter count of any module (dense and nonzero)."""
    return _count(module.parameters())


def export(gm: fx.GraphModule) -> fx.GraphModule:
    """The compact, plain-PyTorch GraphModule of a gated graph (eval mode)."""
    return build_export(gm, plan_export(gm))
