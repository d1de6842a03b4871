"""``granular search SPEC``: build the model and data, run the driver, write the run directory.

Under ``torchrun`` every process runs it, data-parallel (:mod:`granular.distributed`), and
rank 0 alone writes the run directory (:mod:`granular.cli.rundir`) and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from granular import distributed
from granular._format import fmt_count, fmt_pct
from granular.arch import architecture
from granular.cli import EXIT_TARGET_MISSED
from granular.cli.rundir import ARCH, CHECKPOINT, CONFIG, MODEL_DIR, build_run, default_run_dir, load_run_config
from granular.config import SearchConfig, parse_size
from granular.driver import check_kernels, check_target, make_searcher, single_resolution_message, use_multi_stage
from granular.errors import CheckpointError, GranularError
from granular.files import write_json
from granular.io import save
from granular.verify import data_batch, verify_export
from granular.passes.split_stages import count_resolutions

__all__ = ["handle"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    mapping = {"epochs": "epochs", "warmup_epochs": "warmup_epochs", "prune_every": "prune_every",
               "batch_size": "batch_size", "lr": "lr_weights", "lr_ramp": "lr_ramp_epochs", "threshold_init": "threshold_init", "mu": "mu", "seed": "seed",
               "multi_stage": "multi_stage", "stage_keep": "stage_keep", "regrow": "regrow",
               "kernels": "kernels", "schedule": "schedule", "lambda_init": "lambda_init",
               "threshold_margin": "threshold_margin", "live_cap": "live_cap",
               "weight_scale": "weight_scale"}
    out = {field: getattr(args, arg, None) for arg, field in mapping.items() if getattr(args, arg, None) is not None}
    gates = {}
    if getattr(args, "gate_start", None) is not None:
        gates["start"] = args.gate_start
    if getattr(args, "granularities", None) is not None:
        gates.update(_granularities(args.granularities))
    if gates:
        out["gates"] = gates
    if getattr(args, "stage_fallback", False):
        out["single_resolution"] = "fallback"
    return out


GRANULARITIES = {"op": "op_gates", "filter": "filter_gates", "weight": "weight_masks"}


def _granularities(text: str) -> dict[str, bool]:
    """``--granularities op,filter`` as :class:`~granular.config.GateConfig` fields."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in GRANULARITIES]
    if bad or not names:
        raise GranularError(f"--granularities {text!r}: expected a comma list of op, filter, weight "
                            f"(e.g. op,filter), not {', '.join(bad) or 'nothing'}")
    return {field: name in names for name, field in GRANULARITIES.items()}


def handle(args: argparse.Namespace) -> int:
    """``granular search``; under ``torchrun`` every process runs it, data-parallel
    (:mod:`granular.distributed`), and rank 0 alone writes the run directory and prints."""
    ours = not distributed.is_distributed()  # a process group the caller started is the caller's to end
    device = distributed.init(args.device)
    try:
        return _run_search(args, device)
    finally:
        if ours:
            distributed.cleanup()


def _run_search(args: argparse.Namespace, device: torch.device) -> int:
    main = distributed.is_main()
    console = Console(stderr=True, quiet=not main)
    run_dir = Path(args.out) if args.out else default_run_dir(args.spec)
    if args.resume:
        run = load_run_config(run_dir)
        if not (run_dir / CHECKPOINT).is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: no {CHECKPOINT}; run without --resume")
        if args.epochs is not None:  # the one setting a resumed run may change: how long it may go on
            run["search"]["epochs"] = args.epochs
        if args.target_params is not None and parse_size(args.target_params) != run["search"]["target_params"]:
            raise GranularError(f"{run_dir} searches for {run['search']['target_params']:,} parameters, not "
                                f"{parse_size(args.target_params):,}: drop --target-params to resume, or start "
                                f"a new run with --out NEW_DIR")
    else:
        if (run_dir / CHECKPOINT).exists() or (run_dir / CONFIG).exists():
            raise GranularError(f"{run_dir} already holds a search: continue it with --resume, or pass "
                                f"--out NEW_DIR")
        if args.target_params is None:
            raise GranularError("--target-params is required: give the nonzero parameter target, e.g. 60K")
        target = parse_size(args.target_params)
        cfg = SearchConfig(target_params=target, **_overrides(args))
        weights = str(Path(args.weights).expanduser().resolve()) if args.weights else None  # any cwd can resume
        run = {"spec": args.spec, "dataset": args.dataset, "data_root": args.data_root, "augment": args.augment,
               "train_subset": args.train_subset, "weights": weights, "leaf": args.leaf or [], "auto_leaf": args.auto_leaf,
               "search": cfg.to_dict(), "granular_version": _version()}
    distributed.per_rank_batch(run["search"]["batch_size"])  # the global batch must split over the processes
    data, gm, cfg = build_run(run, from_checkpoint=args.resume)
    if not args.resume:
        now, floor = check_target(gm, cfg.target_params)
        check_kernels(cfg, device)
        if cfg.multi_stage == "on" and count_resolutions(gm) < 2:  # stop (or warn) before writing anything
            msg = single_resolution_message(gm)
            if cfg.single_resolution == "stop":
                raise GranularError(msg)
            console.print(f"[yellow]{msg.split(':')[0]}: searching it in one stage (--stage-fallback)[/]",
                          highlight=False)
        mode = "multi-stage" if use_multi_stage(gm, cfg) else "single-stage"
        world = distributed.world_size()
        procs = f", {world} processes of {cfg.batch_size // world}" if world > 1 else ""
        start = f" from {args.weights}" if args.weights else ""
        console.print(f"[bold]{run['spec']}[/]{start}: {fmt_count(now.nonzero)} parameters, target "
                      f"{fmt_count(cfg.target_params)} (reachable down to {fmt_count(floor.nonzero)}), {mode}; "
                      f"data {run['dataset']} ({len(data.train_set)} train / {len(data.val_set)} val{procs}); "
                      f"run directory {run_dir}", highlight=False)
        distributed.barrier()  # every rank has seen the directory empty before rank 0 fills it
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG, run)
    searcher = make_searcher(gm, data, cfg, run_dir=run_dir, progress=not args.no_progress, device=device)
    if args.resume:
        searcher.resume(run_dir / CHECKPOINT)
        console.print(f"resuming {run_dir} at epoch {searcher.state['epoch']}", highlight=False)
    result = searcher.run()
    if main:
        verify_export(result.gm, result.compact, data_batch(data).to(device))
        write_json(run_dir / ARCH, architecture(result.gm))
        save(result.compact, run_dir / MODEL_DIR, metadata={"spec": run["spec"], "dataset": run["dataset"],
                                                           "target_params": cfg.target_params,
                                                           "val_accuracy": result.val_accuracy})
    distributed.barrier()  # the others wait for rank 0's files
    p = result.params
    console.print(f"compact model: {fmt_count(p.nonzero)} nonzero parameters ({p.nonzero:,}; dense "
                  f"{p.total:,}), target {cfg.target_params:,}, val accuracy {fmt_pct(result.val_accuracy)}, "
                  f"saved to {run_dir / MODEL_DIR}", highlight=False)
    if not result.reached:
        console.print(f"target not reached after {result.epochs} epochs: continue with "
                      f"--resume --epochs {result.epochs * 2}", highlight=False)
        return EXIT_TARGET_MISSED
    return 0


def _version() -> str:
    from granular import __version__
    return __version__
