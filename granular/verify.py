"""The export invariant, checked where a model is written: the compact module computes what
the pruned (gated, eval-mode) graph computes, and has the parameters ``count_params`` says.

:func:`granular.testing.check_export` proves it over random masks across the zoo; this module
holds the comparison it shares with :func:`verify_export`, which ``granular search`` and
``granular export`` run on one batch of the run's data before they save a compact model, so a
wrong export is refused in one line instead of shipped.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from granular.errors import ExportError

__all__ = ["flat_outputs", "compare_outputs", "verify_export", "data_batch"]


def flat_outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    return []


def compare_outputs(ref: list[torch.Tensor], got: list[torch.Tensor], rtol: float) -> tuple[list[str], float]:
    """Why ``got`` differs from ``ref`` (empty when it does not), and the largest difference
    relative to ``ref``'s largest magnitude."""
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return ["compact outputs differ in number or shape"], float("inf")
    scale = max((float(r.abs().max()) for r in ref), default=0.0)
    err = max((float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got)), default=0.0)
    rel = err / scale if scale > 0 else err
    if not rel <= rtol:
        return [f"compact output differs from gated by {rel:.2e} relative (> {rtol:g})"], rel
    return [], rel


def data_batch(data, n: int = 16) -> torch.Tensor:
    """Up to ``n`` inputs of the run's validation data (training data without it)."""
    loader = data.val_loader() if hasattr(data, "val_loader") else data.train_loader(0)
    x, _ = next(iter(loader))
    return x[:n]


@torch.no_grad()
def verify_export(gm: fx.GraphModule, compact: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """Check ``compact = export(gm)`` on the batch ``x``; returns the relative error.

    Raises:
        ExportError: the outputs or the counts differ (one line; nothing should be saved).
    """
    from granular.accounting import count_module, count_params
    was = gm.training
    gm.eval()
    try:
        ref = flat_outputs(gm(x))
    finally:
        gm.train(was)
    reasons, rel = compare_outputs(ref, flat_outputs(compact(x)), rtol)
    counted, exported = count_params(gm), count_module(compact)
    if counted != exported:
        reasons.append(f"count_params says {counted.nonzero:,} nonzero, the export has {exported.nonzero:,}")
    if reasons:
        raise ExportError(f"the exported model does not compute what the pruned one does ({'; '.join(reasons)}); "
                          f"it was not saved (the checkpoint is kept): please report this with the run directory")
    return rel
