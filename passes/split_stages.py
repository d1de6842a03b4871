"""``split_stages``: split a (gated) graph by feature-map resolution into stage subgraphs.

Requires meta: ``tensor_meta`` (from ``trace``); uses ``granular.member`` when present.
Produces: ``granular.stage`` (an int) on every node, and a GraphModule whose submodules
``submod_0``, ``submod_1``, ... are the stages, called in order by its top-level graph
(``torch.fx.passes.split_module``). Composing the stages computes what the unsplit graph did.

Stage assignment (``docs/method.md``, Algorithm 2, step 1):

1. A node's *resolution stage* is the number of resolutions that conv layers produce which
   are larger than its output's spatial size (so a pad stays at its level); tensors without spatial dims (a classifier) take the last
   stage, and a node never comes before any of its inputs (so upsampling cannot go back).
2. An operation unit is atomic: every member takes the stage of the unit's last node. The
   ops of a reduction cell (whose first ReLU still runs at the higher resolution) thus start the
   next stage, where the paper puts them.
3. Parameters and other ``get_attr`` nodes go with their first user.

Before/after on a two-resolution model::

    x -> conv1 -> relu -> conv2(stride 2) -> fc          submod_0: conv1, relu
                                                        submod_1: conv2, fc
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.split_module import split_module

from granular.meta import MEMBER, OP_UNIT, tensor_shape
from granular.passes._graph import layer_view
from granular.passes._manager import run_passes
from granular.passes.skip_pruned_ops import share_graph

__all__ = ["STAGE", "AUX_HEAD", "assign_stages", "SplitStages", "split_stages", "count_resolutions",
           "stage_boundary", "stage_graph", "StageGraph"]

log = logging.getLogger(__name__)

STAGE = "granular.stage"
AUX_HEAD = "aux_head"  # the submodule name of the head in a stage graph


def _spatial(node: fx.Node) -> Optional[tuple[int, ...]]:
    shape = tensor_shape(node)
    if shape is None or len(shape) < 3:
        return None
    return tuple(shape[2:])


def _levels(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """The resolutions conv layers produce, largest first (pads and pools do not add one)."""
    sizes = set()
    for n in gm.graph.nodes:
        s = _spatial(n)
        if s is not None and len(s) == 2 and layer_view(gm, n) is not None:
            sizes.add(s)
    return sorted(sizes, key=lambda s: -s[0] * s[1])


def count_resolutions(gm: fx.GraphModule) -> int:
    """How many resolutions the graph's conv layers produce (1: nothing to split)."""
    return len(_levels(gm))


def assign_stages(gm: fx.GraphModule, max_stages: Optional[int] = None) -> dict[fx.Node, int]:
    """Write ``granular.stage`` on every node (see module docstring) and return the map.

    Args:
        gm: a traced graph with ``tensor_meta``.
        max_stages: merge the smallest resolutions into the last stage beyond this many.
    """
    levels = _levels(gm)
    last = len(levels) - 1 if max_stages is None else min(len(levels), max_stages) - 1
    last = max(last, 0)

    def rank(s: tuple[int, ...]) -> int:  # levels strictly larger than s (a pad stays at its level)
        return min(sum(1 for L in levels if L[0] * L[1] > s[0] * s[1]), last)

    stage: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            stage[n] = 0
            continue
        s = _spatial(n)
        own = rank(s) if s is not None and len(s) == 2 else (last if tensor_shape(n) is not None else 0)
        inputs = [stage[a] for a in n.all_input_nodes if a.op not in ("get_attr",)]
        stage[n] = max([own] + inputs) if n.op != "output" else last
    # Operation units are atomic: members take the stage of the unit's tail.
    tails = {n.meta[OP_UNIT].id: n for n in gm.graph.nodes if OP_UNIT in n.meta}
    for n in gm.graph.nodes:
        uid = n.meta.get(MEMBER)
        if uid in tails and n.op != "get_attr":
            stage[n] = max(stage[n], stage[tails[uid]])
    # Keep the order monotone after the moves, then place attributes with their first user.
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            stage[n] = max([stage[n]] + [stage[a] for a in n.all_input_nodes if a.op != "get_attr"])
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users:
            stage[n] = min(stage[u] for u in n.users)
    for n, s in stage.items():
        n.meta[STAGE] = s
    return stage


class SplitStages(PassBase):
    """Transform: one GraphModule per resolution stage, composed by a top-level graph."""

    def __init__(self, max_stages: Optional[int] = None):
        self.max_stages = max_stages

    def call(self, gm: fx.GraphModule) -> PassResult:
        stage = assign_stages(gm, self.max_stages)
        split = split_module(gm, gm, lambda n: stage[n], keep_original_node_name=True)
        log.info("split_stages: %d stages", len({s for s in stage.values()}))
        return PassResult(split, True)


def split_stages(gm: fx.GraphModule, max_stages: Optional[int] = None) -> fx.GraphModule:
    """Functional form of :class:`SplitStages`; returns the split GraphModule (``gm`` keeps
    its graph, with ``granular.stage`` meta added)."""
    return SplitStages(max_stages)(gm).graph_module


def stage_boundary(gm: fx.GraphModule, stage: int) -> fx.Node:
    """The feature map that ends ``stage``: the last node (in graph order) of the stage with a
    4-d output that a later stage reads. Its auxiliary head attaches there."""
    found = None
    for n in gm.graph.nodes:
        shape = tensor_shape(n)
        if (n.meta.get(STAGE) == stage and n.op not in ("get_attr", "placeholder") and shape is not None
                and len(shape) == 4 and any(u.meta.get(STAGE, stage) > stage for u in n.users)):
            found = n
    if found is None:
        raise ValueError(f"stage {stage} has no 4-d output that a later stage reads: run assign_stages first, "
                         f"and ask for a stage before the last")
    return found


class StageGraph(PassBase):
    """Transform (on a copy): stages ``0..stage`` ending in ``head`` (see :func:`stage_graph`)."""

    def __init__(self, stage: int, head: nn.Module):
        super().__init__()
        self.stage, self.head = stage, head

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(_stage_graph(gm, self.stage, self.head), True)


def stage_graph(gm: fx.GraphModule, stage: int, head: nn.Module) -> fx.GraphModule:
    """Stages ``0..stage`` of ``gm`` as one GraphModule that ends in ``head`` (submodule
    :data:`AUX_HEAD`) on :func:`stage_boundary`.

    The result shares every module and parameter with ``gm`` (training it trains ``gm``), but
    holds none of the later stages: moving it to a device moves only what it computes, which is
    where multi-stage search saves memory. Nodes that do not reach the boundary are dropped.
    """
    return run_passes(gm, [StageGraph(stage, head)])


def _stage_graph(gm: fx.GraphModule, stage: int, head: nn.Module) -> fx.GraphModule:
    end = stage_boundary(gm, stage)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        if n.op == "placeholder" or n.meta.get(STAGE, stage + 1) <= stage:
            env[n] = graph.node_copy(n, lambda a: env[a])
        if n is end:
            break
    out = graph.call_module(AUX_HEAD, (env[end],))
    graph.output(out)
    sub = share_graph(gm, graph, {AUX_HEAD: head}, class_name=f"Stage{stage}Graph")
    sub.graph.eliminate_dead_code()
    return sub
