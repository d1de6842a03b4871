"""``granular retrain RUN_DIR`` (and ``granular export RUN_DIR --finetune``): train the
discovered architecture (:mod:`granular.retrain`) and write ``RUN_DIR/retrain[-aligned]``.

It prints and writes the top-1 and top-5 accuracy, dense and nonzero parameters and accuracy
density (top-1 % per million parameters, the paper's metric): ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` (atomic, every epoch; ``--resume``), ``result.json``
and ``model/`` (plain PyTorch, as ``granular.load`` reads it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from granular.cli import FINETUNE_DEFAULTS
from granular.cli.rundir import CHECKPOINT, CONFIG, MODEL_DIR, load_searched
from granular.config import RetrainConfig
from granular.errors import CheckpointError, GranularError
from granular.files import write_json
from granular.io import save
from granular.verify import data_batch
from granular.retrain import build_retrain_model, train_compact

__all__ = ["handle"]

RESULT = "result.json"


def handle(args: argparse.Namespace, *, finetune_only: bool = False) -> int:
    """CLI: ``granular retrain RUN_DIR`` (and ``granular export RUN_DIR --finetune``)."""
    run_dir = Path(args.run_dir)
    overrides = {k: getattr(args, k) for k in ("arch", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing",
                                               "aux_weight", "drop_path", "seed")
                 if getattr(args, k, None) is not None}
    if finetune_only:   # a short, gentle run from the searched weights unless told otherwise
        overrides = FINETUNE_DEFAULTS | overrides
    cfg = RetrainConfig(finetune=bool(args.finetune) or finetune_only, augment=bool(args.augment), **overrides)
    default = ("finetune" if cfg.finetune and finetune_only else "retrain") + ("-aligned" if cfg.arch == "aligned" else "")
    out = Path(args.out) if args.out else run_dir / default
    if args.resume:   # the retrain's own settings, as it started
        if not (out / CONFIG).is_file():
            raise CheckpointError(f"nothing to resume in {out}: no {CONFIG}; run without --resume")
        cfg = RetrainConfig.from_dict(json.loads((out / CONFIG).read_text()))
    elif (out / CHECKPOINT).exists():
        raise GranularError(f"{out} already holds a retrain: continue it with --resume, or pass --out NEW_DIR")
    run_cfg, data, gm = load_searched(run_dir, batch_size=cfg.batch_size, augment=cfg.augment)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG, cfg.to_dict())
    console = Console(stderr=True)
    compact, info = build_retrain_model(gm, cfg)
    # a fine-tune's restored norms are folded back at the end: it ships the searched count
    size = info["searched_params"] if cfg.finetune else sum(p.numel() for p in compact.parameters())
    console.print(f"[bold]{'fine-tuning' if cfg.finetune else 'retraining'}[/] the {cfg.arch} architecture of "
                  f"{run_dir}: {size:,} parameters, {cfg.epochs} epochs "
                  f"on {run_cfg['dataset']}; writing {out}", highlight=False)

    def show(row: dict) -> None:
        console.print(f"retrain epoch {row['epoch']:>3}/{cfg.epochs} loss {row['loss']:.3f} "
                      f"train {row['train_acc']:.1%} val top-1 {row['val_top1']:.2%} top-5 {row['val_top5']:.2%}",
                      highlight=False)

    result = train_compact(compact, data, cfg, out_dir=out, device=args.device, resume=args.resume,
                           on_epoch=None if args.no_progress else show)
    compact.eval().cpu()
    meta = {"spec": run_cfg["spec"], "dataset": run_cfg["dataset"], "arch": cfg.arch, "finetune": cfg.finetune}
    save(compact, out / MODEL_DIR, metadata=meta)
    fmt = getattr(args, "format", "py")
    if fmt != "py":  # export --finetune --format onnx|pt2: the deployment file beside model.py
        save(compact, out / MODEL_DIR, metadata=meta, format=fmt, example_inputs=data_batch(data))
    summary = {k: v for k, v in result.items() if k != "history"} | info
    write_json(out / RESULT, summary)
    console.print(f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, {result['params']:,} parameters "
                  f"({result['nonzero']:,} nonzero), accuracy density {result['accuracy_density']:.1f} %/M; "
                  f"model in {out / MODEL_DIR}", highlight=False)
    return 0
