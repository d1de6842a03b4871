"""``granular export RUN_DIR``: write the compact model of a searched run again, once it is
checked to compute what the pruned model computes on a batch of the run's data
(:func:`granular.verify.verify_export`); ``--finetune``: fine-tuned from the searched weights
first, see :mod:`granular.cli.retrain`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from granular.api import export
from granular.cli.rundir import MODEL_DIR, load_searched
from granular.io import save
from granular.verify import data_batch, verify_export

__all__ = ["handle"]


def handle(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if getattr(args, "finetune", False):
        from granular.cli.retrain import handle as retrain
        return retrain(args, finetune_only=True)
    run_cfg, data, gm = load_searched(run_dir)
    out = Path(args.out) if args.out else run_dir / MODEL_DIR
    compact = export(gm)
    batch = data_batch(data)
    verify_export(gm, compact, batch)
    save(compact, out, metadata={"spec": run_cfg["spec"], "dataset": run_cfg["dataset"]},
         format=getattr(args, "format", "py"), example_inputs=batch)
    Console(stderr=True).print(f"exported to {out}", highlight=False)
    return 0
