"""Node classification shared by the analyses and the export pass.

Every node of a (gated or ungated) graph gets a *kind* that says how it treats the channel
axis (dim 1). The table is deliberately closed: a node that is not recognised is ``OTHER``,
and the channel analysis then fixes every channel it touches (never guesses).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from granular.gates import FilterGate, OpGate, WeightMask
from granular.meta import LAYER, SumInfo, tensor_shape

__all__ = [
    "Kind", "node_kind", "LayerView", "layer_view", "find_sums", "module_of", "tensor_args",
    "is_add", "POINTWISE_MODULES", "POOL_MODULES", "evaluate_scalar", "shared_layer_paths",
]


class Kind:
    INPUT = "input"
    OUTPUT = "output"
    ATTR = "attr"
    LAYER = "layer"          # conv / linear (producers and readers of channels)
    DWCONV = "dwconv"        # depthwise conv: channels pass through
    BN = "bn"
    GATE_OP = "gate_op"
    GATE_FILTER = "gate_filter"
    GATE_WEIGHT = "gate_weight"
    POINTWISE = "pointwise"  # unary, per element
    POOL = "pool"            # per channel, spatial
    GCONV = "gconv"          # grouped conv: channels coupled across groups
    ADD = "add"
    MUL = "mul"              # tensor * tensor, per channel (broadcast allowed)
    SCALE = "scale"          # tensor * or / a Python number
    MOVE = "move"            # pure data movement: reshape, permute, cat, split, slicing, ...
    PAD = "pad"
    NONTENSOR = "nontensor"
    OTHER = "other"


POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                     nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Identity, nn.ELU, nn.Mish)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_POINTWISE_FUNCS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid,
                    F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.dropout, F.elu,
                    F.mish, torch.nn.functional.relu_}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clone", "float"}
_POOL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
               torch.max_pool2d, torch.avg_pool2d if hasattr(torch, "avg_pool2d") else F.avg_pool2d}
# Pure data movement: the output's elements are input elements (or fresh padding), so where
# every channel goes can be computed by running the op on a field of channel ids.
_SPLIT_FUNCS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "unbind", "tensor_split"}
_MOVE_FUNCS = {torch.permute, torch.transpose, torch.swapaxes, torch.reshape, torch.flatten, torch.cat,
               torch.concat, torch.stack, torch.squeeze, torch.unsqueeze, torch.narrow, torch.flip,
               torch.roll, torch.channel_shuffle, torch.movedim, torch.unflatten, torch.select} | _SPLIT_FUNCS
_MOVE_METHODS = {"permute", "transpose", "swapaxes", "view", "reshape", "flatten", "unflatten", "squeeze",
                 "unsqueeze", "narrow", "flip", "roll", "expand", "movedim", "select", "contiguous"} | _SPLIT_METHODS
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)
ADD_TARGETS = frozenset({operator.add, torch.add, operator.iadd})
"""Every target of a binary add: the one set sums, skips and fusions test against."""
_MUL_TARGETS = {operator.mul, torch.mul, operator.imul}
_DIV_TARGETS = {operator.truediv, torch.div}


def module_of(gm: fx.GraphModule, node: fx.Node, modules: Optional[dict] = None) -> Optional[nn.Module]:
    """The module a ``call_module`` node calls, else None (``modules``: a named_modules cache)."""
    if node.op != "call_module":
        return None
    return modules[node.target] if modules is not None else gm.get_submodule(node.target)


def _sub(gm, target, modules):
    return modules[target] if modules is not None else gm.get_submodule(target)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's direct inputs that are nodes producing tensors (in argument order)."""
    return [a for a in node.all_input_nodes if tensor_shape(a) is not None]


@dataclass(frozen=True)
class LayerView:
    """A conv or linear node, gated (functional) or not (``call_module``)."""

    node: fx.Node
    module: nn.Module
    path: str
    kind: str            # "conv" | "dwconv" | "gconv" | "linear"
    x: fx.Node           # the activation input

    @property
    def out_channels(self) -> int:
        return self.module.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if isinstance(self.module, nn.Linear):
            return self.module.in_features
        return self.module.in_channels


def _conv_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups == 1:
        return "conv"
    if m.groups == m.in_channels == m.out_channels:
        return "dwconv"
    return "gconv"


_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def layer_view(gm: fx.GraphModule, node: fx.Node, modules: Optional[dict] = None) -> Optional[LayerView]:
    """A :class:`LayerView` if ``node`` is a conv/linear layer, else None."""
    if node.op == "call_module":
        m = _sub(gm, node.target, modules)
        if isinstance(m, _LAYER_TYPES) and type(m) in _LAYER_TYPES and node.args:
            if not isinstance(m, nn.Linear) and m.padding_mode != "zeros":
                return None  # reflect/replicate/circular: the functional conv has zero padding only
            return LayerView(node, m, node.target, _conv_kind(m), node.args[0])
        return None
    info = node.meta.get(LAYER)
    if info is not None and node.op == "call_function":
        m = _sub(gm, info.module, modules)
        return LayerView(node, m, info.module, _conv_kind(m), node.args[0])
    return None


def is_add(node: fx.Node) -> bool:
    """A binary add of two tensors of the same shape (a candidate sum)."""
    if node.op == "call_function" and node.target in ADD_TARGETS:
        pass
    elif node.op == "call_method" and node.target in ("add", "add_", "__add__"):
        pass
    else:
        return False
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    sa, sb, so = tensor_shape(a), tensor_shape(b), tensor_shape(node)
    return sa is not None and sa == sb == so


def node_kind(gm: fx.GraphModule, node: fx.Node, modules: Optional[dict] = None) -> str:
    """Classify ``node`` by what it does to the channel axis (see :class:`Kind`).

    ``modules`` is an optional ``dict(gm.named_modules())`` cache for callers that classify
    every node."""
    if node.op == "placeholder":
        return Kind.INPUT
    if node.op == "output":
        return Kind.OUTPUT
    if node.op == "get_attr":
        return Kind.ATTR
    if node.op == "call_module":
        m = _sub(gm, node.target, modules)
        if isinstance(m, OpGate):
            return Kind.GATE_OP
        if isinstance(m, FilterGate):
            return Kind.GATE_FILTER
        if isinstance(m, WeightMask):
            return Kind.GATE_WEIGHT
    if node.op == "call_function" and node.target in _SPLIT_FUNCS or (
            node.op == "call_method" and node.target in _SPLIT_METHODS):
        return Kind.MOVE
    if node.op == "call_function" and node.target is operator.getitem and _static_index(node.args[1]) and \
            isinstance(node.args[0], fx.Node) and tensor_shape(node) is not None:
        return Kind.MOVE
    shape = tensor_shape(node)
    if shape is None:
        return Kind.NONTENSOR
    lv = layer_view(gm, node, modules)
    if lv is not None:
        if lv.kind == "dwconv":
            return Kind.DWCONV
        return Kind.LAYER if lv.kind in ("conv", "linear") else Kind.GCONV
    if node.op == "call_module":
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            return Kind.BN if len(shape) >= 2 else Kind.OTHER
        if type(m) in POINTWISE_MODULES:
            return Kind.POINTWISE
        if type(m) in POOL_MODULES:
            return Kind.POOL
        if type(m) in _MOVE_MODULES:
            return Kind.MOVE
        return Kind.OTHER
    if is_add(node):
        return Kind.ADD
    if node.op == "call_function":
        t = node.target
        if t in _POINTWISE_FUNCS:
            return Kind.POINTWISE
        if t in _POOL_FUNCS:
            return Kind.POOL
        if t in _MOVE_FUNCS or (t is operator.getitem and _static_index(node.args[1])):
            return Kind.MOVE
        if t is F.pad and _pads_spatial_only(node):
            return Kind.PAD
        if t in _MUL_TARGETS | _DIV_TARGETS:
            return _mul_kind(node, divide=t in _DIV_TARGETS)
        if t is torch.mean and _mean_spatial(node):
            return Kind.POOL
        return Kind.OTHER
    if node.op == "call_method":
        t = node.target
        if t in _POINTWISE_METHODS:
            return Kind.POINTWISE
        if t in _MOVE_METHODS:
            return Kind.MOVE
        if t in ("mul", "mul_"):
            return _mul_kind(node, divide=False)
        if t in ("div", "div_"):
            return _mul_kind(node, divide=True)
        if t == "mean" and _mean_spatial(node):
            return Kind.POOL
        return Kind.OTHER
    return Kind.OTHER


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _static_index(idx) -> bool:
    """An index made of ints, slices of ints, None and Ellipsis (no tensors): data movement."""
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if isinstance(i, slice):
            if not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
                return False
        elif not (i is None or i is Ellipsis or isinstance(i, int)):
            return False
    return True


def _pads_spatial_only(node: fx.Node) -> bool:
    pad = _arg(node, 1, "pad")
    shape = tensor_shape(node)
    mode = _arg(node, 2, "mode", "constant")
    if shape is None or not isinstance(pad, (tuple, list)) or mode != "constant":
        return False
    return len(pad) // 2 <= len(shape) - 2


def _mean_spatial(node: fx.Node) -> bool:
    dims = _arg(node, 1, "dim")
    shape = tensor_shape(node.args[0])
    if shape is None or dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return all(isinstance(d, int) and d % len(shape) >= 2 for d in dims)


def _mul_kind(node: fx.Node, *, divide: bool) -> str:
    if len(node.args) != 2:
        return Kind.OTHER
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return Kind.SCALE
    if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not divide:
        return Kind.SCALE
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and not divide:
        sa, sb, so = tensor_shape(a), tensor_shape(b), tensor_shape(node)
        if sa and sb and so and len(sa) == len(sb) == len(so) >= 2 and sa[1] == sb[1] == so[1]:
            return Kind.MUL
    return Kind.OTHER


def find_sums(gm: fx.GraphModule) -> dict[fx.Node, SumInfo]:
    """Flatten trees of binary adds into n-ary sums.

    An add whose only user is another add (consuming it once) is an inner node of that
    add's tree. The root's leaves are the summed inputs, in graph order.
    """
    adds = [n for n in gm.graph.nodes if is_add(n)]
    addset = set(adds)

    def inner(n: fx.Node) -> bool:
        users = list(n.users)
        return len(users) == 1 and users[0] in addset and list(users[0].args).count(n) == 1

    sums: dict[fx.Node, SumInfo] = {}
    for root in adds:
        if inner(root):
            continue
        leaves: list[fx.Node] = []
        tree: list[fx.Node] = []

        def walk(n: fx.Node):
            if n in addset and (n is root or inner(n)):
                for a in n.args:
                    walk(a)
                tree.append(n)
            else:
                leaves.append(n)

        walk(root)
        sums[root] = SumInfo(inputs=tuple(x.name for x in leaves), adds=tuple(x.name for x in tree))
    return sums


_SCALAR_OPS = {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
               operator.floordiv: operator.floordiv, operator.truediv: operator.truediv,
               operator.mod: operator.mod, operator.neg: operator.neg, operator.getitem: operator.getitem}


def evaluate_scalar(value):
    """The concrete value of a size computation in the graph, read from ``tensor_meta``.

    Shape arguments of reshapes and splits are often nodes (``x.size(0)``, ``x.shape[1] // 2``).
    This evaluates ``size``/``dim`` calls, ``.shape``, indexing and integer arithmetic over
    them; anything else raises ``ValueError`` (the caller then leaves the channels alone).
    """
    if isinstance(value, (tuple, list)):
        return type(value)(evaluate_scalar(v) for v in value)
    if isinstance(value, slice):
        return slice(evaluate_scalar(value.start), evaluate_scalar(value.stop), evaluate_scalar(value.step))
    if not isinstance(value, fx.Node):
        return value
    n = value
    if n.op == "call_method" and n.target in ("size", "dim"):
        shape = tensor_shape(n.args[0])
        if shape is None:
            raise ValueError(f"{n.name}: no shape")
        if n.target == "dim":
            return len(shape)
        d = evaluate_scalar(n.args[1]) if len(n.args) > 1 else n.kwargs.get("dim")
        return torch.Size(shape) if d is None else shape[d]
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        shape = tensor_shape(n.args[0])
        if shape is None:
            raise ValueError(f"{n.name}: no shape")
        return torch.Size(shape)
    if n.op == "call_function" and n.target in _SCALAR_OPS and not n.kwargs:
        if n.target is operator.getitem and tensor_shape(n.args[0]) is not None:
            raise ValueError(f"{n.name}: indexes a tensor")
        return _SCALAR_OPS[n.target](*(evaluate_scalar(a) for a in n.args))
    raise ValueError(f"{n.name}: not a size computation")


def shared_layer_paths(gm: fx.GraphModule, modules: Optional[dict] = None) -> set[str]:
    """Paths of conv/linear modules called at more than one node (weights shared between
    call sites): their channels are fixed and nothing is folded into them."""
    seen: dict[str, int] = {}
    for n in gm.graph.nodes:
        lv = layer_view(gm, n, modules)
        if lv is not None:
            seen[lv.path] = seen.get(lv.path, 0) + 1
    return {p for p, k in seen.items() if k > 1}
