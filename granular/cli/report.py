"""``granular report RUN_DIR``: print what a search kept, per cell or block, and write the plots
and ``report.json`` (:func:`granular.report.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from granular._format import fmt_count, fmt_pct
from granular.files import ARCH
from granular.report import Group, report

__all__ = ["handle"]


def _ratio(part: int, whole: int) -> str:
    return f"{part}/{whole}" if whole else "-"


def _op_types(g: Group) -> str:
    return "\n".join(f"{op} ×{kept}" for op, (kept, _) in sorted(g.op_types.items()) if kept) or "-"


def _print_tables(console, result: dict[str, Any]) -> None:
    """One row per cell (or block) and a total: ops kept of all, the op types kept (DARTS),
    filter and weight retention, nonzero parameters."""
    darts = result["grouped_by"] == "cell"
    t = Table(title=f"kept per {result['grouped_by']}")
    for col in ("cell" if darts else "block", "ops", *(["op types kept"] if darts else []),
                "filters", "weights", "params"):
        t.add_column(col, justify="left" if col in ("cell", "block", "op types kept") else "right", no_wrap=True)
    for g in [*result["groups"], result["total"]]:
        group = Group.from_dict(g)
        if group.name == "total":
            t.add_section()
        t.add_row(group.label, _ratio(group.ops_kept, group.ops_total), *([_op_types(group)] if darts else []),
                  fmt_pct(group.filter_retention), fmt_pct(group.weight_retention),
                  "-" if group.params is None else fmt_count(group.params))
    console.print(t)


def _summary_line(s: dict[str, Any]) -> str:
    params = "-" if s["params"] is None else f"{fmt_count(s['params'])} ({s['params']:,})"
    target = "" if s["target"] is None else (
        f" vs target {fmt_count(s['target'])}: " + ("[green]met[/]" if s["target_met"] else "[yellow]not met[/]"))
    what = "final" if s["finished"] else f"so far (epoch {s['epochs']}, search not finished)"
    return (f"[bold]{what}[/]: {params} nonzero parameters{target}; val accuracy {fmt_pct(s['val_accuracy'])} "
            f"({s['val_accuracy_of']}); {s['epochs']} epochs, {s['rounds']} pruning rounds")


def handle(args: argparse.Namespace) -> int:
    """The ``granular report`` command: print the tables and summary, write the plots."""
    console = Console()
    result = report(args.run_dir, args.out)
    run_dir = Path(args.run_dir)
    if result["grouped_by"] is not None:
        _print_tables(console, result)
    else:
        out = Path(result["files"]["report"]).parent.resolve()
        held = ", ".join(sorted(p.name + "/" * p.is_dir() for p in run_dir.iterdir() if p.resolve() != out))
        Console(stderr=True).print(f"[yellow]no {ARCH} in {run_dir} (it holds {held or 'nothing else'}): the "
                                   f"search has not finished; the plots of the log are written, the tables "
                                   f"come with {ARCH}[/]", highlight=False, soft_wrap=True)
    if "model/model.safetensors" in result["missing"]:
        Console(stderr=True).print(f"[yellow]no model/model.safetensors in {run_dir}: weights and parameters "
                                   f"per block are left out; granular export {run_dir} writes it[/]",
                                   highlight=False, soft_wrap=True)
    console.print(_summary_line(result["summary"]), highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(result["files"].values()), highlight=False, soft_wrap=True)
    return 0
