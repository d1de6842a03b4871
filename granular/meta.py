"""Namespaced ``node.meta`` keys and the frozen records stored under them.

Analyses write these entries; transforms and the driver read them through the accessors
below, which fail with "run X first" when an analysis has not run (``docs/design.md``, "Conventions").

Keys:
    ``granular.layer``     :class:`LayerInfo` on every conv/linear node.
    ``granular.op_unit``   :class:`OpUnit` on the tail node of an operation branch.
    ``granular.member``    the id of the innermost op unit a node belongs to.
    ``granular.sum``       :class:`SumInfo` on the root node of a visible sum.
    ``granular.gate``      :class:`GateInfo` on every gate node inserted by ``insert_gates``.
    ``granular.heads``     :class:`HeadUnit` on each attention node whose heads are units
                           (``find_heads``), and on its head gate (``insert_gates``).

One key lives in the GraphModule's own ``meta``, not a node's:
    ``granular.gate_start`` ``"identity"`` or ``"half"``: how :func:`granular.prepare` started
                           the α/β gates (it also picks the search's default weight lr).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

__all__ = [
    "LAYER", "OP_UNIT", "MEMBER", "SUM", "GATE", "GATE_START", "HEADS",
    "LayerInfo", "OpUnit", "SumInfo", "GateInfo", "HeadUnit",
    "layer_info", "tensor_shape",
]

LAYER = "granular.layer"
OP_UNIT = "granular.op_unit"
MEMBER = "granular.member"
SUM = "granular.sum"
GATE = "granular.gate"
GATE_START = "granular.gate_start"
HEADS = "granular.heads"


@dataclass(frozen=True)
class LayerInfo:
    """A conv or linear layer seen by the analyses.

    Attributes:
        module: qualified name of the ``nn.Conv*d``/``nn.Linear`` module holding the weights.
        kind: ``"conv"``, ``"dwconv"`` (channels pass through: groups == in == out),
            ``"gconv"`` (other grouped conv: channels fixed) or ``"linear"``.
        scope: the threshold owner: the innermost op unit's id, or the layer's own id.
        filter_gate: whether the layer's output channels get a filter (β) gate.
        weight_mask: whether the layer's weight gets a weight (ω) mask.
    """

    module: str
    kind: str
    scope: str
    filter_gate: bool
    weight_mask: bool


@dataclass(frozen=True)
class OpUnit:
    """An operation unit: a branch that joins a visible sum.

    Attributes:
        id: stable key, used for parameter names (``granular_gates.op.<id>.alpha``).
        sum_node: name of the root sum node the branch feeds.
        nodes: names of the branch's nodes, from the fork (exclusive) to the tail.
        path: the module path the branch lives under (for reports), '' if none.
    """

    id: str
    sum_node: str
    nodes: tuple[str, ...]
    path: str


@dataclass(frozen=True)
class SumInfo:
    """A visible n-ary sum: a tree of binary adds, flattened.

    Attributes:
        inputs: names of the nodes summed (the leaves of the add tree).
        adds: names of the add nodes of the tree, root last.
    """

    inputs: tuple[str, ...]
    adds: tuple[str, ...]


@dataclass(frozen=True)
class GateInfo:
    """A gate node. ``kind`` is ``"op"`` (α), ``"filter"`` (β) or ``"weight"`` (ω); ``key``
    names its module under ``granular_gates.<kind>``; ``scope`` names its thresholds."""

    kind: str
    key: str
    scope: str


@dataclass(frozen=True)
class HeadUnit:
    """The heads of one attention node (``scaled_dot_product_attention``) as units.

    Attributes:
        key: the head gate's key (``granular_gates.filter.<key>``).
        scope: the threshold owner (the innermost op unit, else ``key``).
        heads: the number of heads.
        rows: per linear layer (module path) that produces q, k or v, its output rows of
            each head (all roles together).
        proj: the module path of the linear layer that reads the merged heads.
        cols: that layer's input columns of each head.
        resizes: (node name, argument dim, units per head) of every reshape between those
            layers whose size at that dim counts heads: it becomes units per head x kept heads.
        masks: (node name, argument index or keyword, dim) of every attention mask or bias
            that holds one slice per head: export cuts it to the kept heads.
    """

    key: str
    scope: str
    heads: int
    rows: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]
    proj: str
    cols: tuple[tuple[int, ...], ...]
    resizes: tuple[tuple[str, int, int], ...]
    masks: tuple[tuple[str, object, int], ...] = ()


def _get(node: fx.Node, key: str, producer: str):
    if key not in node.meta:
        raise RuntimeError(f"{node.format_node()}: no {key!r} meta; run {producer} first")
    return node.meta[key]


def layer_info(node: fx.Node) -> LayerInfo:
    """The :class:`LayerInfo` of a conv/linear node (written by ``find_units``)."""
    return _get(node, LAYER, "find_units")


def tensor_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    """The traced output shape of ``node`` (from ShapeProp), or None for non-tensors."""
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape)
