"""``retrain_graph``: the graph that retraining trains around a compact model.

Requires: a compact GraphModule (from ``export``). Produces: a new GraphModule that shares
every module of the compact one (training it trains the compact model, which stays plain and
is what gets saved) and adds

- drop-path (:class:`DropPath`, submodules ``drop_path.b<i>``) on every op branch that joins a
  sum: an input of an add that nothing else reads and that is not itself a sum (identity and
  residual inputs are read elsewhere too);
- with ``aux_head``, an auxiliary classifier (:func:`granular.heads.aux_head_for`) on the last
  feature map before the last resolution change (DARTS: 2/3 depth).

The graph returns ``(logits, aux_logits or None)``.

Before/after, one sum of two branches, with drop-path::

    y = add(conv(x), pool(x));                     return y
    y = add(drop_path_b0(conv(x)), drop_path_b1(pool(x)));  return (y, None)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.heads import aux_head_for
from granular.passes._graph import ADD_TARGETS
from granular.passes._manager import run_passes
from granular.passes.skip_pruned_ops import share_graph
from granular.passes.trace import propagate_shapes

__all__ = ["DropPath", "RetrainGraph", "retrain_graph", "op_branches"]


class DropPath(nn.Module):
    """Zero a whole sample's branch with probability ``p`` in training (scaled by 1/(1-p))."""

    def __init__(self):
        super().__init__()
        self.p = 0.0

    def forward(self, x):
        if not self.training or self.p <= 0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def _is_sum(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in ADD_TARGETS and len(n.args) == 2


def op_branches(graph: fx.Graph) -> list[tuple[fx.Node, int]]:
    """(add, argument index) of every op branch joining a sum (see the module docstring)."""
    out = []
    for n in graph.nodes:
        if not _is_sum(n):
            continue
        for i, a in enumerate(n.args):
            if isinstance(a, fx.Node) and len(a.users) == 1 and a.op != "placeholder" and not _is_sum(a):
                out.append((n, i))
    return out


def _aux_boundary(compact: fx.GraphModule, example: torch.Tensor) -> Optional[fx.Node]:
    """The last 4-d feature map before the last resolution change."""
    propagate_shapes(compact, (example,))
    maps = [n for n in compact.graph.nodes if n.op != "get_attr" and hasattr(n.meta.get("tensor_meta"), "shape")
            and len(n.meta["tensor_meta"].shape) == 4]
    sizes = [tuple(n.meta["tensor_meta"].shape[2:]) for n in maps]
    changes = [i for i in range(1, len(maps)) if sizes[i][0] < sizes[i - 1][0]]
    return maps[changes[-1] - 1] if changes else None


class RetrainGraph(PassBase):
    """Transform (on a copy): drop-path and an auxiliary head around a compact model.

    Args:
        example: an input batch (for the auxiliary head's input shape).
        num_classes: the auxiliary head's outputs.
        drop_path: add :class:`DropPath` on op branches (their ``p`` starts at 0).
        aux_head: add the auxiliary head.

    After a run, ``drops`` holds the :class:`DropPath` modules in graph order.
    """

    def __init__(self, example: torch.Tensor, num_classes: int, *, drop_path: bool, aux_head: bool):
        super().__init__()
        self.example, self.num_classes = example, num_classes
        self.drop_path, self.aux_head = drop_path, aux_head
        self.drops: list[DropPath] = []

    def call(self, compact: fx.GraphModule) -> PassResult:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(compact.graph, env)
        extra: dict[str, nn.Module] = {}
        self.drops = []
        if self.drop_path:
            root = nn.Module()
            for add, i in op_branches(graph):
                name = f"b{len(self.drops)}"
                self.drops.append(DropPath())
                root.add_module(name, self.drops[-1])
                with graph.inserting_before(add):
                    d = graph.call_module(f"drop_path.{name}", (add.args[i],))
                add.update_arg(i, d)
            extra["drop_path"] = root
        aux = None
        if self.aux_head:
            boundary = _aux_boundary(compact, self.example)
            if boundary is not None:
                c, h, w = boundary.meta["tensor_meta"].shape[1:]
                dense = sum(p.numel() for p in compact.parameters())
                extra["aux_head"] = aux_head_for(c, (h, w), self.num_classes, 1, dense, 0.1)
                aux = graph.call_module("aux_head", (env[boundary],))
        graph.output((out, aux))
        return PassResult(share_graph(compact, graph, extra, class_name="RetrainGraph"), True)


def retrain_graph(compact: fx.GraphModule, example: torch.Tensor, num_classes: int, *, drop_path: bool,
                  aux_head: bool) -> tuple[fx.GraphModule, list[DropPath]]:
    """Run :class:`RetrainGraph`; returns the training graph and its drop-path modules."""
    p = RetrainGraph(example, num_classes, drop_path=drop_path, aux_head=aux_head)
    return run_passes(compact, [p]), p.drops
