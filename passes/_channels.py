"""Channel analysis on FX graphs: coupled channel classes and constant channels.

Every tensor with a channel axis gets that axis (dim 1 for NCHW, the last dim after a
linear on tokens or a permute to channels-last) and a list of *class ids*, one per
position. Positions that must be removed together share a class: the inputs of an add or
a product (squeeze-excite), a depthwise conv's input and output, a BatchNorm's input and
output, slot j of every group of a grouped conv. This is DepGraph's idea (Torch-Pruning) on
the FX graph, at the granularity of single channels.

Data movement (reshape, view, permute, transpose, flatten, cat, split, chunk, unbind,
slicing, ...) is not a table of special cases: the op is replayed on a *field of channel
ids* laid along its input's axis, and the output field shows where each channel went. A
concat's positions are its inputs' positions at their offsets; a split's pieces are slices
of its input's; ``flatten -> linear`` repeats a channel over a block of columns. When no
single output dim carries the ids (a reshape that splits channels into heads or groups, a
channel shuffle), the channels are fixed. Export rewrites the sizes that removal changes
(split sizes, slice bounds, reshape sizes): :func:`shape_args`, :func:`index_entry_for_dim`.

A class is *fixed* when a node that the table does not understand touches it (LayerNorm
and GroupNorm included: their statistics need every channel; so does a node that returns
a non-tensor, such as ``x.max(1)`` or a module returning a tuple), when one module is called
at several nodes, when it reaches the graph's inputs or outputs, or when a tensor's channel
count (``x.shape[1]``, ``x.size(-1)``, ``x.numel()``) is used as a value, asserted or
returned (removal would change it): fixed channels are never removed, never guessed.

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
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from granular.meta import HEADS, tensor_shape
from granular.passes._graph import (Kind, LayerView, evaluate_scalar, layer_view, module_of, node_kind,
                                    shared_layer_paths)

__all__ = ["ChannelAnalysis", "analyze_channels", "channel_constants", "index_entry_for_dim", "shape_args"]

_PASS_THROUGH = {Kind.DWCONV, Kind.BN, Kind.POINTWISE, Kind.POOL, Kind.PAD, Kind.SCALE,
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

    def roots(self) -> list[int]:
        """The class of every id, in one pass: ``union`` links the larger root to the
        smaller, so every parent precedes its child."""
        root = list(self.parent)
        for i, p in enumerate(root):
            root[i] = root[p]
        return root

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
        layers: the layer view of every reader and depthwise conv.
        axis: the channel dim of every node in ``slots`` (1, or the last dim after a linear
            on tokens or a permute to channels-last).
        raw: channel ids before the union (distinct per producer; used by the constants).
        parts: for nodes returning tuples (split, chunk, unbind), (axis, raw ids) per element,
            or None for an element whose channels are fixed; ``part_slots`` has the classes.
    """

    kinds: dict[fx.Node, str] = field(default_factory=dict)
    slots: dict[fx.Node, list[int]] = field(default_factory=dict)
    fixed: set[int] = field(default_factory=set)
    readers: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    layers: dict[fx.Node, LayerView] = field(default_factory=dict)
    axis: dict[fx.Node, int] = field(default_factory=dict)
    raw: dict[fx.Node, list[int]] = field(default_factory=dict)
    parts: dict[fx.Node, list] = field(default_factory=dict)
    part_slots: dict[fx.Node, list] = field(default_factory=dict)

    def classes_of(self, node: fx.Node) -> list[int]:
        return self.slots.get(node, [])


def _channel_dim_size(node: fx.Node) -> Optional[int]:
    shape = tensor_shape(node)
    if shape is None or len(shape) < 2:
        return None
    return shape[1]


def analyze_channels(gm: fx.GraphModule, alive: Optional[set[fx.Node]] = None,
                     modules: Optional[dict] = None, kinds: Optional[dict] = None) -> ChannelAnalysis:
    """Group channel positions into coupled classes (see module docstring).

    Args:
        gm: a traced graph with ``tensor_meta``.
        alive: if given, only these nodes are analysed; an add with one dead input passes
            the other through (this is how export sees pruned operations).
        modules: optional ``dict(gm.named_modules())`` cache.
        kinds: optional ``node_kind`` of every node (a cache; the analysis may still record a
            node as ``OTHER`` when it cannot follow it).
    """
    modules = modules if modules is not None else dict(gm.named_modules())
    uf = _UnionFind()
    res = ChannelAnalysis()
    raw: dict[fx.Node, list[int]] = {}
    axis = res.axis
    shared = shared_layer_paths(gm, modules)
    sizes: dict[fx.Node, object] = {}  # scalar node -> the tensors whose channel count it carries

    def fix(ids):
        for i in ids:
            res.fixed.add(i)

    def fix_inputs(node):
        for a in node.all_input_nodes:
            fix(raw.get(a, ()))
            for part in res.parts.get(a, ()):
                fix(part[1] if part else ())

    def fresh(node, size):  # new channels on dim 1, all fixed
        raw[node] = uf.new(size)
        axis[node] = 1
        fix(raw[node])

    for node in gm.graph.nodes:
        if alive is not None and node not in alive:
            continue
        kind = kinds[node] if kinds is not None else node_kind(gm, node, modules)
        res.kinds[node] = kind
        shape = tensor_shape(node)
        size = _channel_dim_size(node)
        first = node.args[0] if node.args else None
        if kind == Kind.NONTENSOR:
            taint = _scalar_taint(node, raw, axis, sizes)
            if taint is not None and node.target is not torch._assert:
                sizes[node] = taint
                continue
            # tensors turned into something we do not follow (the values of ``x.max(1)``,
            # ``sort``, ``topk``, ``item()``, a module returning a tuple): every channel
            # they read is fixed; so are those whose count an assert checks
            fix_inputs(node)
        for a in node.all_input_nodes:  # a channel count used as a value: export would change it
            for x in _taint_nodes(sizes.get(a)):
                fix(raw.get(x, ()))
        if kind == Kind.OUTPUT:
            fix_inputs(node)
            continue
        if kind in (Kind.ATTR, Kind.GATE_WEIGHT, Kind.NONTENSOR):
            continue
        if kind == Kind.INPUT:
            if size is not None:
                fresh(node, size)
            continue
        if kind == Kind.MOVE and _analyze_move(node, raw, res, uf, modules):
            continue
        if kind in (Kind.LAYER, Kind.GCONV, Kind.DWCONV) and layer_view(gm, node, modules).path in shared:
            kind = Kind.OTHER  # one module at several call sites: keep it whole
        if kind in (Kind.LAYER, Kind.GCONV):
            lv = layer_view(gm, node, modules)
            x = lv.x
            x_axis = len(tensor_shape(x) or ()) - 1 if lv.kind == "linear" else 1
            if x in raw and (axis[x] != x_axis or len(raw[x]) != lv.in_channels) and \
                    all(i in res.fixed for i in raw[x]) and \
                    len(tensor_shape(x)) > x_axis and tensor_shape(x)[x_axis] == lv.in_channels:
                # every channel of x is fixed anyway (an op we do not follow, a reshape into
                # windows): view them on the axis this layer reads, so that the layer itself
                # can still be pruned on its outputs
                raw[x], axis[x] = uf.new(lv.in_channels), x_axis
                fix(raw[x])
            if x in raw and axis[x] == x_axis and len(raw[x]) == lv.in_channels:
                res.layers[node] = lv
                res.readers.append((node, x))
                raw[node] = uf.new(lv.out_channels)
                axis[node] = len(shape) - 1 if lv.kind == "linear" else 1
                if kind == Kind.GCONV:
                    _couple_groups(uf, raw[x], lv.module.groups)
                    _couple_groups(uf, raw[node], lv.module.groups)
                continue
        if kind == Kind.DWCONV:
            res.layers[node] = layer_view(gm, node, modules)
        if kind in _PASS_THROUGH and isinstance(first, fx.Node) and first in raw and \
                _keeps_axis(node, kind, first, axis[first]):
            raw[node], axis[node] = raw[first], axis[first]
            continue
        if kind in (Kind.ADD, Kind.MUL):
            a, b = node.args[0], node.args[1]
            la, lb = raw.get(a), raw.get(b)
            if la is not None and lb is not None and len(la) == len(lb) and axis[a] == axis[b] and \
                    shape is not None and len(shape) > axis[a] and shape[axis[a]] == len(la):
                for i, j in zip(la, lb):
                    uf.union(i, j)
                raw[node], axis[node] = la, axis[a]
                continue
            if kind == Kind.ADD and alive is not None and (a not in alive) != (b not in alive):
                live = a if b not in alive else b  # the other input is a pruned operation
                if live in raw and tensor_shape(live) == shape:
                    raw[node], axis[node] = raw[live], axis[live]
                    continue
        # Not understood (or shapes disagree): never guess, fix everything it touches.
        # (an add keeps its kind: export still has to drop its pruned inputs)
        res.kinds[node] = kind if kind == Kind.ADD else Kind.OTHER
        fix_inputs(node)
        same = next((a for a in node.all_input_nodes if a in raw and tensor_shape(a) == shape), None)
        if same is not None:  # e.g. a norm: same shape, so the channels are where they were
            raw[node], axis[node] = uf.new(len(raw[same])), axis[same]
            fix(raw[node])
        elif size is not None:
            fresh(node, size)

    res.raw = raw
    root = uf.roots()
    res.fixed = {root[i] for i in res.fixed}
    res.slots = {n: [root[i] for i in ids] for n, ids in raw.items()}
    res.part_slots = {n: [None if p is None else (p[0], [root[i] for i in p[1]]) for p in parts]
                      for n, parts in res.parts.items()}
    return res


_SIZE_METHODS = ("size", "dim", "ndimension", "numel", "nelement")
_NO_TAINT: frozenset = frozenset()


def _scalar_taint(node: fx.Node, raw, axis, sizes) -> Optional[object]:
    """For a node computing a Python scalar or ``torch.Size``: the tensors whose channel count
    its value depends on (a frozenset, or one per element of a size), else None.

    ``x.size()``, ``x.shape``, ``x.size(d)`` and ``x.numel()`` carry ``x``'s channel count at
    its channel axis; arithmetic and indexing over such values carry it on. Anything else that
    returns a non-tensor (``x.max(1)``, ``x.item()``) is None: the caller fixes what it reads.
    """
    t = node.target
    x = node.args[0] if node.args else None
    if isinstance(x, fx.Node) and (node.op == "call_method" and t in _SIZE_METHODS or
                                   node.op == "call_function" and t is getattr):
        shape = tensor_shape(x)
        if node.op == "call_function" and node.args[1:2] not in (("shape",), ("ndim",), ("dtype",), ("device",)):
            return None
        if shape is None:  # a size of a size: what that one carries
            return _taint_nodes(sizes[x]) if x in sizes else None
        mine = frozenset((x,)) if x in raw else _NO_TAINT
        if t in ("dim", "ndimension") or node.args[1:2] in (("ndim",), ("dtype",), ("device",)):
            return _NO_TAINT
        if t in ("numel", "nelement"):
            return mine
        d = None if t is getattr else node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if d is None:
            return tuple(mine if x in raw and i == axis[x] else _NO_TAINT for i in range(len(shape)))
        if not isinstance(d, int):
            return mine
        return mine if x in raw and d % len(shape) == axis[x] else _NO_TAINT
    ins = node.all_input_nodes
    if not all(a in sizes for a in ins):
        return None
    if t is operator.getitem and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and \
            isinstance(sizes[node.args[0]], tuple) and isinstance(node.args[1], (int, slice)):
        return sizes[node.args[0]][node.args[1]]
    return frozenset(x for a in ins for x in _taint_nodes(sizes[a]))


def _taint_nodes(taint) -> frozenset:
    if taint is None:
        return _NO_TAINT
    if isinstance(taint, tuple):
        return frozenset(x for part in taint for x in part)
    return taint


def _couple_groups(uf: _UnionFind, ids: list[int], groups: int) -> None:
    """Position j of every group of a grouped conv is one class: removing it from every group
    keeps the groups equal, so the conv stays a grouped conv."""
    per = len(ids) // groups
    for g in range(1, groups):
        for j in range(per):
            uf.union(ids[j], ids[g * per + j])


def _keeps_axis(node: fx.Node, kind: str, src: fx.Node, ax: int) -> bool:
    """A per-channel op keeps its input's channel axis (same shape; norms, convs, pools and
    pads only along dim 1)."""
    if tensor_shape(node) is None or tensor_shape(src) is None:
        return False
    if kind == Kind.POOL and not _pool_is_batched(node, len(tensor_shape(src))):
        return False
    if kind in (Kind.BN, Kind.DWCONV, Kind.POOL, Kind.PAD):
        return ax == 1 and tensor_shape(node)[1] == tensor_shape(src)[1]
    return tensor_shape(node) == tensor_shape(src)


def _pool_is_batched(node: fx.Node, ndim: int) -> bool:
    """A k-d pool sees a (k+1)-dim tensor as one unbatched (C, ...) sample, so it pools over
    what we call the channel axis: only a (k+2)-dim input has its channels at dim 1."""
    if node.op == "call_module":
        name = type(node.graph.owning_module.get_submodule(node.target)).__name__
    else:
        name = getattr(node.target, "__name__", str(node.target))
    for k in (1, 2, 3):
        if f"{k}d" in name.lower():
            return ndim == k + 2
    return True


def _token_field(ax: int, ids: list[int], shape) -> torch.Tensor:
    """Channel ids + 1 laid along dim ``ax`` of a tensor of ``shape`` (0 means unknown)."""
    view = [1] * len(shape)
    view[ax] = -1
    return (torch.tensor(ids, dtype=torch.float64) + 1).view(view).expand(shape).contiguous()


def _field_axis(t: torch.Tensor) -> Optional[tuple[int, list[int]]]:
    """The dim along which a token field is constant over all other dims, with its ids."""
    if t.dim() < 2 or t.numel() == 0:
        return None
    whole = float(t.min()) == float(t.max())
    for d in range(1, t.dim()):
        f = t.movedim(d, 0).reshape(t.shape[d], -1)
        if (t.shape[d] > 1 or whole) and bool((f.min(1).values == f.max(1).values).all()):
            return d, [int(v) - 1 for v in f[:, 0].tolist()]
    return None


def _analyze_move(node: fx.Node, raw, res: ChannelAnalysis, uf: _UnionFind, modules) -> bool:
    """Data movement: run the op on fields of channel ids to see where each channel goes."""
    if not _move_is_channel_safe(node, raw, res):
        return False
    tracked = False

    def field(a: fx.Node):
        nonlocal tracked
        if a in raw:
            tracked = True
            return _token_field(res.axis[a], raw[a], tensor_shape(a))
        if a in res.parts:
            tracked = True
            return tuple(torch.zeros(sh, dtype=torch.float64) if p is None else
                         _token_field(*p, sh) for p, sh in zip(res.parts[a], _part_shapes(a)))
        shape = tensor_shape(a)
        if shape is not None:
            return torch.zeros(shape, dtype=torch.float64)
        return evaluate_scalar(a)

    try:
        args = fx.node.map_arg(node.args, field)
        kwargs = fx.node.map_arg(node.kwargs, field)
        if not tracked:
            return False
        with torch.no_grad():
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(torch.Tensor, node.target)(*args, **kwargs)
            else:
                out = modules[node.target](*args, **kwargs)
    except Exception:  # noqa: BLE001 - anything we cannot replay is simply not understood
        return False

    def place(t: torch.Tensor):
        found = _field_axis(t)
        if found is None:
            return None
        ax, ids = found
        unknown = [p for p, i in enumerate(ids) if i < 0]
        if unknown:
            new = uf.new(len(unknown))
            res.fixed.update(new)
            for p, i in zip(unknown, new):
                ids[p] = i
        return ax, ids

    if isinstance(out, torch.Tensor):
        placed = place(out)
        if placed is None or not _size_known_at(node, placed[0]):
            return False
        res.axis[node], raw[node] = placed
        return True
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        parts = [place(t) for t in out]
        for t, p in zip(out, parts):  # a part whose channels cannot be followed fixes them
            if p is None:
                res.fixed.update(int(v) - 1 for v in torch.unique(t).tolist() if v > 0)
        res.parts[node] = parts
        return True
    return False


_SHAPE_METHODS = ("view", "reshape", "expand")


def _move_is_channel_safe(node: fx.Node, raw, res: ChannelAnalysis) -> bool:
    """Whether export can replay this move on fewer channels: ops that wrap or mix positions
    along the channel axis (roll, channel shuffle, strided slices) are left alone (their
    channels get fixed); see also :func:`_size_known_at`."""
    x = node.args[0] if node.args else None
    ax = res.axis.get(x) if isinstance(x, fx.Node) and x in raw else None
    t = node.target
    if t in (torch.channel_shuffle,) or (node.op == "call_module" and "Shuffle" in type(t).__name__):
        return ax is None
    if t is torch.roll or t == "roll":
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return ax is None or not dims or ax not in [d % len(tensor_shape(x)) for d in dims]
    if t is operator.getitem and ax is not None:
        _, entry = index_entry_for_dim(node.args[1], len(tensor_shape(x)), ax)
        return not (isinstance(entry, slice) and entry.step not in (None, 1))
    return True


def _size_known_at(node: fx.Node, ax: int) -> bool:
    """A view/reshape/expand gives its channel dim a literal size (export rewrites it), not
    one computed at run time from some tensor's shape (which export cannot vouch for)."""
    if not (node.op == "call_method" and node.target in _SHAPE_METHODS or node.target is torch.reshape):
        return True
    sizes = shape_args(node)
    return ax < len(sizes) and not isinstance(sizes[ax], fx.Node)


def shape_args(node: fx.Node) -> list:
    """The size arguments of view/reshape/expand (varargs or one tuple)."""
    rest = list(node.args[1:]) if node.target is not torch.reshape else [node.args[1]]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return rest


def index_entry_for_dim(idx, ndim: int, dim: int) -> tuple[Optional[int], object]:
    """(position in the index, entry) of the index item (an int, slice, None or Ellipsis
    index) that addresses input ``dim``; ``(None, slice(None))`` when no item does."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = [i for i in items if i is not None and i is not Ellipsis]
    d = 0
    for pos, i in enumerate(items):
        if i is None:
            continue
        if i is Ellipsis:
            d += ndim - len(consumed)
            continue
        if d == dim:
            return pos, i
        d += 1
    return None, slice(None)


def _part_shapes(node: fx.Node) -> list[tuple]:
    meta = node.meta.get("tensor_meta")
    return [tuple(m.shape) for m in meta]


def channel_constants(gm: fx.GraphModule, analysis: ChannelAnalysis, *,
                      gate_value: Callable[[fx.Node], torch.Tensor],
                      layer_weight: Callable[[LayerView], torch.Tensor],
                      modules: Optional[dict] = None, memo: Optional[dict] = None) -> dict[fx.Node, torch.Tensor]:
    """Per-position constants (NaN where not provably constant), in eval mode.

    Args:
        gm: the graph analysed by :func:`analyze_channels`.
        analysis: its result.
        gate_value: the eval-mode value of a gate node (scalar for α, per channel for β).
        layer_weight: the effective (masked) weight of a depthwise layer.
        memo: results of evaluating per-channel nodes, keyed by the node, its input constants
            and its weight; reused by a caller that counts one graph repeatedly while only
            masks change (:class:`granular.passes.export.PlanCache`).
    """
    consts: dict[fx.Node, torch.Tensor] = {}
    part_consts: dict[fx.Node, list] = {}
    nans: dict[int, torch.Tensor] = {}
    for node, kind in analysis.kinds.items():
        if kind == Kind.MOVE and node in analysis.parts:
            cmap = _const_map(node, analysis, consts, part_consts)
            part_consts[node] = [None if p is None else _lookup(cmap, p[1]) for p in analysis.parts[node]]
            continue
        if node not in analysis.slots:
            continue
        size = len(analysis.slots[node])
        first = node.args[0] if node.args else None
        k_in = consts.get(first) if isinstance(first, fx.Node) else None
        if size not in nans:  # shared by every node of that size: constants are never written to
            nans[size] = torch.full((size,), math.nan)
        nan = nans[size]
        if kind in (Kind.GATE_OP, Kind.GATE_FILTER):
            g = gate_value(node).detach().float().reshape(-1)
            if HEADS in node.meta or g.numel() not in (1, size):  # a head gate: its heads are not this axis
                consts[node] = nan
                continue
            g = g.expand(size)
            k = k_in if k_in is not None else nan
            consts[node] = torch.where(g == 0, torch.zeros(()), k * g)
        elif kind in (Kind.ADD, Kind.MUL):
            # the live inputs (a pruned one is not in kinds); one we do not track (a parameter,
            # a pruned branch's only other input) makes the value unknown
            ks = [consts.get(a) for a in node.args if isinstance(a, fx.Node) and a in analysis.kinds]
            if not ks or any(k is None or len(k) != size for k in ks):  # an add we did not follow
                consts[node] = nan
            elif len(ks) == 1:
                consts[node] = ks[0]
            else:
                consts[node] = ks[0] + ks[1] if kind == Kind.ADD else ks[0] * ks[1]
        elif kind == Kind.MOVE:
            consts[node] = _lookup(_const_map(node, analysis, consts, part_consts), analysis.raw[node])
        elif kind in (Kind.DWCONV, Kind.BN, Kind.POINTWISE, Kind.POOL, Kind.PAD, Kind.SCALE):
            if k_in is None or torch.isnan(k_in).all():
                consts[node] = nan
                continue
            w = layer_weight(analysis.layers[node]) if kind == Kind.DWCONV else None
            key = None if memo is None else (node, _bytes(k_in), None if w is None else _bytes(w))
            if key is not None and key in memo:
                consts[node] = memo[key]
                continue
            consts[node] = _evaluate_on_constant(gm, node, kind, k_in, w, analysis)
            if key is not None:
                memo[key] = consts[node]
        else:
            consts[node] = nan
    return consts


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).numpy().tobytes()


def _const_map(node, analysis, consts, part_consts) -> dict[int, float]:
    """Channel id -> constant, over a data-movement node's inputs (NaN where two inputs carry
    the same id with different constants, e.g. ``cat([x, relu(x)])``)."""
    cmap: dict[int, float] = {}

    def add(ids, k):
        for i, v in zip(ids, k.tolist() if k is not None else [math.nan] * len(ids)):
            if i in cmap and not (cmap[i] == v or (math.isnan(cmap[i]) and math.isnan(v))):
                v = math.nan
            cmap[i] = v

    for a in node.all_input_nodes:
        if a in analysis.raw:
            add(analysis.raw[a], consts.get(a))
        elif a in analysis.parts:
            for p, k in zip(analysis.parts[a], part_consts.get(a, [])):
                if p is not None:
                    add(p[1], k)
    return cmap


def _lookup(cmap: dict[int, float], ids: list[int]) -> torch.Tensor:
    return torch.tensor([cmap.get(i, math.nan) for i in ids], dtype=torch.float32)


def _evaluate_on_constant(gm, node, kind, k, weight, analysis) -> torch.Tensor:
    """Run a per-channel node on a constant field and read back which channels stay constant
    (``weight``: the masked weight of a depthwise layer)."""
    src = node.args[0]
    src_shape = (1,) + tuple(tensor_shape(src)[1:])
    view = [1] * len(src_shape)
    view[analysis.axis[src]] = -1
    x = k.view(view).expand(src_shape).clone()  # a copy: in-place ops must not write into stored constants
    with torch.no_grad():
        if kind == Kind.DWCONV:
            lv = analysis.layers[node]
            m = lv.module
            y = F.conv2d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups) \
                if x.dim() == 4 else F.conv1d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif node.op == "call_module":
            m = module_of(gm, node)
            was = m.training
            m.eval()
            try:
                y = m(x)
            finally:
                m.train(was)
        else:
            try:
                args = [x] + [evaluate_scalar(a) for a in node.args[1:]]
                kwargs = {key: evaluate_scalar(v) for key, v in node.kwargs.items()}
                fn = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
                y = fn(*args, **kwargs)
            except (ValueError, TypeError, RuntimeError):
                return torch.full((len(k),), math.nan)
    flat = y.movedim(analysis.axis[node], 0).reshape(y.shape[analysis.axis[node]], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return torch.where((lo == hi) & torch.isfinite(lo), lo, torch.full_like(lo, math.nan))
