"""Export of attention heads: the plan and rebuild steps of ``export`` for head units.

A head gate (``granular.heads`` meta, from ``find_heads``) at zero makes its head's output
zero, so the head is removed exactly: its q/k/v rows leave the producing linears, its
columns leave ``proj``, its slice leaves a per-head attention mask, and every reshape that
counts heads is resized. The gate values of the kept heads fold into ``proj``'s columns, so
the gate node disappears. One head stays when every gate is zero (its columns then carry a
zero scale), so no tensor is left with zero heads. Before/after, two heads of three kept::

    qkv = self.qkv(x)                      # 3 x 3 x 64 rows      -> 3 x 2 x 64 rows
    r = qkv.reshape(B, N, 3, 3, 64)        #                      -> reshape(B, N, 3, 2, 64)
    o = sdpa(q, k, v, attn_mask=m)         # m: (1, 3, N, N)      -> m[:, [0, 2]]
    g = heads_gate(o, t_beta)              #                      -> (gone)
    y = self.proj(o.transpose(1, 2).reshape(B, N, 192))   # 192 -> 128 columns, scaled by g
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from granular.errors import GranularError
from granular.meta import HEADS
from granular.passes.find_heads import resized_args

__all__ = ["plan_heads", "build_resized", "build_masked"]


def _tensors(plan, path: str):
    from granular.passes.export import FoldedLayer
    m = plan.modules[path]
    if isinstance(m, FoldedLayer):
        return m.template, m.weight, m.bias
    return m, m.weight.detach(), None if m.bias is None else m.bias.detach()


def plan_heads(gm: fx.GraphModule, plan, gates: list[fx.Node], gv: dict) -> None:
    """Add the removal of zero heads, and the folding of every head gate, to ``plan``."""
    from granular.passes.export import FoldedLayer
    if not gates:
        return
    by_name = {n.name: n for n in gm.graph.nodes}
    for gate in gates:
        unit = gate.meta[HEADS]
        g = gv[gate].detach().float().reshape(-1)
        keep = [h for h in range(unit.heads) if float(g[h]) != 0.0] or [0]
        attn = gate.args[0]
        plan.folded_into[gate] = attn
        for path, per_head in unit.rows:
            template, w, b = _tensors(plan, path)
            if w.shape[0] != template.weight.shape[0]:
                raise GranularError(f"export: {path} lost output rows that {unit.key} reads; "
                                    f"its heads cannot be removed")
            drop = {r for h in range(unit.heads) if h not in keep for r in per_head[h]}
            if drop:
                rows = torch.tensor([r for r in range(w.shape[0]) if r not in drop], dtype=torch.long)
                plan.modules[path] = FoldedLayer(template, w.shape[1], len(rows), 1, w[rows].contiguous(),
                                                 None if b is None else b[rows].contiguous())
        template, w, b = _tensors(plan, unit.proj)
        if w.shape[1] != sum(len(c) for c in unit.cols):
            raise GranularError(f"export: {unit.proj} lost input columns that {unit.key} writes; "
                                f"its heads cannot be removed")
        cols = sorted((c, h) for h in keep for c in unit.cols[h])
        index = torch.tensor([c for c, _ in cols], dtype=torch.long)
        scale = torch.stack([g[h] for _, h in cols]).to(w.dtype)
        plan.modules[unit.proj] = FoldedLayer(template, len(cols), w.shape[0], 1,
                                              (w[:, index] * scale).contiguous(), b)
        for name, dim, units in unit.resizes:
            plan.resize[by_name[name]] = (dim, units * len(keep))
        if len(keep) < unit.heads:
            for name, key, dim in unit.masks:
                plan.head_masks[by_name[name]] = (key, dim, keep)


def build_resized(graph: fx.Graph, n: fx.Node, env: dict, plan) -> fx.Node:
    """A reshape/view that counts heads, with the kept heads' size."""
    args = fx.node.map_arg(n.args, lambda a: env[a])
    args = resized_args(n, args, *plan.resize[n])
    if n.op == "call_method":
        return graph.call_method(n.target, args, fx.node.map_arg(n.kwargs, lambda a: env[a]))
    return graph.call_function(n.target, args, fx.node.map_arg(n.kwargs, lambda a: env[a]))


def build_masked(graph: fx.Graph, n: fx.Node, env: dict, plan) -> fx.Node:
    """An attention node (or a score addition) with its per-head mask cut to the kept heads."""
    key, dim, keep = plan.head_masks[n]
    mask_node = n.kwargs[key] if isinstance(key, str) else n.args[key]
    index = (slice(None),) * dim + (list(keep),)
    cut = graph.call_function(operator.getitem, (env[mask_node], index))
    args = list(fx.node.map_arg(n.args, lambda a: env[a]))
    kwargs = dict(fx.node.map_arg(n.kwargs, lambda a: env[a]))
    if isinstance(key, str):
        kwargs[key] = cut
    else:
        args[key] = cut
    if n.op == "call_method":
        return graph.call_method(n.target, tuple(args), kwargs)
    return graph.call_function(n.target, tuple(args), kwargs)
