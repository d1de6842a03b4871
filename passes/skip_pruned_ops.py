"""``skip_pruned_ops``: the training graph without the operation units pruning removed.

Requires meta: ``granular.gate`` (from ``insert_gates``), ``tensor_meta``.
Produces: a new GraphModule that shares every module and parameter with the gated graph,
in which each op gate whose stored mask is 0 is gone from its sum, and with it (dead-code
elimination) every node that only fed it. The gated graph itself is not changed: export and
the exact count still read the whole graph.

Why: a pruned op's gate is exactly 0 in training and in eval (stored mask × anything), so
``x + gate(op(x))`` equals ``x`` bit for bit, yet the op still ran, kept its activations
for backward and, with weight decay and momentum, kept changing weights that regrowth must
restore unchanged. Dropping it saves that compute and memory; it is what lets a multi-stage
search keep earlier stages resident at a fraction of their super-net cost.

Before/after, one edge with two ops of which ``pool`` was pruned::

    a = conv(x); ga = gate_conv(a); b = pool(x); gb = gate_pool(b); y = ga + gb
    a = conv(x); ga = gate_conv(a); y = ga
"""

from __future__ import annotations


import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.gates import GATE_ROOT
from granular.meta import GATE, tensor_shape
from granular.passes._graph import ADD_TARGETS
from granular.passes._manager import run_passes

__all__ = ["SkipPrunedOps", "skip_pruned_ops", "share_graph"]



def share_graph(gm: fx.GraphModule, graph: fx.Graph, extra: dict[str, nn.Module] | None = None,
                class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule running ``graph`` over ``gm``'s own modules and tensors (shared, not
    copied), plus ``extra`` submodules."""
    root = nn.Module()
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    for name, t in list(gm.named_parameters(recurse=False)) + list(gm.named_buffers(recurse=False)):
        setattr(root, name, t)
    for name, mod in (extra or {}).items():
        root.add_module(name, mod)
    out = fx.GraphModule(root, graph, class_name=class_name)
    out.meta.update(gm.meta)
    return out


def _writes_input(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` overwrites its first input in place (``ReLU(inplace=True)``, ``relu_``,
    ``x.add_(y)``, ``F.relu(x, inplace=True)``)."""
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).endswith("__")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__") or name.startswith("i") and name[1:] in (
            "add", "sub", "mul", "truediv")
    return False


def _dead_gate(gm: fx.GraphModule, n: fx.Node) -> bool:
    g = n.meta.get(GATE)
    if g is None or g.kind != "op" or n.op != "call_module" or not str(n.target).startswith(GATE_ROOT):
        return False
    return float(gm.get_submodule(str(n.target)).mask) == 0.0


class SkipPrunedOps(PassBase):
    """Transform (on a copy): remove pruned op units from their sums, then dead code."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, env)
        graph.output(out)
        zero = {env[n] for n in gm.graph.nodes if _dead_gate(gm, n)}
        changed = bool(zero)
        for n in list(graph.nodes):
            if n.op != "call_function" or n.target not in ADD_TARGETS or len(n.args) != 2 or n.kwargs:
                continue
            a, b = n.args
            za, zb = a in zero, b in zero
            if za and zb:
                zero.add(n)
            elif za or zb:
                keep = b if za else a
                if isinstance(keep, fx.Node) and tensor_shape(keep) == tensor_shape(n):
                    if any(_writes_input(gm, u) for u in n.users):
                        # the sum was a fresh tensor that an in-place reader (timm's ReLU(inplace))
                        # could overwrite; ``keep`` may be saved for backward by its other readers
                        # or by the node that made it (a ReLU saves its output)
                        with graph.inserting_before(n):
                            keep = graph.call_method("clone", (keep,))
                            keep.meta.update(n.meta)
                    n.replace_all_uses_with(keep)
                    graph.erase_node(n)
        result = share_graph(gm, graph, class_name="LiveGraph")
        result.graph.eliminate_dead_code()
        return PassResult(result, changed)


def skip_pruned_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`SkipPrunedOps`: the live training graph of ``gm``."""
    return run_passes(gm, [SkipPrunedOps()])
