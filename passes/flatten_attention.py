"""``flatten_attention``: run every ``scaled_dot_product_attention`` on 4-d q, k and v.

Requires: a GraphModule with ``tensor_meta`` on its attention inputs (a compact model from
``export`` has it). Produces: each attention whose q, k and v have more than four dimensions
(NesT's and Twins' blocks attend over ``(B, windows, heads, tokens, dim)``) and no mask, or
three (SAM's ViT folds the heads into the batch: ``(B·heads, tokens, dim)``, with a mask of
up to three), runs on four::

    q4 = q.flatten(0, n - 4); ...                                  # n > 4
    y = scaled_dot_product_attention(q4, k4, v4, ...).unflatten(0, (q.size(0), ..., q.size(n - 4)))
    y = scaled_dot_product_attention(q.unsqueeze(0), ..., attn_mask=m.unsqueeze(0)).squeeze(0)   # n = 3

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


def _mask(node: fx.Node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def needs_flattening(node: fx.Node) -> bool:
    """An attention node over q, k, v of equal rank: above 4 without a mask, or 3 with a
    mask of rank 3 at most."""
    if node.op != "call_function" or node.target not in ATTENTION_TARGETS or len(node.args) < 3:
        return False
    shapes = [tensor_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:3]]
    if any(s is None or len(s) != len(shapes[0]) for s in shapes):
        return False
    mask = _mask(node)
    if len(shapes[0]) == 3:
        mask_shape = tensor_shape(mask) if isinstance(mask, fx.Node) else None
        return mask is None or mask_shape is not None and len(mask_shape) <= 3
    return len(shapes[0]) > 4 and mask is None


class FlattenAttention(PassBase):
    """Transform: attention over 3 or more than 4 dimensions -> 4-d attention, reshaped around it."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        count = 0
        for node in [n for n in graph.nodes if needs_flattening(n)]:
            q, k, v = node.args[:3]
            rank = len(tensor_shape(q))
            with graph.inserting_before(node):
                if rank == 3:  # one more leading dimension, on the mask too where it has three
                    args = [graph.call_method("unsqueeze", (a, 0)) for a in (q, k, v)] + list(node.args[3:])
                    kwargs = dict(node.kwargs)
                    mask = _mask(node)
                    if mask is not None and len(tensor_shape(mask)) == 3:
                        wide = graph.call_method("unsqueeze", (mask, 0))
                        if len(node.args) > 3:
                            args[3] = wide
                        else:
                            kwargs["attn_mask"] = wide
                    new = graph.call_function(node.target, tuple(args), kwargs)
                    out = graph.call_method("squeeze", (new, 0))
                else:  # the dimensions before (heads, tokens, dim) folded into one batch
                    lead = rank - 3
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
