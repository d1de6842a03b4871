"""``thread_inplace_ops``: make the data flow of in-place ops explicit in the graph.

A statement such as ``y.mul_(c)`` traces to a node whose result nothing reads: the nodes
after it read ``y``, which the op changed under them. Passes that follow data flow would
then see no path through the op. Export would drop it as dead code, and the compact model
would compute something else (a bug this pass fixes), while the channel analysis would take
``y``'s channels as unscaled. This pass rewires every later reader of the mutated tensor to
read the in-place node instead::

    y = self.bn(x)                    y = self.bn(x)
    mul_ = y.mul_(10.0)       ->      mul_ = y.mul_(10.0)
    out = self.fc(y)                  out = self.fc(mul_)

The program computes the same values (an in-place op returns the tensor it changed); only
the graph now says so. ``trace`` runs it.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.passes._manager import run_passes

__all__ = ["ThreadInplaceOps", "thread_inplace_ops", "is_inplace"]

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def is_inplace(gm: fx.GraphModule, node: fx.Node, modules: Optional[dict] = None) -> bool:
    """Whether ``node`` changes its first argument in place and returns it (``modules``: a
    ``named_modules`` cache)."""
    if node.op == "call_method":
        return _trailing_underscore(str(node.target))
    if node.op == "call_function":
        return (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or _trailing_underscore(getattr(node.target, "__name__", "")))
    if node.op == "call_module":
        m = modules[node.target] if modules is not None else gm.get_submodule(str(node.target))
        return getattr(m, "inplace", False) is True
    return False


class ThreadInplaceOps(PassBase):
    """Transform: readers after an in-place op read its result instead of the tensor it changed."""

    def applies(self, gm: fx.GraphModule) -> bool:
        """Whether the graph has an in-place op (``run_passes`` skips it otherwise)."""
        modules = dict(gm.named_modules())
        return any(is_inplace(gm, n, modules) for n in gm.graph.nodes)

    def call(self, gm: fx.GraphModule) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        modules = dict(gm.named_modules())
        changed = False
        for node in gm.graph.nodes:
            src = node.args[0] if node.args else None
            if not isinstance(src, fx.Node) or not is_inplace(gm, node, modules):
                continue
            for user in [u for u in src.users if u is not node and order[u] > order[node]]:
                user.replace_input_with(src, node)
                changed = True
        return PassResult(gm, changed)


def thread_inplace_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`ThreadInplaceOps`."""
    return run_passes(gm, [ThreadInplaceOps()])
