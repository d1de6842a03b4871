"""What granular can prune in a model, before any search (``granular inspect SPEC``).

:func:`inspect_model` traces and gates the model, and reports the units per granularity,
the fraction of parameters that some gate can remove, the budget (the count now and the
smallest count pruning can reach) and, with ``auto_leaf``, every module that could not be
traced together with the construct to blame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from granular.accounting import ParamCount, count_params
from granular.api import prepare
from granular.gates import GATE_ROOT
from granular.meta import HEADS, LAYER, MEMBER
from granular.passes.trace import AUTO_LEAVES
from granular.masks import gate_units, reachable_floor

__all__ = ["Inspection", "inspect_model"]


@dataclass
class Inspection:
    """What :func:`inspect_model` found.

    Attributes:
        total: the model's parameters.
        units: gated units per granularity (``op``, ``filter``, ``weight``; ``head``: the
            filter-level units that are attention heads).
        prunable: parameters in gated layers or operation units.
        now: ``count_params`` of the gated graph with every gate open.
        floor: the smallest count pruning can reach.
        ops: (unit id, parameters) of every operation unit.
        auto_leaves: modules kept whole because they did not trace (module, type, construct).
    """

    total: int
    units: dict[str, int]
    prunable: int
    now: ParamCount
    floor: ParamCount
    ops: list[tuple[str, int]] = field(default_factory=list)
    auto_leaves: list[dict] = field(default_factory=list)

    @property
    def prunable_fraction(self) -> float:
        return self.prunable / self.total if self.total else 0.0


def _owner(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[0]
    return None


def inspect_model(model: nn.Module, example_inputs, *, leaf_modules=(), auto_leaf: bool = True,
                  config=None) -> Inspection:
    """Trace and gate ``model`` (``config``: a :class:`~granular.config.GateConfig`) and
    describe its units (see module docstring)."""
    total = sum(p.numel() for p in model.parameters())
    gm = prepare(model, example_inputs, config, leaf_modules=leaf_modules, auto_leaf=auto_leaf)
    params = {name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in gm.named_modules()}
    gated: set[str] = set()
    unit_modules: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is not None and (info.filter_gate or info.weight_mask):
            gated.add(info.module)
        if HEADS in n.meta:
            gated.update(path for path, _ in n.meta[HEADS].rows)
            gated.add(n.meta[HEADS].proj)
        owner = _owner(n)
        if n.meta.get(MEMBER) and owner and not owner.startswith(GATE_ROOT):
            unit_modules.setdefault(n.meta[MEMBER], set()).add(owner)
    ops = [(uid, sum(params.get(m, 0) for m in mods)) for uid, mods in unit_modules.items()]
    prunable_modules = gated.union(*unit_modules.values()) if unit_modules else gated
    with torch.no_grad():
        now, floor = count_params(gm), reachable_floor(gm)
    return Inspection(total=total, units=gate_units(gm), prunable=sum(params.get(m, 0) for m in prunable_modules),
                      now=now, floor=floor, ops=sorted(ops), auto_leaves=list(gm.meta.get(AUTO_LEAVES, [])))
