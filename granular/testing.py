"""Test helpers for gated graphs: random masks, open gates, randomised norms.

These drive the invariant tests (export equivalence, exact accounting, inert gates) and are
public so that users can check their own models the same way.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from granular.gates import GATE_ROOT, FilterGate, OpGate, WeightMask
from granular.meta import GATE, SUM

__all__ = ["random_masks_", "open_gates_", "randomize_norms_", "protect_last_ops_"]


def _bank(gm: fx.GraphModule):
    if not hasattr(gm, GATE_ROOT):
        raise RuntimeError("the module has no gates: run granular.prepare first")
    return getattr(gm, GATE_ROOT)


def protect_last_ops_(gm: fx.GraphModule, prefer: dict[str, float] | None = None) -> list[str]:
    """Re-open one op on every sum whose inputs are all pruned op units.

    Args:
        gm: a gated graph.
        prefer: score per op-unit key; the best-scored pruned op is re-opened (else the first).

    Returns:
        The keys of the ops re-opened.
    """
    bank = _bank(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    reopened = []
    for n in gm.graph.nodes:
        info = n.meta.get(SUM)
        if info is None:
            continue
        leaves = [by_name[i] for i in info.inputs if i in by_name]
        keys = []
        for leaf in leaves:
            g = leaf.meta.get(GATE)
            if g is None or g.kind != "op":
                keys = None  # a non-unit input keeps the sum alive
                break
            keys.append(g.key)
        if not keys or any(float(bank.op[k].mask) != 0 for k in keys):
            continue
        best = max(keys, key=lambda k: (prefer or {}).get(k, 0.0)) if prefer else keys[0]
        bank.op[best].mask.fill_(1.0)
        reopened.append(best)
    return reopened


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
    bank = _bank(gm)
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
    """Open every gate fully: σ = 1, masks 1, thresholds 0. The gated graph then computes
    exactly what the ungated one does (DESIGN.md invariant 4)."""
    bank = _bank(gm)
    for m in bank.modules():
        if isinstance(m, OpGate):
            m.alpha.fill_(60.0)
            m.mask.fill_(1.0)
        elif isinstance(m, FilterGate):
            m.beta.fill_(60.0)
            m.mask.fill_(1.0)
        elif isinstance(m, WeightMask):
            m.mask.fill_(1.0)
    for name, p in bank.scopes.named_parameters():
        p.fill_(0.0)
    return gm


@torch.no_grad()
def randomize_norms_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics (and affine parameters), so that
    folding them is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
    return module
