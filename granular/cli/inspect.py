"""``granular inspect SPEC``: print what can be pruned (:func:`granular.inspection.inspect_model`):
the units per granularity, the budget, and the modules that do not trace."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from granular._format import fmt_count, fmt_pct
from granular.data import load_data
from granular.inspection import inspect_model
from granular.spec import build_model, default_input, is_zoo_spec, resolve_leaves

__all__ = ["handle"]


def handle(args: argparse.Namespace) -> int:
    """The ``granular inspect`` command."""
    console = Console()
    if args.dataset or not is_zoo_spec(args.spec):
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
    heads = insp.units.get("head", 0)
    t.add_row("filter (β)", f"{insp.units['filter'] - heads:,}", "an output channel of a conv/linear")
    t.add_row("head (β)", f"{heads:,}", "a head of an attention layer: its q/k/v rows and output columns")
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
