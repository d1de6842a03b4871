"""``fold_norms``: fold the BatchNorms that ``restore_norms`` put back into the layers before
them, and remove them.

Requires: a compact GraphModule whose restored norms live under ``retrain_norms`` (each one
the only user of a Conv or Linear layer, as :mod:`granular.passes.restore_norms` inserts
them). Produces: the same graph without those norms; each layer's weight is scaled per
output channel by the norm's ``γ / sqrt(var + eps)`` and its bias becomes
``(bias - mean) · γ / sqrt(var + eps) + β``.

Why: ``export --finetune`` trains the compact model with its norms back (a folded norm is a
fixed affine map, and training through it at a normal learning rate undoes the search), then
ships it folded again, so the saved model has the searched parameter count. Scaling a row
keeps its exact zeros, so the searched weight sparsity survives the fold.

Before/after, one layer::

    y = conv1(x); z = retrain_norms_bn1(y)
    z = conv1(x)          # conv1.weight, conv1.bias absorb the norm (eval statistics)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.passes._manager import run_passes
from granular.passes.export import bn_affine
from granular.passes.restore_norms import NORM_ROOT

__all__ = ["FoldNorms", "fold_norms"]


class FoldNorms(PassBase):
    """Transform (in place): every norm under ``retrain_norms`` folded into the layer it
    follows (module docstring). ``count`` says how many after a run."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.count = 0
        for n in list(gm.graph.nodes):
            if n.op != "call_module" or not str(n.target).startswith(NORM_ROOT + "."):
                continue
            layer_node = n.args[0]
            layer = gm.get_submodule(str(layer_node.target))
            bn = gm.get_submodule(str(n.target))
            scale, shift = bn_affine(bn)
            with torch.no_grad():
                w = layer.weight
                layer.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
                old = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
                layer.bias = nn.Parameter((old * scale + shift).to(w.dtype))
            n.replace_all_uses_with(layer_node)
            gm.graph.erase_node(n)
            self.count += 1
        if hasattr(gm, NORM_ROOT):
            delattr(gm, NORM_ROOT)
        return PassResult(gm, self.count > 0)


def fold_norms(gm: fx.GraphModule) -> int:
    """Run :class:`FoldNorms` on ``gm`` (in place); returns how many norms were folded."""
    p = FoldNorms()
    run_passes(gm, [p])
    return p.count
