"""``restore_norms``: fresh BatchNorms back where export folded them away.

Requires: the compact GraphModule from ``export`` and the gated graph it came from (``LAYER``
meta from ``find_units``). Produces: ``compact`` with a new ``BatchNorm`` (submodule
``retrain_norms.<path>``) after each layer whose gated-graph layer fed a BatchNorm; that
layer's folded bias is dropped (redundant before a norm).

Why: a folded norm is a fixed affine map, not a norm. Training an exported architecture from
scratch needs the norms back.

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

    def __init__(self, gated: fx.GraphModule):
        super().__init__()
        self.gated = gated
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
            if getattr(layer, "bias", None) is not None:   # export's folded shift; redundant before a norm
                layer.register_parameter("bias", None)
            bn = type(old)(width, eps=old.eps, momentum=old.momentum, affine=old.affine,
                           track_running_stats=old.track_running_stats)
            if not hasattr(compact, NORM_ROOT):
                compact.add_module(NORM_ROOT, nn.Module())
            compact.get_submodule(NORM_ROOT).add_module(path.replace(".", "_"), bn)
            with graph.inserting_after(n):
                new = graph.call_module(f"{NORM_ROOT}.{path.replace('.', '_')}", (n,))
            n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            self.count += 1
        return PassResult(compact, self.count > 0)


def restore_norms(compact: fx.GraphModule, gm: fx.GraphModule) -> int:
    """Run :class:`RestoreNorms` on ``compact`` (in place) against the gated graph ``gm``;
    returns how many norms were restored."""
    p = RestoreNorms(gm)
    run_passes(compact, [p])
    return p.count
