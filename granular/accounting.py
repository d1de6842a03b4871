"""Exact parameter accounting: :func:`count_params` is the size of :func:`granular.export`'s result.

Both functions share :func:`granular.passes.export.plan_export`, so the count includes
everything the compact model has: stem, norms that stay, folded biases, the classifier.
Masked weights count as zeros: ``total`` is the dense size, ``nonzero`` the nonzeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from granular.passes.export import PlanCache, plan_export

__all__ = ["ParamCount", "ParamCounter", "count_params", "count_params_by_stage", "count_module"]


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
    return ParamCounter(gm)()


def count_params_by_stage(gm: fx.GraphModule) -> dict[int, ParamCount]:
    """:func:`count_params` split by resolution stage (``granular.stage`` meta from
    :func:`granular.passes.split_stages.assign_stages`); the parts sum to the whole.

    A compact module belongs to the stage of the node that calls it, a carried-over
    attribute to the stage of its ``get_attr`` node.
    """
    return ParamCounter(gm).by_stage()


class ParamCounter:
    """:func:`count_params` for one graph counted many times while only its gates and masks
    change, as a pruning round does while it searches for the units to commit.

    The channel analysis is reused while the same operations are pruned, the constants of
    per-channel nodes while their inputs are, and each folded layer or norm (with its nonzero
    count) while its kept channels, gate values, input constants and stored ω mask are
    (:class:`~granular.passes.export.PlanCache`). Each count is still exact. Make a new
    counter after training steps or graph edits.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cache = PlanCache(folds={})
        self._nonzero: dict[int, tuple[torch.Tensor, int]] = {}

    def __call__(self) -> ParamCount:
        total = nonzero = 0
        seen: dict[int, tuple[torch.Tensor, int]] = {}
        for p in plan_export(self.gm, self.cache).parameters():
            hit = self._nonzero.get(id(p))  # a layer or norm reused from the last count: same tensor
            nz = hit[1] if hit is not None and hit[0] is p else int(torch.count_nonzero(p.detach()))
            seen[id(p)] = (p, nz)
            total += p.numel()
            nonzero += nz
        self._nonzero = seen
        return ParamCount(total, nonzero)

    def by_stage(self) -> dict[int, ParamCount]:
        """The count split by resolution stage (see :func:`count_params_by_stage`)."""
        from granular.passes.split_stages import STAGE
        gm = self.gm
        plan = plan_export(gm, self.cache)
        stage_of: dict[str, int] = {}
        for n in gm.graph.nodes:
            if STAGE not in n.meta:
                raise ValueError("count_params_by_stage needs stage meta: run assign_stages(gm) first")
            if n.op in ("call_module", "get_attr"):
                stage_of.setdefault(str(n.target), n.meta[STAGE])
        for n, path in plan.module_of_node.items():
            stage_of[path] = n.meta[STAGE]
        groups: dict[int, list] = {}
        seen: set[int] = set()
        named = [(path, p) for path, m in plan.modules.items() for p in m.parameters()]
        named += [(name, t) for name, t in plan.attrs.items() if isinstance(t, nn.Parameter)]
        for path, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                groups.setdefault(stage_of[path], []).append(p)
        return {s: _count(ps) for s, ps in sorted(groups.items())}


def count_module(module: nn.Module) -> ParamCount:
    """The parameter count of any module (dense and nonzero)."""
    return _count(module.parameters())
