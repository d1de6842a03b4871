"""The gate bank's stored masks: access, last-op protection, the reachable floor, retention
and unit counts.

The stored 0/1 masks of ``gm.granular_gates`` are the architecture: pruning rounds, tests and
reports read and write them here, through one accessor (:func:`gate_bank`). See
``docs/design.md`` for what each granularity's unit is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from granular.errors import GranularError
from granular.gates import GATE_ROOT, GateBank
from granular.meta import GATE, HEADS, SUM

__all__ = ["gate_bank", "mask_buffers", "protect_last_ops_", "reachable_floor", "retention", "unit_counts",
           "gate_units", "threshold_means"]


def gate_bank(gm: fx.GraphModule) -> GateBank:
    """``gm``'s gate bank (every gate, mask and threshold).

    Raises:
        GranularError: ``gm`` has no gates (it is not the result of :func:`granular.prepare`).
    """
    if not hasattr(gm, GATE_ROOT):
        raise GranularError("the model has no gates: pass the result of granular.prepare(model, inputs)")
    return getattr(gm, GATE_ROOT)


def mask_buffers(bank: GateBank) -> dict[str, torch.Tensor]:
    """Every stored mask of ``bank``, by state-dict key (the buffers themselves, not copies)."""
    return {k: v for k, v in bank.named_buffers() if k.endswith("mask")}


def protect_last_ops_(gm: fx.GraphModule, prefer: dict[str, float] | None = None) -> list[str]:
    """Re-open one op on every sum whose inputs are all pruned op units.

    Args:
        gm: a gated graph.
        prefer: score per op-unit key; the best-scored pruned op is re-opened (else the first).

    Returns:
        The keys of the ops re-opened.
    """
    bank = gate_bank(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    reopened = []
    for n in gm.graph.nodes:
        info = n.meta.get(SUM)
        if info is None:
            continue
        leaves = [by_name[i] for i in info.inputs if i in by_name]
        keys = []
        for leaf in leaves:
            g = leaf.meta.get(GATE)
            if g is None or g.kind != "op":
                keys = None  # a non-unit input keeps the sum alive
                break
            keys.append(g.key)
        if not keys or any(float(bank.op[k].mask) != 0 for k in keys):
            continue
        best = max(keys, key=lambda k: (prefer or {}).get(k, 0.0)) if prefer else keys[0]
        bank.op[best].mask.fill_(1.0)
        reopened.append(best)
    return reopened


@torch.no_grad()
def reachable_floor(gm: fx.GraphModule):
    """A lower bound on the count pruning can reach: every weight and filter mask 0 and every
    op pruned, except one op per sum (a sum needs an input). Layers whose channels are fixed
    (stem, head, ungated layers) keep them. The search itself keeps one filter in every
    gated layer, so it stops a little above this floor. Returns a
    :class:`~granular.accounting.ParamCount`."""
    from granular.accounting import count_params

    bank = gate_bank(gm)
    saved = {k: v.clone() for k, v in mask_buffers(bank).items()}
    try:
        for v in mask_buffers(bank).values():
            v.zero_()
        protect_last_ops_(gm)
        return count_params(gm)
    finally:
        bank.load_state_dict({**bank.state_dict(), **saved})


def _fraction(masks) -> float:
    masks = list(masks)
    tot = sum(m.numel() for m in masks)
    return float(sum(float(m.sum()) for m in masks) / tot) if tot else 1.0


def retention(gm: fx.GraphModule) -> dict[str, float]:
    """Fraction of units kept (stored mask 1) per granularity, each within the surviving units
    of the coarser ones: ops of all ops; filters of the layers in alive ops; weights of the
    layers in alive ops, in the rows of their kept filters (a pruned op's or filter's masks
    are not counted as kept: they are gone from the exported model)."""
    bank = gate_bank(gm)
    dead_ops = {k for k, m in bank.op.items() if float(m.mask) == 0}
    scope_of: dict[str, str] = {}
    filter_of: dict[str, str] = {}  # weight key -> the filter gate of the same layer's output
    for n in gm.graph.nodes:
        g = n.meta.get(GATE)
        if g is not None and g.kind in ("filter", "weight"):
            scope_of[f"{g.kind}:{g.key}"] = g.scope
    for n in gm.graph.nodes:
        g = n.meta.get(GATE)
        if g is not None and g.kind == "weight":
            f = _filter_after(n)
            if f is not None and f in bank.filter and bank.filter[f].mask.numel() == bank.weight[g.key].mask.shape[0]:
                filter_of[g.key] = f
    filters = [m.mask for k, m in bank.filter.items() if scope_of.get(f"filter:{k}") not in dead_ops]
    weights = []
    for k, m in bank.weight.items():
        if scope_of.get(f"weight:{k}") in dead_ops:
            continue
        f = filter_of.get(k)
        rows = bank.filter[f].mask > 0 if f is not None else None
        weights.append(m.mask[rows] if rows is not None and m.mask.dim() >= 1 else m.mask)
    return {"op": _fraction(m.mask for m in bank.op.values()), "filter": _fraction(filters),
            "weight": _fraction(weights)}


def _filter_after(weight_node: fx.Node) -> str | None:
    """The filter gate that gates the output channels of the layer reading ``weight_node``
    (conv/linear, then an optional norm), if any."""
    seen, frontier = 0, list(weight_node.users)
    while frontier and seen < 6:
        n = frontier.pop(0)
        seen += 1
        g = n.meta.get(GATE)
        if g is not None and g.kind == "filter":
            return g.key
        if len(n.users) == 1:
            frontier.extend(n.users)
    return None


def unit_counts(gm_or_bank) -> dict[str, int]:
    """Units kept (stored mask 1) per granularity."""
    b = gm_or_bank if isinstance(gm_or_bank, GateBank) else gate_bank(gm_or_bank)
    return {"op": int(sum(float(m.mask) for m in b.op.values())),
            "filter": int(sum(float(m.mask.sum()) for m in b.filter.values())),
            "weight": int(sum(float(m.mask.sum()) for m in b.weight.values()))}


def gate_units(gm: fx.GraphModule) -> dict[str, int]:
    """How many units each granularity gates (kept or not): op units, filters (β units:
    channels and attention heads), weights, and ``head``: the β units that are heads."""
    bank = gate_bank(gm)
    heads = sum(n.meta[HEADS].heads for n in gm.graph.nodes if HEADS in n.meta and n.op == "call_module")
    return {"op": len(bank.op), "filter": sum(m.mask.numel() for m in bank.filter.values()),
            "weight": sum(m.mask.numel() for m in bank.weight.values()), "head": heads}


def threshold_means(gm: fx.GraphModule) -> dict[str, float]:
    """The mean of each threshold (``t_alpha``, ``t_beta``, ``t_omega``) over the scopes that have it."""
    bank = gate_bank(gm)
    out = {}
    for t in ("t_alpha", "t_beta", "t_omega"):
        vals = [getattr(s, t).item() for s in bank.scopes.values() if hasattr(s, t)]
        out[t] = sum(vals) / len(vals) if vals else float("nan")
    return out
