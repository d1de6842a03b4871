"""Test helpers for gated graphs: random masks, open gates, randomised norms.

These drive the invariant tests (export equivalence, exact accounting, inert gates) and are
public so that users can check their own models the same way. ``protect_last_ops_`` and
``gate_units`` live in :mod:`granular.masks` and are re-exported here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from granular.accounting import ParamCount
from granular.gates import FilterGate, OpGate, WeightMask
from granular.masks import gate_bank, gate_units, protect_last_ops_
from granular.verify import compare_outputs, flat_outputs

__all__ = ["random_masks_", "open_gates_", "randomize_norms_", "protect_last_ops_", "check_export",
           "ExportCheck", "gate_units"]


@torch.no_grad()
def random_masks_(gm: fx.GraphModule, op: float = 0.3, filter: float = 0.3, weight: float = 0.3,
                  seed: int = 0) -> fx.GraphModule:
    """Prune random units at all three granularities by setting their stored masks to 0.

    Args:
        gm: a gated graph (from :func:`granular.prepare`).
        op, filter, weight: the fraction of operation units, filters and weights to prune.
        seed: random seed.

    The gate parameters and thresholds are also drawn at random, so that exported gate
    values are not all equal. Every sum keeps at least one operation (last-op protection).
    """
    gen = torch.Generator().manual_seed(seed)
    bank = gate_bank(gm)
    for m in bank.op.values():
        m.mask.copy_((torch.rand((), generator=gen) >= op).float())
        m.alpha.copy_(torch.randn((), generator=gen))
    for m in bank.filter.values():
        m.mask.copy_((torch.rand(m.mask.shape, generator=gen) >= filter).float())
        m.beta.copy_(torch.randn(m.beta.shape, generator=gen))
    for m in bank.weight.values():
        m.mask.copy_((torch.rand(m.mask.shape, generator=gen) >= weight).float())
    protect_last_ops_(gm)
    return gm


@torch.no_grad()
def open_gates_(gm: fx.GraphModule) -> fx.GraphModule:
    """Open every gate fully: σ = 1, gains 1, masks 1, thresholds 0. The gated graph then computes
    exactly what the ungated one does (``docs/design.md``, invariant 4)."""
    bank = gate_bank(gm)
    for m in bank.modules():
        if isinstance(m, OpGate):
            m.alpha.fill_(60.0)
            m.mask.fill_(1.0)
            m.gain.fill_(1.0)
        elif isinstance(m, FilterGate):
            m.beta.fill_(60.0)
            m.mask.fill_(1.0)
            m.gain.fill_(1.0)
        elif isinstance(m, WeightMask):
            m.mask.fill_(1.0)
    for name, p in bank.scopes.named_parameters():
        p.fill_(0.0)
    return gm


@torch.no_grad()
def randomize_norms_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics (and affine parameters), so that
    folding them is actually exercised; and every conv/linear whose weight is all zero (a
    zero-initialised classifier, as torchvision's ViT has) small random weights: else the
    output is constant and a comparison of outputs proves nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not bool(m.weight.any()):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
    return module


@dataclass
class ExportCheck:
    """What :func:`check_export` found for one model (``docs/design.md``, invariants 1 and 2).

    Attributes:
        ok: every check passed.
        reason: why not, in one line ("" when ok).
        rel_err: max |compact - gated| / max |gated| over the outputs, in eval mode.
        counted: ``count_params`` of the gated graph (the promise).
        exported: the parameter count of ``export`` (what was delivered).
        original: the dense parameter count of the model before gating.
        units: the gated units per granularity (``op``, ``filter``, ``weight``).
        auto_leaves: module classes kept whole because they did not trace (``auto_leaf``).
        formats: deployment format -> "" when its export ran back equal to the compact model,
            else the reason (``formats``; not part of ``ok``).
    """

    ok: bool
    reason: str = ""
    rel_err: float = math.nan
    counted: Optional[ParamCount] = None
    exported: Optional[ParamCount] = None
    original: int = 0
    units: dict[str, int] = field(default_factory=dict)
    auto_leaves: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def check_export(model: nn.Module, example_inputs, *, seed: int = 0, rtol: float = 1e-4,
                 leaf_modules=(), auto_leaf: bool = False, reload: bool = False, op: float = 0.3,
                 filter: float = 0.3, weight: float = 0.3, formats=()) -> ExportCheck:
    """Prepare ``model``, prune random units at all three granularities, export, and check:
    the compact output equals the gated one (eval mode, ``rtol`` relative to the output's
    largest magnitude), ``count_params`` equals the export, and the export is smaller. With
    ``reload``, the export is also saved with :func:`granular.save` and loaded back (from its
    own ``model.py``, without the original class) and must compute the same. Each of
    ``formats`` (``"onnx"``, ``"pt2"``) is written as ``granular.save(format=...)`` writes it
    (:func:`granular.formats.save_format`, which runs the file back and compares at
    ``rtol``); the outcome is in ``formats``.

    The model is deep-copied and its norms get random statistics (so folding is exercised);
    the caller's model is not changed. Errors are caught and reported in ``reason``.
    """
    from granular.accounting import count_module, count_params
    from granular.api import export, prepare
    from granular.passes.trace import AUTO_LEAVES

    model = copy.deepcopy(model).eval()
    randomize_norms_(model, seed=seed)
    original = count_module(model).total
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    stage = "prepare"
    units: dict[str, int] = {}
    leaves: list[str] = []
    try:
        gm = prepare(model, example_inputs, leaf_modules=leaf_modules, auto_leaf=auto_leaf)
        units = gate_units(gm)
        leaves = [row["type"] for row in gm.meta.get(AUTO_LEAVES, [])]
        stage = "random masks"
        random_masks_(gm, op=op, filter=filter, weight=weight, seed=seed)
        gm.eval()
        stage = "gated forward"
        ref = flat_outputs(gm(*example_inputs))
        stage = "count_params"
        counted = count_params(gm)
        stage = "export"
        compact = export(gm)
        stage = "compact forward"
        got = flat_outputs(compact(*example_inputs))
    except Exception as err:  # noqa: BLE001 - a coverage check reports, it does not stop
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return ExportCheck(False, f"{stage}: {type(err).__name__}: {first}", original=original, units=units,
                           auto_leaves=leaves)
    exported = count_module(compact)
    if any(t.numel() > 1 for t in ref) and not any(bool(t.ne(t.reshape(-1)[0]).any()) for t in ref if t.numel()):
        return ExportCheck(False, "the gated output is the same number everywhere: comparing outputs proves nothing "
                                  "(a zero-initialised layer? randomize_norms_ gives such layers random weights)",
                           counted=counted, exported=exported, original=original, units=units, auto_leaves=leaves)
    reasons, rel = compare_outputs(ref, got, rtol)
    if math.isinf(rel):
        return ExportCheck(False, reasons[0], counted=counted, exported=exported, original=original, units=units,
                           auto_leaves=leaves)
    if counted != exported:
        reasons.append(f"count_params says {counted}, export has {exported}")
    if exported.total >= original:
        reasons.append(f"export is not smaller ({exported.total:,} >= {original:,} parameters)")
    if reload:
        reasons.extend(_reload_problems(compact, example_inputs, got))
    fmts = {f: _format_problem(compact, example_inputs, f, rtol) for f in formats}
    return ExportCheck(not reasons, "; ".join(reasons), rel, counted, exported, original, units, leaves, fmts)


def _format_problem(compact, example_inputs, fmt: str, rtol: float) -> str:
    """Save ``compact`` as ``fmt`` (which runs the file back and compares): "" or why not."""
    import pathlib
    import tempfile

    from granular.formats import save_format
    with tempfile.TemporaryDirectory() as d:
        try:
            save_format(compact, pathlib.Path(d), fmt, example_inputs, rtol)
        except Exception as err:  # noqa: BLE001
            first = (str(err).strip().splitlines() or [""])[0][:300]
            return f"{type(err).__name__}: {first}"
    return ""


def _reload_problems(compact, example_inputs, expected: list[torch.Tensor]) -> list[str]:
    """Save ``compact``, load it back from its own source, and compare its outputs."""
    import tempfile

    from granular.io import load, save
    with tempfile.TemporaryDirectory() as d:
        try:
            save(compact, d)
            again = flat_outputs(load(d)(*example_inputs))
        except Exception as err:  # noqa: BLE001
            first = (str(err).strip().splitlines() or [""])[0][:300]
            return [f"reload: {type(err).__name__}: {first}"]
    scale = max((float(e.abs().max()) for e in expected), default=0.0)
    if len(again) != len(expected) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
                                          for a, b in zip(again, expected)):
        return ["reloaded model computes something else"]
    return []
