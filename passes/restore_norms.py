"""``restore_norms``: fresh BatchNorms back where export folded them away.

Requires: the compact GraphModule from ``export`` and the gated graph it came from (``LAYER``
meta from ``find_units``). Produces: ``compact`` with a new ``BatchNorm`` (submodule
``retrain_norms.<path>``) after each layer whose gated-graph layer fed a BatchNorm; that
layer's folded bias is dropped (redundant before a norm).

Why: a folded norm is a fixed affine map, not a norm. Training an exported architecture from
scratch needs the norms back, and so does fine-tuning it at a normal learning rate.

``keep_function=True`` (fine-tuning): the layer keeps its bias and the new norm starts as the
identity (mean 0, variance ``1 - eps``, γ = 1, β = 0), so the model computes what it did;
:func:`granular.retrain.calibrate_norms` then gives each norm the statistics of its input
with γ and β that undo them, and :mod:`granular.passes.fold_norms` folds the norms back
after training. A layer with an exact-zero bias entry (a pruned, counted parameter) is left
without a norm: folding would make that entry nonzero.

Before/after, one layer whose norm ``bn1`` was folded::

    y = conv1(x)
    y = conv1(x); z = retrain_norms_bn1(y)
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.meta import LAYER
from granular.passes._manager import run_passes

__all__ = ["RestoreNorms", "restore_norms", "NORM_ROOT"]

NORM_ROOT = "retrain_norms"


def _folded_norms(gm: fx.GraphModule) -> dict[str, tuple[str, nn.Module]]:
    """layer path -> (norm path, norm) for every gated-graph layer whose only user is a BatchNorm."""
    norms: dict[str, tuple[str, nn.Module]] = {}
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is None or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.modules.batchnorm._BatchNorm):
            norms[info.module] = (str(user.target), gm.get_submodule(str(user.target)))
    return norms


class RestoreNorms(PassBase):
    """Transform (in place): a fresh BatchNorm after each layer of the compact model whose
    norm export folded (see the module docstring). ``count`` says how many after a run."""

    def __init__(self, gated: fx.GraphModule, keep_function: bool = False):
        super().__init__()
        self.gated = gated
        self.keep_function = keep_function
        self.count = 0

    def call(self, compact: fx.GraphModule) -> PassResult:
        norms = _folded_norms(self.gated)
        graph = compact.graph
        self.count = 0
        for n in list(graph.nodes):
            if n.op != "call_module" or str(n.target) not in norms:
                continue
            path, old = norms[str(n.target)]
            layer = compact.get_submodule(str(n.target))
            width = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
            bias = getattr(layer, "bias", None)
            if self.keep_function:
                if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or not old.affine \
                        or (bias is not None and bool((bias == 0).any())):
                    continue   # fold_norms scales output rows; a zero bias entry must stay zero
            elif bias is not None:   # export's folded shift; redundant before a norm
                layer.register_parameter("bias", None)
            bn = type(old)(width, eps=old.eps, momentum=old.momentum, affine=old.affine,
                           track_running_stats=old.track_running_stats)
            if self.keep_function:   # the identity until calibrate_norms sets its statistics
                bn.running_var.fill_(1.0 - bn.eps)
            if not hasattr(compact, NORM_ROOT):
                compact.add_module(NORM_ROOT, nn.Module())
            compact.get_submodule(NORM_ROOT).add_module(path.replace(".", "_"), bn)
            with graph.inserting_after(n):
                new = graph.call_module(f"{NORM_ROOT}.{path.replace('.', '_')}", (n,))
            n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            self.count += 1
        return PassResult(compact, self.count > 0)


def restore_norms(compact: fx.GraphModule, gm: fx.GraphModule, keep_function: bool = False) -> int:
    """Run :class:`RestoreNorms` on ``compact`` (in place) against the gated graph ``gm``;
    returns how many norms were restored."""
    p = RestoreNorms(gm, keep_function)
    run_passes(compact, [p])
    return p.count
