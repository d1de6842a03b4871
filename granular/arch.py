"""``arch.json``: the discovered architecture, read off the gated graph and its export plan.

For every operation unit: whether it is kept and, per layer, the width kept and the weight
sparsity (within the kept filters). For every attention with head units: the heads kept. ``retention`` gives each granularity's kept fraction
within the surviving units of the coarser ones (:func:`granular.masks.retention`). For DARTS
spaces the ops are also grouped per cell (``cells``), with the edge and op type of each kept op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from granular.accounting import count_params
from granular.masks import gate_bank, retention
from granular.meta import HEADS, LAYER, OP_UNIT
from granular.passes.export import plan_export
from granular.search_spaces import describe_op

__all__ = ["architecture"]


def architecture(gm: fx.GraphModule) -> dict[str, Any]:
    """Summarise the architecture that ``export(gm)`` produces."""
    plan = plan_export(gm)
    bank = gate_bank(gm)
    layers: dict[str, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is None:
            continue
        orig = gm.get_submodule(info.module).weight
        new = plan.modules.get(info.module) if n in plan.alive else None
        entry = {"scope": info.scope, "kind": info.kind, "out_channels": int(orig.shape[0]),
                 "kept": new is not None}
        if new is not None:
            w = new.weight.detach()
            entry["width"] = int(w.shape[0])
            entry["in_width"] = int(w.shape[1]) * (int(w.shape[0]) if info.kind == "dwconv" else 1)
            entry["weight_sparsity"] = round(1.0 - float(torch.count_nonzero(w)) / max(w.numel(), 1), 4)
        layers[info.module] = entry
    ops = []
    for n in gm.graph.nodes:
        unit = n.meta.get(OP_UNIT)
        if unit is None:
            continue
        kept = float(bank.op[unit.id].mask) > 0
        op_layers = {p: e for p, e in layers.items() if e["scope"] == unit.id}
        widths = [e["width"] for e in op_layers.values() if e.get("width") is not None]
        row = {"unit": unit.id, "path": unit.path, "kept": kept, "layers": op_layers,
               "width": widths[-1] if widths else None}
        if kept and op_layers:
            # within the kept filters: the sliced weights of the exported layers, so filter
            # pruning shows as filter retention, not as weight sparsity
            alive = [p for p, e in op_layers.items() if e["kept"]]
            w_tot = sum(plan.modules[p].weight.numel() for p in alive)
            nz = sum(int(torch.count_nonzero(plan.modules[p].weight)) for p in alive)
            row["weight_sparsity"] = round(1.0 - nz / max(w_tot, 1), 4)
            out_ch = sum(e["out_channels"] for e in op_layers.values())
            row["filter_retention"] = round(sum(e.get("width", 0) for e in op_layers.values()) / max(out_ch, 1), 4)
        desc = describe_op(unit.path)
        if desc:
            row.update(desc)
        ops.append(row)
    out: dict[str, Any] = {"params": count_params(gm)._asdict(), "retention": retention(gm), "ops": ops,
                           "layers": layers}
    heads = []
    for n in gm.graph.nodes:
        unit = n.meta.get(HEADS)
        if unit is not None and n.op == "call_module":
            alive = n in plan.alive
            kept = max(int((bank.filter[unit.key].eval_value() != 0).sum()), 1) if alive else 0  # as export keeps
            heads.append({"unit": unit.key, "scope": unit.scope, "heads": unit.heads, "kept": kept})
    if heads:
        out["heads"] = heads
    cells: dict[int, list] = {}
    for row in ops:
        if "cell" in row and row["kept"]:
            cells.setdefault(row["cell"], []).append(
                {"edge": row.get("edge"), "op": row["op"], "width": row["width"],
                 "weight_sparsity": row.get("weight_sparsity", 0.0)})
    if cells:
        out["cells"] = [{"cell": c, "ops": cells[c]} for c in sorted(cells)]
    return out
