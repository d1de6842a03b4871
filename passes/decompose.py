"""``decompose_norm_act``: split fused norm+activation leaves into standard nodes.

timm keeps ``BatchNormAct2d`` (BatchNorm, dropout and activation in one module) as an FX
leaf, because its forward branches on ``self.training``. As one opaque node it would fix
every channel it touches and could not be folded into the conv before it. This pass
replaces each such node by three ``call_module`` nodes on plain modules (``nn.BatchNorm2d``
sharing the original's parameters and running statistics, then its ``drop`` and ``act``)::

    x = self.bn1(conv)                x = self.bn1.bn(conv)
                              ->      x = self.bn1.drop(x)
                                      x = self.bn1.act(x)

The user's model is not changed: the new modules live in the GraphModule's own hierarchy.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.passes._manager import run_passes

__all__ = ["DecomposeNormAct", "decompose_norm_act"]


def _is_norm_act(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and hasattr(m, "act")
            and hasattr(m, "drop") and type(m).__name__ == "BatchNormAct2d")


def _plain_batchnorm(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                        track_running_stats=m.track_running_stats, device="meta")
    if m.affine:
        bn.weight, bn.bias = m.weight, m.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(m, name))
    bn.train(m.training)
    return bn


class DecomposeNormAct(PassBase):
    """Transform: BatchNormAct2d leaves -> BatchNorm2d, dropout and activation nodes."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            m = gm.get_submodule(node.target)
            if not _is_norm_act(m) or len(node.args) != 1 or node.kwargs:
                continue
            box = nn.Module()
            box.bn, box.drop, box.act = _plain_batchnorm(m), m.drop, m.act
            path = str(node.target)
            parent, _, name = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, box)
            with gm.graph.inserting_after(node):
                bn = gm.graph.call_module(f"{path}.bn", node.args)
            with gm.graph.inserting_after(bn):
                drop = gm.graph.call_module(f"{path}.drop", (bn,))
            with gm.graph.inserting_after(drop):
                act = gm.graph.call_module(f"{path}.act", (drop,))
            node.replace_all_uses_with(act)
            gm.graph.erase_node(node)
            changed = True
        return PassResult(gm, changed)


def decompose_norm_act(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`DecomposeNormAct`."""
    return run_passes(gm, [DecomposeNormAct()])
