"""``insert_gates``: a transform that adds the α, β and ω gates to an analysed graph.

Requires meta: ``granular.layer`` and ``granular.op_unit`` (run ``find_units`` first).
Produces: a ``granular_gates`` :class:`~granular.gates.GateBank` submodule holding every gate
and threshold parameter, gate nodes tagged with ``granular.gate`` meta, and a refreshed
``granular.sum`` on each sum root (whose inputs are now the α gates).

Before/after on one DARTS op (sep_conv's last conv; ``t_*`` are get_attr nodes)::

    conv = self.op.5(relu)               w = self.op.5.weight
    bn = self.op.6(conv)          ->     wm = self.granular_gates.weight.op_5(w, t_omega)
    add = add_0 + bn                     conv = torch.conv2d(relu, wm, None, ...)
                                         bn = self.op.6(conv)
                                         fg = self.granular_gates.filter.op_5(bn, t_beta)
                                         og = self.granular_gates.op.<unit>(fg, t_alpha)
                                         add = add_0 + og

An attention node whose heads are units (``granular.heads``, from ``find_heads``) gets a
filter gate with one channel per head on its output ``(B, H, N, D)``.

The filter gate follows the layer's BatchNorm when one follows directly (a gate before the
norm would be cancelled by it in training mode, ``docs/method.md``); the α gate follows the op's
last node. Gated convs become functional (``torch.conv2d``) so the mask is a visible node.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.gates import GATE_ROOT, FilterGate, GateBank, OpGate, Scope, WeightMask
from granular.meta import GATE, HEADS, LAYER, MEMBER, OP_UNIT, SUM, GateInfo, LayerInfo, layer_info
from granular.passes._manager import run_passes
from granular.passes._graph import Kind, find_sums, layer_view, node_kind
from granular.passes.find_units import sanitize

__all__ = ["InsertGates", "insert_gates"]

log = logging.getLogger(__name__)


def _insert_after(graph: fx.Graph, node: fx.Node, target: str, t_attr: str, meta_from: fx.Node,
                  info: GateInfo) -> fx.Node:
    """Insert ``target(node, t)`` after ``node`` and route every other user of ``node`` to it."""
    with graph.inserting_after(node):
        t = graph.get_attr(t_attr)
    with graph.inserting_after(t):
        gate = graph.call_module(target, (node, t))
    node.replace_all_uses_with(gate, delete_user_cb=lambda u: u is not gate)
    gate.meta["tensor_meta"] = meta_from.meta.get("tensor_meta")
    gate.meta[GATE] = info
    if MEMBER in node.meta:
        gate.meta[MEMBER] = node.meta[MEMBER]
        t.meta[MEMBER] = node.meta[MEMBER]
    return gate


class InsertGates(PassBase):
    """Transform: add gate modules, threshold parameters and gate nodes."""

    def requires(self, gm: fx.GraphModule) -> None:
        if hasattr(gm, GATE_ROOT):
            raise RuntimeError(f"{type(gm).__name__} already has gates ({GATE_ROOT}); insert them once")
        if not any(LAYER in n.meta or OP_UNIT in n.meta for n in gm.graph.nodes):
            if any(layer_view(gm, n) is not None for n in gm.graph.nodes):
                raise RuntimeError("no granular.layer meta; run find_units first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        bank = GateBank()
        gm.add_submodule(GATE_ROOT, bank)

        layers = [(n, layer_info(n)) for n in graph.nodes if LAYER in n.meta]
        units = [(n, n.meta[OP_UNIT]) for n in graph.nodes if OP_UNIT in n.meta]
        attention = [(n, n.meta[HEADS]) for n in graph.nodes if HEADS in n.meta]

        # Scopes own the thresholds: one per op unit, one per gated layer outside any unit.
        needs: dict[str, dict[str, bool]] = {}
        for _, unit in units:
            needs.setdefault(unit.id, {"op": False, "filters": False, "weights": False})["op"] = True
        for _, info in layers:
            if info.filter_gate or info.weight_mask:
                d = needs.setdefault(info.scope, {"op": False, "filters": False, "weights": False})
                d["filters"] |= info.filter_gate
                d["weights"] |= info.weight_mask
        for _, head in attention:
            needs.setdefault(head.scope, {"op": False, "filters": False, "weights": False})["filters"] = True
        for sid, d in needs.items():
            bank.scopes[sid] = Scope(**d)

        # α gates first, so that a β gate after the same node lands between it and the α gate.
        for tail, unit in units:
            bank.op[unit.id] = OpGate()
            _insert_after(graph, tail, f"{GATE_ROOT}.op.{unit.id}", f"{GATE_ROOT}.scopes.{unit.id}.t_alpha",
                          tail, GateInfo("op", unit.id, unit.id))

        for node, head in attention:  # before the layers' gates: a head key never names a layer
            bank.filter[head.key] = FilterGate(head.heads)
            gate = _insert_after(graph, node, f"{GATE_ROOT}.filter.{head.key}",
                                 f"{GATE_ROOT}.scopes.{head.scope}.t_beta", node, GateInfo("filter", head.key, head.scope))
            gate.meta[HEADS] = head

        modules = dict(gm.named_modules())  # after the α and head gates: a layer's user may be one
        for node, info in layers:
            key = sanitize(info.module)
            lv = layer_view(gm, node, modules)
            if info.filter_gate:
                users = list(node.users)
                where = users[0] if len(users) == 1 and node_kind(gm, users[0], modules) == Kind.BN else node
                out_shape = node.meta["tensor_meta"].shape
                bank.filter[key] = FilterGate(lv.out_channels, channels_last=lv.kind == "linear" and len(out_shape) > 2)
                _insert_after(graph, where, f"{GATE_ROOT}.filter.{key}", f"{GATE_ROOT}.scopes.{info.scope}.t_beta",
                              where, GateInfo("filter", key, info.scope))
            if info.weight_mask:
                bank.weight[key] = WeightMask(lv.module.weight.shape)
                self._mask_weight(gm, node, lv, key, info)

        for root, sinfo in find_sums(gm).items():
            root.meta[SUM] = sinfo
        log.info("insert_gates: %d op, %d filter (%d head), %d weight gates", len(bank.op), len(bank.filter),
                 len(attention), len(bank.weight))
        return PassResult(gm, True)

    @staticmethod
    def _mask_weight(gm: fx.GraphModule, node: fx.Node, lv, key: str, info: LayerInfo) -> None:
        """Rewrite ``call_module(conv)(x)`` as ``conv2d(x, weight_mask(conv.weight, t_ω), conv.bias, ...)``."""
        graph = gm.graph
        m = lv.module
        with graph.inserting_before(node):
            w = graph.get_attr(f"{lv.path}.weight")
            t = graph.get_attr(f"{GATE_ROOT}.scopes.{info.scope}.t_omega")
            wm = graph.call_module(f"{GATE_ROOT}.weight.{key}", (w, t))
            b = graph.get_attr(f"{lv.path}.bias") if m.bias is not None else None
            if isinstance(m, nn.Linear):
                new = graph.call_function(F.linear, (lv.x, wm, b))
            else:
                conv = {1: torch.conv1d, 2: torch.conv2d}[m.weight.dim() - 2]
                new = graph.call_function(conv, (lv.x, wm, b, m.stride, m.padding, m.dilation, m.groups))
        wm.meta[GATE] = GateInfo("weight", key, info.scope)
        for k, v in node.meta.items():
            new.meta[k] = v
        for n in (w, t, wm):
            if MEMBER in node.meta:
                n.meta[MEMBER] = node.meta[MEMBER]
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def insert_gates(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`InsertGates`; returns ``gm`` (rewritten in place)."""
    return run_passes(gm, [InsertGates()])
