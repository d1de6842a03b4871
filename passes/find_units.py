"""``find_units``: an analysis pass that finds the searchable units of a traced graph.

Requires meta: ``tensor_meta`` (run ``granular.passes.trace`` first).
Produces meta:
    ``granular.sum``      on each root of a visible sum (a flattened tree of adds);
    ``granular.op_unit``  on the tail node of each operation unit;
    ``granular.member``   on each node of an operation unit (innermost unit's id);
    ``granular.layer``    on each conv/linear node: its kind, threshold scope, and whether
                          it gets a filter gate and a weight mask.

Operation units (MG-DARTS's α level) are the branches that join a sum: the nodes that feed
only that input of the sum, back to the fork (not the additions inside attention scores,
``q kᵀ + bias``: neither input is an operation). An input that is the fork itself (the identity
skip of a residual block) is never a unit. Before/after on a residual block::

    x -> conv1 -> bn1 -> relu -> conv2 -> bn2 ─┐
    x ─────────────────────────────────────────+-> out     unit: {conv1 .. bn2}, skip: none

Filter units are the output channels of conv/linear layers whose channels are not fixed by
the channel analysis (``granular.passes._channels``); weight units are the layer weights,
except the stem's and the head's (``GateConfig.mask_stem``, ``mask_head``). The head is a
layer whose output reaches the graph's output through no other conv/linear (the
classifier), not any layer with fixed channels: a transformer's qkv, projection and second
MLP layer have fixed channels and masked weights.
"""

from __future__ import annotations

import logging

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.config import GateConfig
from granular.meta import LAYER, MEMBER, OP_UNIT, SUM, LayerInfo, OpUnit, tensor_shape
from granular.passes._channels import analyze_channels
from granular.passes._manager import run_passes
from granular.passes._graph import Kind, find_sums, layer_view, node_kind, shared_layer_paths

__all__ = ["FindUnits", "find_units", "sanitize"]

log = logging.getLogger(__name__)


def sanitize(path: str) -> str:
    """A module path as a ModuleDict key: dots become underscores."""
    return path.replace(".", "_") or "root"


def _branch(leaf: fx.Node, tree: set[fx.Node]) -> set[fx.Node] | None:
    """Nodes that feed only ``leaf`` (and through it the sum), or None for an identity input."""
    if leaf.op in ("placeholder", "get_attr") or any(u not in tree for u in leaf.users):
        return None
    members = {leaf}
    stack = [leaf]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in members or a.op == "placeholder":
                continue
            if all(u in members for u in a.users):
                members.add(a)
                stack.append(a)
    if all(m.op == "get_attr" for m in members):
        return None
    if len(tree) == 1 and all(_is_identity(m) for m in members):
        return None  # the skip path of a residual add; in a mixed op (3+ inputs) it is a candidate op
    return members


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = node.graph.owning_module.get_submodule(node.target)
    return isinstance(m, (nn.Identity, nn.Dropout))


def _common_path(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def _module_paths(gm: fx.GraphModule, nodes: set[fx.Node]) -> list[str]:
    paths = []
    for n in nodes:
        if n.op == "call_module":
            paths.append(str(n.target))
        elif n.op == "get_attr":
            paths.append(str(n.target).rsplit(".", 1)[0])
    return paths


class FindUnits(PassBase):
    """Analysis: mark sums, operation units and gated layers in ``node.meta``."""

    mutates = False  # meta only: run_passes skips the recompile and lint

    def __init__(self, config: GateConfig | None = None):
        self.config = config or GateConfig()

    def requires(self, gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:  # ShapeProp leaves size computations (torch.Size) without meta
            if n.op == "call_module" and "tensor_meta" not in n.meta and n.users:
                raise RuntimeError(f"{n.format_node()}: no tensor_meta; run trace (ShapeProp) first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        for n in graph.nodes:
            for key in (SUM, OP_UNIT, MEMBER, LAYER):
                n.meta.pop(key, None)

        # 1. Sums and operation units.
        units: list[tuple[OpUnit, set[fx.Node]]] = []
        used_ids: set[str] = set()
        by_name = {n.name: n for n in graph.nodes}
        index = {n: i for i, n in enumerate(graph.nodes)}
        modules = dict(gm.named_modules())
        in_scores = _score_additions(gm, modules)
        for root, info in find_sums(gm).items():
            root.meta[SUM] = info
            tree = {by_name[a] for a in info.adds}
            if tree & in_scores:  # a bias or mask added to attention scores is no operation
                continue
            for leaf_name in info.inputs:
                leaf = by_name[leaf_name]
                members = _branch(leaf, tree) if self.config.op_gates else None
                if members is None:
                    continue
                path = _common_path(_module_paths(gm, members))
                uid = sanitize(path) if path else leaf.name
                base, k = uid, 1
                while uid in used_ids:
                    k += 1
                    uid = f"{base}_{k}"
                used_ids.add(uid)
                order = [n.name for n in sorted(members, key=index.__getitem__)]
                unit = OpUnit(id=uid, sum_node=root.name, nodes=tuple(order), path=path)
                leaf.meta[OP_UNIT] = unit
                units.append((unit, members))
        # Innermost unit wins: assign larger branches first, smaller ones overwrite.
        for unit, members in sorted(units, key=lambda um: -len(um[1])):
            for n in members:
                n.meta[MEMBER] = unit.id

        # 2. Layers: which get filter gates and weight masks, and whose thresholds they use.
        analysis = analyze_channels(gm, modules=modules)
        views = {n: layer_view(gm, n, modules) for n in graph.nodes}
        after_layer: dict[fx.Node, bool] = {}
        for n in graph.nodes:
            after_layer[n] = any(after_layer.get(a, False) or views[a] is not None
                                 for a in n.all_input_nodes)
        reaches_output: dict[fx.Node, bool] = {}  # its values, through no other conv/linear: the classifier
        for n in reversed(graph.nodes):
            reaches_output[n] = n.op == "output" or tensor_shape(n) is not None and any(
                reaches_output.get(u, False) and views[u] is None for u in n.users)
        n_layers = 0
        shared = shared_layer_paths(gm, modules)
        for n in graph.nodes:
            lv = views[n]
            if lv is None or lv.path in shared:  # weights used at several call sites stay whole
                continue
            n_layers += 1
            out_classes = set(analysis.slots.get(n, []))
            fixed_out = bool(out_classes) and out_classes <= analysis.fixed
            head = reaches_output[n]
            stem = not after_layer[lv.x] and lv.x.op == "placeholder" or not after_layer[lv.x]
            producer = node_kind(gm, n, modules) == Kind.LAYER and lv.kind in ("conv", "linear")
            filter_gate = (self.config.filter_gates and producer and not fixed_out and not head
                           and not _gate_would_precede_bn(gm, n, modules))
            weight_mask = (self.config.weight_masks and lv.kind in ("conv", "dwconv", "gconv", "linear")
                           and (self.config.mask_stem or not stem) and (self.config.mask_head or not head))
            scope = n.meta.get(MEMBER) or sanitize(lv.path)
            n.meta[LAYER] = LayerInfo(module=lv.path, kind=lv.kind, scope=scope,
                                      filter_gate=filter_gate, weight_mask=weight_mask)
        log.info("find_units: %d operation units, %d layers", len(units), n_layers)
        return PassResult(gm, False)


def _score_additions(gm: fx.GraphModule, modules: dict) -> set[fx.Node]:
    """The additions inside attention scores (``q kᵀ + bias``): their inputs are not
    operations, and the head units (``find_heads``) cut their per-head masks."""
    from granular.passes._attention import find_core
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        core = find_core(n, modules) if n.op in ("call_function", "call_method") else None
        if core is not None:
            out.update(node for node, _ in core.masks if node is not core.out)
    return out


def _gate_would_precede_bn(gm: fx.GraphModule, node: fx.Node, modules: dict) -> bool:
    """True when the layer's output reaches a BatchNorm only through other nodes (a concat,
    say): a filter gate there would sit before the norm, which cancels it in training mode."""
    users = list(node.users)
    if len(users) == 1 and node_kind(gm, users[0], modules) == Kind.BN:
        return False
    frontier, seen = list(users), set()
    while frontier:
        u = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        k = node_kind(gm, u, modules)
        if k == Kind.BN:
            return True
        if k in (Kind.MOVE, Kind.POINTWISE, Kind.PAD, Kind.SCALE):
            frontier.extend(u.users)
    return False


def find_units(gm: fx.GraphModule, config: GateConfig | None = None) -> fx.GraphModule:
    """Functional form of :class:`FindUnits`; returns ``gm`` (annotated in place)."""
    return run_passes(gm, [FindUnits(config)])
