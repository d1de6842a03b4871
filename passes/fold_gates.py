"""``fold_gates``: fold the β (filter) and α (op) gates that follow a BatchNorm into that norm's
affine, in the training graph.

Requires: a training graph (:func:`~granular.passes.pipelines.training_graph`) with
``granular.gate`` meta on its gate nodes. Produces: each ``BatchNorm2d -> [filter gate] ->
[op gate]`` chain (at least one gate; each node the only user of the one before) replaced by
one call of a :class:`GatedNorm` under ``granular_gated_norms``, which runs a single
``batch_norm`` with scale ``γ · g`` and shift ``β · g``, ``g`` the gates' product (per channel
for β, a scalar for α). Parameters, buffers and the state dict are unchanged: the gated norm
holds the graph's own norm and gate modules (not as submodules), and the gates keep their
live thresholds, stored masks and gains.

Why: a gate after a norm multiplies the whole activation once forward and twice backward (the
input gradient and the gate's own), for every op of a super-net. ``(x̂ γ + β) g = x̂ (γ g) + β g``
is exact in training and eval mode alike (the batch statistics are those of ``x``, so the
running statistics are untouched), and it costs a multiply over ``C`` numbers instead.

Before/after, one op of a DARTS cell::

    y = bn(conv(x)); y = filter_gate(y, t_β); y = op_gate(y, t_α)
    y = granular_gated_norms.bn(conv(x), t_β, t_α)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.gates import FilterGate, OpGate
from granular.meta import GATE
from granular.passes._manager import run_passes

__all__ = ["FoldGates", "fold_gates", "GatedNorm", "GATED_NORM_ROOT", "FOLDED"]

GATED_NORM_ROOT = "granular_gated_norms"
FOLDED = "granular.folded_gates"  # node meta: the gate nodes a gated norm absorbed, by name


def batch_norm(norm: nn.BatchNorm2d, x: torch.Tensor, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``norm(x)`` with ``weight`` and ``bias`` for its affine: ``_BatchNorm.forward``'s own
    statistics rules (momentum, cumulative averages when ``momentum`` is None, untracked
    statistics), so running statistics move exactly as the norm's own call would move them."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    use_batch = norm.training or (norm.running_mean is None and norm.running_var is None)
    track = not norm.training or norm.track_running_stats
    return F.batch_norm(x, norm.running_mean if track else None, norm.running_var if track else None,
                        weight, bias, use_batch, factor, norm.eps)


class GatedNorm(nn.Module):
    """``op_gate(filter_gate(norm(x)))`` as one ``batch_norm`` (module docstring). Either gate
    may be absent. The modules are held, not registered: the graph owns them."""

    def __init__(self, norm: nn.BatchNorm2d, filter_gate: Optional[FilterGate], op_gate: Optional[OpGate]):
        super().__init__()
        self._parts = (norm, filter_gate, op_gate)

    def forward(self, x: torch.Tensor, t_beta: Optional[torch.Tensor] = None,
                t_alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        norm, fg, og = self._parts
        g = fg.value(t_beta) if fg is not None else None
        if og is not None:
            a = og.value(t_alpha)
            g = a if g is None else g * a
        if norm.affine:
            return batch_norm(norm, x, norm.weight * g, norm.bias * g)
        return batch_norm(norm, x, g.expand(x.shape[1]), None)

    def extra_repr(self) -> str:
        norm, fg, og = self._parts
        return f"{norm.num_features}, filter_gate={fg is not None}, op_gate={og is not None}"


def _gate_after(gm: fx.GraphModule, n: fx.Node, kind: str) -> Optional[fx.Node]:
    """The only user of ``n`` if it is a ``kind`` gate that reads ``n`` (channels-first)."""
    if len(n.users) != 1:
        return None
    u = next(iter(n.users))
    g = u.meta.get(GATE)
    if u.op != "call_module" or g is None or g.kind != kind or not u.args or u.args[0] is not n:
        return None
    mod = gm.get_submodule(str(u.target))
    if isinstance(mod, FilterGate) and mod.channels_last:
        return None
    return u


class FoldGates(PassBase):
    """Transform (in place): fold the gates after each ``BatchNorm2d`` into it (module
    docstring). ``count`` says how many norms absorbed gates after a run."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.count = 0
        root = None
        for n in list(gm.graph.nodes):
            if n.op != "call_module" or type(gm.get_submodule(str(n.target))) is not nn.BatchNorm2d:
                continue
            fnode = _gate_after(gm, n, "filter")
            onode = _gate_after(gm, fnode or n, "op")
            if fnode is None and onode is None:
                continue
            if root is None:
                root = getattr(gm, GATED_NORM_ROOT, None)
                if root is None:
                    root = nn.Module()
                    gm.add_submodule(GATED_NORM_ROOT, root)
            name = n.name
            root.add_module(name, GatedNorm(gm.get_submodule(str(n.target)),
                                            gm.get_submodule(str(fnode.target)) if fnode else None,
                                            gm.get_submodule(str(onode.target)) if onode else None))
            last = onode or fnode
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(f"{GATED_NORM_ROOT}.{name}", (n.args[0],), {
                    "t_beta": fnode.args[1] if fnode else None, "t_alpha": onode.args[1] if onode else None})
            new.meta.update({k: v for k, v in last.meta.items() if k != GATE})
            new.meta[FOLDED] = [g.name for g in (fnode, onode) if g is not None]
            last.replace_all_uses_with(new)
            for dead in (onode, fnode, n):
                if dead is not None:
                    gm.graph.erase_node(dead)
            self.count += 1
        return PassResult(gm, self.count > 0)


def fold_gates(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`FoldGates`."""
    return run_passes(gm, [FoldGates()])
