"""The ``granular`` command line.

    granular search SPEC --target-params 2.2M [--dataset D] [--train-subset N] [--weights FILE] [--epochs N]
                    [--out DIR] [--resume] [--seed S]
    granular export RUN_DIR [--out DIR] [--finetune --epochs N]
    granular retrain RUN_DIR [--arch exact|aligned] [--finetune] [--epochs N] [--aux-weight W] [--drop-path P]
    granular inspect SPEC [--dataset D] [--leaf CLASS ...] [--strict] [--all]
    granular report RUN_DIR [--out DIR]

Bad input prints one line (``error: ...``) and exits with status 2; a search that ends
without meeting its target exits with status 3 (its best model is still exported).

This package is the only part of granular that knows argparse, rich console output and run
directories: one module per command (``search``, ``export``, ``retrain``, ``inspect``,
``report``) and :mod:`granular.cli.rundir` for the run-directory layout.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "EXIT_BAD_INPUT", "EXIT_TARGET_MISSED"]

EXIT_BAD_INPUT = 2
EXIT_TARGET_MISSED = 3

_COMMANDS = {"search": "granular.cli.search", "inspect": "granular.cli.inspect", "retrain": "granular.cli.retrain",
             "report": "granular.cli.report", "export": "granular.cli.export"}
"""command -> the module whose ``handle(args)`` carries it out (imported on use: ``--help`` stays fast)."""


FINETUNE_DEFAULTS = {"epochs": 10, "lr": 0.01}
"""What ``export --finetune`` changes in :class:`~granular.config.RetrainConfig`: a short run from
the searched weights. lr 0.01 (the peers' fine-tuning rate in ``benchmarks/versus.py``): with the
norms back it beat 0.005 on every budget split measured there (1 epoch after a 4-epoch search:
82.0 ± 0.6% against 81.7 ± 0.5% at 10%; 4 epochs after a one-round landing: 79.2% against 77.8%)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="granular", description="Multi-granularity pruning with learned thresholds.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="search a compact model that meets a parameter target")
    s.add_argument("spec", help="path/model.py[:callable], timm:NAME, torchvision:NAME, or a search space: "
                                "darts, darts:tiny|small|large")
    s.add_argument("--target-params", help="nonzero parameter target, e.g. 2.2M or 60K (not needed with --resume)")
    s.add_argument("--dataset", default="digits", help="digits (default, offline), cifar10, cifar100, "
                                                       "fashion-mnist, imagefolder:DIR, fake")
    s.add_argument("--data-root", default=None, help="where cifar10/cifar100 or fashion-mnist's idx files live "
                                                     "(default $GRANULAR_DATA; fashion-mnist: then "
                                                     "/usr/share/datasets/fashion-mnist)")
    s.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed subset of N training images (drawn by --seed, stratified by class)")
    s.add_argument("--weights", default=None, metavar="FILE",
                   help="start from these weights (.pt, .pth or .safetensors state dict), loaded before tracing")
    s.add_argument("--epochs", type=int, default=None, help="most epochs to run (default 100)")
    s.add_argument("--warmup-epochs", type=int, default=None)
    s.add_argument("--prune-every", type=int, default=None,
                   help="epochs between pruning rounds (default 2, or 1 when fewer than 8 epochs follow the warm-up)")
    s.add_argument("--batch-size", type=int, default=None, help="default 96")
    s.add_argument("--lr", type=float, default=None,
                   help="the weights' learning rate during the search (default 0.03 when the gates start as the "
                        "identity, 0.01 for the search spaces; gates and thresholds keep theirs)")
    s.add_argument("--lr-ramp", type=float, default=None, metavar="EPOCHS",
                   help="the weights' learning rate rises linearly from 0 over the run's first EPOCHS epochs "
                        "(default 0: none)")
    s.add_argument("--threshold-init", choices=("min", "zero"), default=None)
    s.add_argument("--mu", type=float, default=None, help="parameter-cost weight in the resource loss")
    s.add_argument("--schedule", choices=("cubic", "linear"), default=None,
                   help="per-round pruning quota from the rounds left: cubic (default, Zhu & Gupta) or linear")
    s.add_argument("--lambda-init", type=float, default=None,
                   help="λ when the thresholds are set (default: from the learning rate and steps per round)")
    s.add_argument("--threshold-margin", type=float, default=None,
                   help="thresholds start this fraction below the smallest gate of their scope (default 0.2)")
    s.add_argument("--live-cap", type=float, default=None,
                   help="between rounds, thresholds mask at most this many times the next round's share of "
                        "each layer (default 0.5; 0: no cap)")
    s.add_argument("--weight-scale", choices=("global", "layer"), default=None,
                   help="weight thresholds compare |w| over the model's mean |w| (global, default: ranks "
                        "weights across layers like global magnitude pruning) or over each layer's")
    s.add_argument("--granularities", default=None, metavar="LIST",
                   help="which units the search may prune: a comma list of op, filter, weight (default all three)")
    s.add_argument("--gate-start", choices=("auto", "identity", "half"), default=None,
                   help="identity: gates start as the model's own function (for trained models); half: the "
                        "paper's σ(0)=0.5 (search spaces); auto (default): half for search spaces, else identity")
    st = s.add_mutually_exclusive_group()
    st.add_argument("--multi-stage", dest="multi_stage", action="store_const", const="on",
                    help="search stage by stage, split by resolution (default for models with 3+ resolutions)")
    st.add_argument("--single-stage", dest="multi_stage", action="store_const", const="off",
                    help="search the whole model at once")
    s.add_argument("--stage-fallback", action="store_true",
                   help="with --multi-stage: search a single-resolution model in one stage instead of stopping")
    s.add_argument("--stage-keep", type=float, default=None,
                   help="each stage prunes to this fraction of its parameters (default 0.5)")
    s.add_argument("--regrow", type=float, default=None,
                   help="fraction of a stage's pruned ops regrown after it (default 0.2; 0 disables)")
    s.add_argument("--kernels", choices=("auto", "on", "off"), default=None,
                   help="fused Triton conv kernels: on, off, auto (default: the eager graph until the kernels "
                        "are tested on a GPU; they are tested under triton's interpreter only)")
    s.add_argument("--augment", action="store_true", help="Cutout + AutoAugment (CIFAR) or flips (imagefolder)")
    s.add_argument("--out", default=None, help="run directory (default runs/<spec>)")
    s.add_argument("--resume", action="store_true", help="continue the search in --out from its checkpoint")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--leaf", action="append", metavar="CLASS",
                   help="keep modules of this class whole when tracing (repeatable)")
    s.add_argument("--auto-leaf", action="store_true",
                   help="keep every module that fails to trace whole, instead of stopping")
    i = sub.add_parser("inspect", help="show what can be pruned: units per granularity, budget, untraceable parts")
    i.add_argument("spec", help="as for search")
    i.add_argument("--dataset", default=None, help="size the input for this data set (default: the model's "
                                                   "native input for timm/torchvision, digits otherwise)")
    i.add_argument("--data-root", default=None)
    i.add_argument("--leaf", action="append", metavar="CLASS", help="keep modules of this class whole")
    i.add_argument("--strict", action="store_true", help="stop at the first untraceable module "
                                                        "(default: keep it whole, report it and go on)")
    i.add_argument("--all", action="store_true", help="list every operation unit")
    e = sub.add_parser("export", help="re-export the compact model of a run directory")
    e.add_argument("run_dir")
    e.add_argument("--out", default=None, help="where to write the model (default RUN_DIR/model; "
                                               "RUN_DIR/finetune with --finetune)")
    e.add_argument("--format", choices=("py", "onnx", "pt2"), default="py",
                   help="py: model.py + safetensors (default); onnx: model.onnx (needs granular[onnx]); "
                        "pt2: a torch.export program (model.pt2). Each is checked on a batch before it is written")
    e.add_argument("--finetune", action="store_true",
                   help="fine-tune the exported model from the searched weights before writing it")
    _train_options(e, epochs_help=f"fine-tuning epochs (default {FINETUNE_DEFAULTS['epochs']})",
                   lr_default=FINETUNE_DEFAULTS["lr"])
    r = sub.add_parser("retrain", help="train the discovered architecture from scratch and report its accuracy")
    r.add_argument("run_dir")
    r.add_argument("--arch", choices=("exact", "aligned"), default=None,
                   help="exact: the exported model (default); aligned: one width per cell (docs/method.md)")
    r.add_argument("--finetune", action="store_true", help="start from the searched weights, not from scratch")
    r.add_argument("--out", default=None, help="default RUN_DIR/retrain (RUN_DIR/retrain-aligned)")
    _train_options(r, epochs_help="epochs (default 50)", lr_default=0.025)  # RetrainConfig's defaults
    rp = sub.add_parser("report", help="tables and plots of what a search kept: retention per cell and "
                                       "granularity, thresholds and parameters over the epochs")
    rp.add_argument("run_dir")
    rp.add_argument("--out", default=None, help="where to write the plots and report.json (default RUN_DIR/report)")
    return p


def _train_options(p: argparse.ArgumentParser, epochs_help: str, lr_default: float) -> None:
    """Options shared by ``retrain`` and ``export --finetune`` (:class:`granular.config.RetrainConfig`)."""
    p.add_argument("--epochs", type=int, default=None, help=epochs_help)
    p.add_argument("--batch-size", type=int, default=None, help="default 96")
    p.add_argument("--lr", type=float, default=None, help=f"initial learning rate, cosine to 0 (default {lr_default})")
    p.add_argument("--weight-decay", type=float, default=None, help="default 3e-4")
    p.add_argument("--label-smoothing", type=float, default=None, help="default 0")
    p.add_argument("--aux-weight", type=float, default=None, help="auxiliary head loss weight (default 0: no head)")
    p.add_argument("--drop-path", type=float, default=None, help="drop-path probability on op branches (default 0)")
    p.add_argument("--augment", action="store_true", help="Cutout + AutoAugment (CIFAR) or flips (imagefolder)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue a killed retrain in --out")
    p.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``granular`` console script."""
    args = _parser().parse_args(argv)
    from granular.errors import GranularError
    try:
        import importlib
        return importlib.import_module(_COMMANDS[args.command]).handle(args)
    except GranularError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        from granular import distributed
        if distributed.is_main():  # one line per run, not one per process
            print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130

