"""The core of an attention layer in an FX graph: where q, k and v go in and the heads come out.

Two forms are recognised (``find_heads`` then proves what each head owns):

* fused: one ``scaled_dot_product_attention(q, k, v, attn_mask=m)`` node;
* explicit: ``o = a @ v`` where ``a`` comes from ``s = q @ kᵀ`` through scaling by a number,
  additions of masks or biases, views and reshapes, softmax over the last dim and dropout,
  each read only by the next (timm's ``fused_attn=False`` path, Swin's window attention)::

      s = (q * scale) @ k.transpose(-2, -1)
      s = s + rel_pos_bias                      # a mask operand: (1, H, N, N)
      a = dropout(softmax(s, dim=-1))
      o = a @ v

A *mask operand* is the other input of such an addition (or sdpa's ``attn_mask``); where it
holds one slice per head, export cuts it to the kept heads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from granular.meta import tensor_shape

__all__ = ["Core", "find_core", "ATTENTION_TARGETS"]

ATTENTION_TARGETS = frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})
_MATMUL = {operator.matmul, torch.matmul}
_ADD = {operator.add, torch.add}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div}
_SOFTMAX = {F.softmax, torch.softmax}
_VIEWS = {"view", "reshape"}


@dataclass
class Core:
    """One attention core.

    Attributes:
        out: the node whose output ``(B, H, N, D)`` carries the heads (the head gate follows it).
        inputs: q, k and v as the core reads them (k may be ``kᵀ``).
        scores: ``q @ kᵀ`` of the explicit form (None for sdpa).
        chain: the explicit form's nodes after ``scores`` up to the probabilities, in order.
        same: chain node -> the chain node it passes on unchanged in layout (softmax, dropout,
            scaling, a mask addition); the other chain nodes are views/reshapes.
        masks: (node, argument index or keyword) of every mask operand.
    """

    out: fx.Node
    inputs: tuple
    scores: Optional[fx.Node] = None
    chain: list = field(default_factory=list)
    same: dict = field(default_factory=dict)
    masks: list = field(default_factory=list)

    def masks_nodes(self) -> set:
        """The nodes that add a mask operand (a mask addition is "same" but no softmax)."""
        return {n for n, _ in self.masks}


def _is_matmul(n) -> bool:
    return isinstance(n, fx.Node) and (n.op == "call_function" and n.target in _MATMUL or
                                       n.op == "call_method" and n.target == "matmul")


def _last_dim(dim, node: fx.Node) -> bool:
    shape = tensor_shape(node)
    return shape is not None and dim in (-1, len(shape) - 1)


def _is_softmax(n: fx.Node, modules) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], nn.Softmax)
    return n.op == "call_method" and n.target == "softmax" or n.op == "call_function" and n.target in _SOFTMAX


def _chain_step(n: fx.Node, modules) -> Optional[list[tuple[fx.Node, Optional[tuple]]]]:
    """Candidates for the chain input of ``n``: (input, mask operand (arg key, node) or None)."""
    if n.op == "call_module":
        m = modules[n.target]
        if isinstance(m, nn.Dropout) or isinstance(m, nn.Softmax) and _last_dim(m.dim, n):
            return [(n.args[0], None)]
        return None
    t, args = n.target, n.args
    if n.op == "call_method" and t == "softmax" or n.op == "call_function" and t in _SOFTMAX:
        dim = args[1] if len(args) > 1 else n.kwargs.get("dim")
        return [(args[0], None)] if _last_dim(dim, n) else None
    if n.op == "call_function" and t is F.dropout:
        return [(args[0], None)]
    if n.op == "call_method" and t in _VIEWS:
        return [(args[0], None)]
    if (n.op == "call_function" and t in _SCALE or n.op == "call_method" and t in ("mul", "div")) and \
            len(args) == 2 and isinstance(args[0], fx.Node) and isinstance(args[1], (int, float)):
        return [(args[0], None)]
    if (n.op == "call_function" and t in _ADD or n.op == "call_method" and t == "add") and not n.kwargs and \
            len(args) == 2 and all(isinstance(a, fx.Node) for a in args):
        return [(args[0], (1, args[1])), (args[1], (0, args[0]))]
    return None


def _walk_scores(a: fx.Node, modules, depth: int = 0):
    """From the probabilities back to ``q @ kᵀ``: (scores, chain (last first), same, masks)."""
    if depth > 32 or len(a.users) != 1:
        return None
    if _is_matmul(a):
        return a, [], {}, []
    steps = _chain_step(a, modules)
    for src, mask in steps or ():
        found = _walk_scores(src, modules, depth + 1)
        if found is None:
            continue
        scores, chain, same, masks = found
        if not (a.op == "call_method" and a.target in _VIEWS):
            same[a] = src
        if mask is not None:
            masks.append((a, mask[0]))
        return scores, chain + [a], same, masks
    return None


def find_core(node: fx.Node, modules) -> Optional[Core]:
    """The attention core whose output is ``node``, or None."""
    if node.op == "call_function" and node.target in ATTENTION_TARGETS:
        if node.kwargs.get("enable_gqa"):
            return None
        mask_key = "attn_mask" if "attn_mask" in node.kwargs else 3 if len(node.args) > 3 else None
        mask = None if mask_key is None else node.kwargs.get(mask_key) if mask_key == "attn_mask" else node.args[3]
        if mask is not None and not isinstance(mask, fx.Node):
            return None
        return Core(out=node, inputs=tuple(node.args[:3]), masks=[(node, mask_key)] if mask is not None else [])
    if not _is_matmul(node) or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    a, v = node.args
    found = _walk_scores(a, modules)
    if found is None:
        return None
    scores, chain, same, masks = found
    if not any(_chain_step(n, modules) and _is_softmax(n, modules) for n in chain):
        return None  # two products without a softmax between them are not attention
    if len(scores.args) != 2 or not all(isinstance(x, fx.Node) for x in scores.args):
        return None
    return Core(out=node, inputs=(scores.args[0], scores.args[1], v), scores=scores, chain=chain,
                same=same, masks=masks)
