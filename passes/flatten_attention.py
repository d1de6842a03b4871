"""``flatten_attention``: run every ``scaled_dot_product_attention`` on 4-d q, k and v.

Requires: a GraphModule with ``tensor_meta`` on its attention inputs (a compact model from
``export`` has it). Produces: each attention whose q, k and v have more than four dimensions
(NesT's blocks attend over ``(B, windows, heads, tokens, dim)``) and no mask becomes::

    q4 = q.flatten(0, n - 4); k4 = ...; v4 = ...
    y = scaled_dot_product_attention(q4, k4, v4, ...).unflatten(0, (q.size(0), ..., q.size(n - 4)))

The leading dimensions only batch the attention, so the values are the same. The batch size
stays symbolic (read with ``size`` at run time).

Why: the ONNX exporter translates ``scaled_dot_product_attention`` for 4-d inputs only
("only 4D query, key, and value are supported"), so ``--format onnx`` failed on such models,
pruned or not. :func:`granular.formats.save_format` runs this pass on a copy before writing
ONNX; the saved ``model.py`` keeps the graph as exported.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.meta import tensor_shape
from granular.passes._attention import ATTENTION_TARGETS
from granular.passes._manager import run_passes

__all__ = ["FlattenAttention", "flatten_attention", "needs_flattening"]


def needs_flattening(node: fx.Node) -> bool:
    """An attention node over q, k, v of equal rank above 4, without a mask."""
    if node.op != "call_function" or node.target not in ATTENTION_TARGETS or len(node.args) < 3:
        return False
    if len(node.args) > 3 and node.args[3] is not None or node.kwargs.get("attn_mask") is not None:
        return False
    shapes = [tensor_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:3]]
    return all(s is not None and len(s) > 4 and len(s) == len(shapes[0]) for s in shapes)


class FlattenAttention(PassBase):
    """Transform: attention over more than 4 dimensions -> 4-d attention between flatten and unflatten."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        count = 0
        for node in [n for n in graph.nodes if needs_flattening(n)]:
            q, k, v = node.args[:3]
            lead = len(tensor_shape(q)) - 3   # the dimensions folded into one batch
            with graph.inserting_before(node):
                flat = [graph.call_method("flatten", (a, 0, lead - 1)) for a in (q, k, v)]
                sizes = tuple(graph.call_method("size", (q, d)) for d in range(lead))
                new = graph.call_function(node.target, (*flat, *node.args[3:]), dict(node.kwargs))
                out = graph.call_method("unflatten", (new, 0, sizes))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            count += 1
        return PassResult(gm, count > 0)


def flatten_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`FlattenAttention`; returns ``gm`` (rewritten in place)."""
    return run_passes(gm, [FlattenAttention()])
