"""Run directories: their file names, the resolved run config, and loading a searched run.

A search run directory holds ``config.json`` (the resolved run: spec, data set, training
subset, starting weights and :class:`~granular.config.SearchConfig`), ``checkpoint.pt`` (atomic, each epoch),
``metrics.jsonl`` (one row per epoch), ``arch.json`` and ``model/`` (the compact model:
``model.py`` + ``model.safetensors``, loadable without granular). ``retrain/`` and
``report/`` hold what ``granular retrain`` and ``granular report`` write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from granular.api import prepare
from granular.config import SearchConfig
from granular.data import load_data
from granular.driver import make_searcher
from granular.errors import CheckpointError
from granular.files import ARCH, CHECKPOINT, CONFIG, METRICS, MODEL_DIR, REPORT_DIR

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "ARCH", "MODEL_DIR", "REPORT_DIR", "load_run_config", "build_run",
           "load_searched", "default_run_dir"]


def default_run_dir(spec: str) -> Path:
    """``runs/<spec name>``, where ``granular search`` writes without ``--out``."""
    from granular.spec import spec_name
    return Path("runs") / spec_name(spec)


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved run config of ``run_dir`` (``config.json``).

    Raises:
        CheckpointError: ``run_dir`` is not a run directory, or its config is corrupt.
    """
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a granular run directory (no {CONFIG}): check --out")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupt ({err.msg}): delete the run directory to start over") from None


def build_run(run: dict[str, Any], *, from_checkpoint: bool = False):
    """Data, gated graph and config from a resolved run config.

    The run's ``weights`` file, if any, is loaded into the model before it is traced, unless
    ``from_checkpoint``: a checkpoint about to be loaded holds every weight of the gated graph,
    so it supersedes them (and the file need not exist any more).
    """
    from granular.spec import build_model, resolve_leaves
    from granular.weights import load_weights

    data = load_data(run["dataset"], batch_size=run["search"]["batch_size"], seed=run["search"]["seed"],
                     root=run.get("data_root"), augment=run.get("augment", False), subset=run.get("train_subset"))
    torch.manual_seed(run["search"]["seed"])
    model = build_model(run["spec"], num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    if run.get("weights") and not from_checkpoint:
        load_weights(model, run["weights"], timm_style=run["spec"].startswith("timm:"))
    cfg = SearchConfig.from_dict(run["search"])
    gm = prepare(model, data.example_input(), cfg.gates, leaf_modules=resolve_leaves(model, run.get("leaf") or []),
                 auto_leaf=run.get("auto_leaf", False))
    return data, gm, cfg


def load_searched(run_dir: Path, *, batch_size: int | None = None, augment: bool | None = None):
    """``(run config, data, gated graph)`` of a search run directory, with the searched state
    (masks, weights, thresholds) loaded from its checkpoint. ``batch_size`` and ``augment``
    override the search's data settings (retraining uses its own)."""
    run = load_run_config(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise CheckpointError(f"no {CHECKPOINT} in {run_dir}: run `granular search` (or --resume it) first")
    data, gm, cfg = build_run(run, from_checkpoint=True)
    searcher = make_searcher(gm, data, cfg, run_dir=None, progress=False)
    searcher.resume(run_dir / CHECKPOINT)
    if batch_size is not None or augment is not None:
        data = load_data(run["dataset"], batch_size=batch_size or cfg.batch_size, seed=cfg.seed,
                         root=run.get("data_root"), augment=run.get("augment", False) if augment is None else augment,
                         subset=run.get("train_subset"))
    gm.cpu()
    return run, data, gm
