"""Channel analysis on FX graphs: coupled channel classes and constant channels.

Every tensor with a channel axis (dim 1) gets a list of *class ids*, one per position.
Positions that must be removed together share a class: the inputs of an add, a depthwise
conv's input and output, a norm's input and output. A concat's positions are its inputs'
positions, in order, and a flatten repeats each channel's class over its spatial extent
(so ``flatten -> linear`` maps channel c to a block of columns). This is DepGraph's idea
(Torch-Pruning) on the FX graph, at the granularity of single channels.

A class is *fixed* when a node that the table does not understand touches it, or when it
reaches the graph's inputs or outputs: fixed channels are never removed.

The constant analysis (:func:`channel_constants`) finds, for each position, whether its
value is the same for every input and every pixel (a gate at zero, a BN shift after it, a
ReLU of that, ...). Per-channel ops are evaluated on a constant field of the traced shape,
so padding effects are caught: a padded depthwise conv of a non-zero constant is not
constant at the borders and is reported as unknown (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from granular.meta import tensor_shape
from granular.passes._graph import Kind, LayerView, layer_view, module_of, node_kind

__all__ = ["ChannelAnalysis", "analyze_channels", "channel_constants"]

_PASS_THROUGH = {Kind.DWCONV, Kind.BN, Kind.POINTWISE, Kind.POOL, Kind.PAD, Kind.SLICE, Kind.SCALE,
                 Kind.GATE_OP, Kind.GATE_FILTER}


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels`.

    Attributes:
        kinds: the :class:`Kind` of every analysed node.
        slots: class id per channel position, for every node with a channel axis.
        fixed: class ids that must never be removed.
        readers: (layer node, input node) for every conv/linear that mixes channels.
    """

    kinds: dict[fx.Node, str] = field(default_factory=dict)
    slots: dict[fx.Node, list[int]] = field(default_factory=dict)
    fixed: set[int] = field(default_factory=set)
    readers: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    layers: dict[fx.Node, LayerView] = field(default_factory=dict)

    def classes_of(self, node: fx.Node) -> list[int]:
        return self.slots.get(node, [])


def _channel_dim_size(node: fx.Node) -> Optional[int]:
    shape = tensor_shape(node)
    if shape is None or len(shape) < 2:
        return None
    return shape[1]


def analyze_channels(gm: fx.GraphModule, alive: Optional[set[fx.Node]] = None,
                     modules: Optional[dict] = None) -> ChannelAnalysis:
    """Group channel positions into coupled classes (see module docstring).

    Args:
        gm: a traced graph with ``tensor_meta``.
        alive: if given, only these nodes are analysed; an add with one dead input passes
            the other through (this is how export sees pruned operations).
        modules: optional ``dict(gm.named_modules())`` cache.
    """
    modules = modules if modules is not None else dict(gm.named_modules())
    uf = _UnionFind()
    res = ChannelAnalysis()
    raw: dict[fx.Node, list[int]] = {}

    def fix(ids):
        for i in ids:
            res.fixed.add(i)

    for node in gm.graph.nodes:
        if alive is not None and node not in alive:
            continue
        kind = node_kind(gm, node, modules)
        res.kinds[node] = kind
        ins = [a for a in node.all_input_nodes if a in raw]
        size = _channel_dim_size(node)
        if kind == Kind.OUTPUT:
            for a in ins:
                fix(raw[a])
            continue
        if kind in (Kind.ATTR, Kind.NONTENSOR, Kind.GATE_WEIGHT):
            continue
        if kind == Kind.INPUT:
            if size is not None:
                raw[node] = uf.new(size)
                fix(raw[node])
            continue
        if kind == Kind.LAYER:
            lv = layer_view(gm, node, modules)
            x = lv.x
            if lv.kind == "linear" and len(tensor_shape(x) or ()) != 2:
                kind = res.kinds[node] = Kind.OTHER
            else:
                res.layers[node] = lv
                if x in raw:
                    res.readers.append((node, x))
                raw[node] = uf.new(size)
                continue
        if kind == Kind.DWCONV:
            res.layers[node] = layer_view(gm, node, modules)
        first = node.args[0] if node.args else None
        if kind in _PASS_THROUGH and isinstance(first, fx.Node) and first in raw and len(raw[first]) == size:
            raw[node] = raw[first]
            continue
        if kind in (Kind.ADD, Kind.MUL):
            a, b = node.args[0], node.args[1]
            la, lb = raw.get(a), raw.get(b)
            if la is not None and lb is not None and len(la) == len(lb) == size:
                for i, j in zip(la, lb):
                    uf.union(i, j)
                raw[node] = la
                continue
            if kind == Kind.ADD and alive is not None and (la is None) != (lb is None):
                live = la if la is not None else lb
                if live is not None and len(live) == size:
                    raw[node] = live
                    continue
        if kind == Kind.CAT:
            parts = node.args[0]
            if all(isinstance(p, fx.Node) and p in raw for p in parts):
                out = [i for p in parts for i in raw[p]]
                if len(out) == size:
                    raw[node] = out
                    continue
        if kind == Kind.FLATTEN and isinstance(first, fx.Node) and first in raw:
            src = tensor_shape(first)
            per = math.prod(src[2:]) if len(src) > 2 else 1
            out = [i for i in raw[first] for _ in range(per)]
            if len(out) == size:
                raw[node] = out
                continue
        # Not understood (or shapes disagree): never guess, fix everything it touches.
        # (an add keeps its kind: export still has to drop its pruned inputs)
        res.kinds[node] = kind if kind == Kind.ADD else Kind.OTHER
        for a in ins:
            fix(raw[a])
        if size is not None:
            raw[node] = uf.new(size)
            fix(raw[node])

    res.fixed = {uf.find(i) for i in res.fixed}
    res.slots = {n: [uf.find(i) for i in ids] for n, ids in raw.items()}
    return res


def channel_constants(gm: fx.GraphModule, analysis: ChannelAnalysis, *,
                      gate_value: Callable[[fx.Node], torch.Tensor],
                      layer_weight: Callable[[LayerView], torch.Tensor],
                      modules: Optional[dict] = None) -> dict[fx.Node, torch.Tensor]:
    """Per-position constants (NaN where not provably constant), in eval mode.

    Args:
        gm: the graph analysed by :func:`analyze_channels`.
        analysis: its result.
        gate_value: the eval-mode value of a gate node (scalar for α, per channel for β).
        layer_weight: the effective (masked) weight of a depthwise layer.
    """
    consts: dict[fx.Node, torch.Tensor] = {}
    for node, kind in analysis.kinds.items():
        if node not in analysis.slots:
            continue
        size = len(analysis.slots[node])
        first = node.args[0] if node.args else None
        k_in = consts.get(first) if isinstance(first, fx.Node) else None
        nan = torch.full((size,), math.nan)
        if kind in (Kind.GATE_OP, Kind.GATE_FILTER):
            g = gate_value(node).detach().float().reshape(-1).expand(size)
            k = k_in if k_in is not None else nan
            consts[node] = torch.where(g == 0, torch.zeros(()), k * g)
        elif kind in (Kind.ADD, Kind.MUL):
            ks = [consts.get(a) for a in node.args if isinstance(a, fx.Node) and a in analysis.slots]
            if len(ks) == 1:
                consts[node] = ks[0] if ks[0] is not None else nan
            elif any(k is None for k in ks):
                consts[node] = nan
            else:
                consts[node] = ks[0] + ks[1] if kind == Kind.ADD else ks[0] * ks[1]
        elif kind == Kind.CAT:
            consts[node] = torch.cat([consts.get(p, torch.full((len(analysis.slots[p]),), math.nan))
                                      for p in node.args[0]])
        elif kind == Kind.FLATTEN:
            per = size // len(analysis.slots[first])
            consts[node] = (k_in if k_in is not None else nan).repeat_interleave(per)
        elif kind in (Kind.DWCONV, Kind.BN, Kind.POINTWISE, Kind.POOL, Kind.PAD, Kind.SLICE, Kind.SCALE):
            if k_in is None or torch.isnan(k_in).all():
                consts[node] = nan
            else:
                consts[node] = _evaluate_on_constant(gm, node, kind, k_in, layer_weight, analysis)
        else:
            consts[node] = nan
    return consts


def _evaluate_on_constant(gm, node, kind, k, layer_weight, analysis) -> torch.Tensor:
    """Run a per-channel node on a constant field and read back which channels stay constant."""
    src_shape = tensor_shape(node.args[0])
    x = k.view((1, -1) + (1,) * (len(src_shape) - 2)).expand((1,) + tuple(src_shape[1:])).contiguous()
    with torch.no_grad():
        if kind == Kind.DWCONV:
            lv = analysis.layers[node]
            m = lv.module
            y = F.conv2d(x, layer_weight(lv), m.bias, m.stride, m.padding, m.dilation, m.groups) \
                if x.dim() == 4 else F.conv1d(x, layer_weight(lv), m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif node.op == "call_module":
            m = module_of(gm, node)
            was = m.training
            m.eval()
            try:
                y = m(x)
            finally:
                m.train(was)
        else:
            args = [x] + list(node.args[1:])
            fn = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
            y = fn(*args, **node.kwargs)
    flat = y.reshape(y.shape[0], y.shape[1], -1)[0]
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return torch.where((lo == hi) & torch.isfinite(lo), lo, torch.full_like(lo, math.nan))
