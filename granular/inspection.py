"""``granular inspect SPEC``: what granular can prune in a model, before any search.

:func:`inspect_model` traces and gates the model, and reports the units per granularity,
the fraction of parameters that some gate can remove, the budget (the count now and the
smallest count pruning can reach) and, with ``auto_leaf``, every module that could not be
traced together with the construct to blame.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from granular.accounting import ParamCount, count_params
from granular.api import prepare
from granular.meta import LAYER, MEMBER
from granular.passes.trace import AUTO_LEAVES
from granular.testing import gate_units

__all__ = ["Inspection", "inspect_model", "run_inspect"]


@dataclass
class Inspection:
    """What :func:`inspect_model` found.

    Attributes:
        total: the model's parameters.
        units: gated units per granularity (``op``, ``filter``, ``weight``).
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


def inspect_model(model: nn.Module, example_inputs, *, leaf_modules=(), auto_leaf: bool = True) -> Inspection:
    """Trace and gate ``model`` and describe its units (see module docstring)."""
    from granular.search import reachable_floor

    total = sum(p.numel() for p in model.parameters())
    gm = prepare(model, example_inputs, leaf_modules=leaf_modules, auto_leaf=auto_leaf)
    params = {name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in gm.named_modules()}
    gated: set[str] = set()
    unit_modules: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is not None and (info.filter_gate or info.weight_mask):
            gated.add(info.module)
        owner = _owner(n)
        if n.meta.get(MEMBER) and owner and not owner.startswith("granular_gates"):
            unit_modules.setdefault(n.meta[MEMBER], set()).add(owner)
    ops = [(uid, sum(params.get(m, 0) for m in mods)) for uid, mods in unit_modules.items()]
    prunable_modules = gated.union(*unit_modules.values()) if unit_modules else gated
    with torch.no_grad():
        now, floor = count_params(gm), reachable_floor(gm)
    return Inspection(total=total, units=gate_units(gm), prunable=sum(params.get(m, 0) for m in prunable_modules),
                      now=now, floor=floor, ops=sorted(ops), auto_leaves=list(gm.meta.get(AUTO_LEAVES, [])))


def run_inspect(args: argparse.Namespace) -> int:
    """The ``granular inspect`` command."""
    from rich.console import Console
    from rich.table import Table

    from granular._format import fmt_count, fmt_pct
    from granular.hub import default_input, is_zoo_spec
    from granular.spec import build_model, resolve_leaves

    console = Console()
    if args.dataset or not is_zoo_spec(args.spec):
        from granular.data import load_data
        data = load_data(args.dataset or "digits", batch_size=2, seed=0, root=args.data_root)
        model = build_model(args.spec, num_classes=data.num_classes, in_channels=data.in_channels,
                            image_size=data.image_size)
        x = data.example_input(batch=1)
    else:
        model = build_model(args.spec, num_classes=None, in_channels=None)
        x = default_input(args.spec, model)
    leaves = resolve_leaves(model, args.leaf or [])
    insp = inspect_model(model, x, leaf_modules=leaves, auto_leaf=not args.strict)

    console.print(f"[bold]{args.spec}[/]: {fmt_count(insp.total)} parameters, input {tuple(x.shape)}")
    t = Table(title="units per granularity")
    for col in ("granularity", "units", "what one unit is"):
        t.add_column(col)
    t.add_row("operation (α)", f"{insp.units['op']:,}", "a residual branch that joins a sum")
    t.add_row("filter (β)", f"{insp.units['filter']:,}", "an output channel of a conv/linear")
    t.add_row("weight (ω)", f"{insp.units['weight']:,}", "one weight of a conv/linear")
    console.print(t)
    b = Table(title="budget")
    b.add_column("")
    b.add_column("parameters")
    b.add_row("prunable (in gated layers or operation units)", f"{fmt_count(insp.prunable)} ({fmt_pct(insp.prunable_fraction)})")
    b.add_row("compact model now (all gates open)", fmt_count(insp.now.total))
    b.add_row("reachable floor (nonzero)", fmt_count(insp.floor.nonzero))
    console.print(b)
    if insp.ops:
        o = Table(title=f"operation units ({len(insp.ops)})")
        o.add_column("unit")
        o.add_column("parameters")
        shown = insp.ops if args.all else insp.ops[:20]
        for uid, n in shown:
            o.add_row(uid, fmt_count(n))
        if len(shown) < len(insp.ops):
            o.add_row(f"... {len(insp.ops) - len(shown)} more (--all)", "")
        console.print(o)
    if insp.auto_leaves:
        u = Table(title="not traceable: kept whole (channels fixed)")
        for col in ("module", "class", "construct"):
            u.add_column(col)
        for row in insp.auto_leaves:
            u.add_row(row["module"], row["type"], row["construct"])
        console.print(u)
        names = sorted({row["type"] for row in insp.auto_leaves})
        console.print("search with: [bold]" + " ".join(f"--leaf {n}" for n in names) + "[/]")
    return 0
