"""How passes run: a ``torch.fx`` :class:`PassManager` with one shared check after each pass.

Passes do not lint or recompile by themselves. The manager recompiles the GraphModule after
every transform and then runs :func:`check_graph` on it; an error inside a pass surfaces as
the pass's own exception (the manager's wrapper, which names the pass, is its cause chain).

Analyses (a pass class with ``mutates = False``: it writes ``node.meta`` and nothing else) run
outside the manager: it would recompile and lint the unchanged graph after them, which on a
20,000-node super-net costs about half a second each and was a third of ``prepare``. For the
same reason a transform may say, with ``applies(gm) -> bool``, that it has nothing to do on a
graph (no fused norm+act module, no in-place op, kernels off); it is then skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager

__all__ = ["check_graph", "run_passes"]


def check_graph(gm: fx.GraphModule) -> None:
    """The check after every pass: the graph is well formed (``Graph.lint``)."""
    if isinstance(gm, fx.GraphModule):
        gm.graph.lint()


def run_passes(gm: fx.GraphModule, passes: Sequence[Callable]) -> fx.GraphModule:
    """Run ``passes`` in order, once each: runs of transforms under one manager (recompiled
    and checked after each), analyses directly."""
    pending: list[Callable] = []
    for p in passes:
        if hasattr(p, "applies"):
            gm, pending = _managed(gm, pending), []  # it must see the graph the transforms before it leave
            if not p.applies(gm):
                continue
        if getattr(p, "mutates", True):
            pending.append(p)
            continue
        gm = _managed(gm, pending)
        pending = []
        gm = p(gm).graph_module
    return _managed(gm, pending)


def _managed(gm: fx.GraphModule, passes: list[Callable]) -> fx.GraphModule:
    if not passes:
        return gm
    pm = PassManager(passes=list(passes), steps=1, run_checks_after_each_pass=True)
    pm.add_checks(check_graph)
    try:
        return pm(gm).graph_module
    except Exception as err:  # PassManager wraps every error: surface the pass's own
        raise (err.__cause__ or err) from None
