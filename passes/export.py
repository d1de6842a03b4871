"""``export``: turn a gated graph into a compact, plain-PyTorch GraphModule.

Requires: a graph gated by ``insert_gates`` (``granular.gate`` meta). Reads the gates'
eval-mode values (the architecture committed at the last pruning round).

Steps, each exact in eval mode (``docs/design.md``, invariant 1):

1. **Remove pruned operations.** An α gate at zero makes its input of the sum zero: the
   input is dropped from the sum and the branch's nodes die with it.
2. **Find removable channels.** Channel classes come from ``analyze_channels`` on the live
   graph; per-position constants from ``channel_constants``. A class is removed when every
   conv/linear that reads it sees a constant there that it can absorb: zero, or any constant
   if the reader has no padding (then ``W[:, c].sum() * k`` moves into its bias). Every
   tensor keeps at least one channel.
3. **Fold.** Each layer absorbs the BatchNorm and gates that follow it (eval-mode affine
   maps), its weight mask, and the constants of removed input channels; a BatchNorm that
   follows no layer absorbs its gates. An α gate with nothing to fold into becomes a
   multiplication by a literal.
4. **Remove zero attention heads** (``export_heads.py``): their rows and columns leave the
   linears around the attention, reshapes that count heads are resized, and the head gates
   fold into the output projection.
5. **Rebuild** a new graph node by node with sliced modules at their original paths.

The plan (steps 1-4) is shared with :func:`granular.count_params`, which counts the folded
tensors without building the graph; the tests check the two agree.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.errors import GranularError
from granular.gates import GATE_ROOT, WeightMask
from granular.meta import GATE, HEADS, tensor_shape
from granular.passes._channels import (ChannelAnalysis, shape_args, analyze_channels, channel_constants,
                                       index_entry_for_dim)
from granular.passes._graph import Kind, LayerView, layer_view, module_of
from granular.passes._manager import run_passes
from granular.passes.export_heads import build_masked, build_resized, plan_heads

__all__ = ["ExportPlan", "FoldedLayer", "PlanCache", "plan_export", "build_export", "Export", "export_graph"]


@dataclass
class ExportPlan:
    """Everything export decides, before any graph is built.

    Attributes:
        alive: nodes that survive operation pruning.
        zero: nodes whose value is exactly zero (pruned α gates, sums of them).
        analysis: channel classes of the live graph.
        keep: kept channel positions per node with a channel axis.
        part_keep: the same per element, for nodes returning tuples (split, chunk).
        modules: new modules by qualified path: folded layers (as :class:`FoldedLayer`,
            built by :func:`build_export`), norms, and modules taken over unchanged.
        folded_into: chain nodes (norms, gates) folded into the node that now produces them.
        literals: α gates that become ``x * value``.
        layers: every conv/linear node that stays, sliced or kept whole.
        attrs: get_attr tensors carried over (user buffers/parameters).
        resize: reshapes that count attention heads -> (dim, new size).
        head_masks: attention nodes (or score additions) whose per-head mask is cut ->
            (argument index or keyword, mask dim, kept heads).
    """

    alive: set[fx.Node]
    zero: set[fx.Node]
    analysis: ChannelAnalysis
    keep: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    part_keep: dict[fx.Node, list] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    module_of_node: dict[fx.Node, str] = field(default_factory=dict)
    folded_into: dict[fx.Node, fx.Node] = field(default_factory=dict)
    literals: dict[fx.Node, float] = field(default_factory=dict)
    layers: dict[fx.Node, LayerView] = field(default_factory=dict)
    attrs: dict[str, torch.Tensor] = field(default_factory=dict)
    copied: set[str] = field(default_factory=set)   # modules taken over unchanged (deep-copied on build)
    resize: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)
    head_masks: dict[fx.Node, tuple[object, int, list[int]]] = field(default_factory=dict)

    def parameters(self):
        """The parameters the exported module will have."""
        seen = set()
        for m in self.modules.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p
        for t in self.attrs.values():
            if isinstance(t, nn.Parameter) and id(t) not in seen:
                seen.add(id(t))
                yield t


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def gate_value(gm: fx.GraphModule, node: fx.Node, modules: Optional[dict] = None) -> torch.Tensor:
    """Eval-mode value of an α or β gate node (scalar or per-channel)."""
    with torch.no_grad():
        return module_of(gm, node, modules).eval_value()


def _stored_mask(gm: fx.GraphModule, lv: LayerView, modules: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The stored ω mask of a gated layer, else None."""
    if lv.node.op == "call_function":
        wm_node = lv.node.args[1]
        if isinstance(wm_node, fx.Node) and wm_node.op == "call_module":
            m = module_of(gm, wm_node, modules)
            if isinstance(m, WeightMask):
                return m.mask
    return None


def effective_weight(gm: fx.GraphModule, lv: LayerView, modules: Optional[dict] = None) -> torch.Tensor:
    """The layer's weight with its eval-mode ω mask applied."""
    w = lv.module.weight.detach()
    mask = _stored_mask(gm, lv, modules)
    return w if mask is None else w * mask


def _zero_and_alive(gm: fx.GraphModule, cache: "PlanCache") -> tuple[set[fx.Node], set[fx.Node]]:
    """The nodes that are exactly zero (pruned α gates, sums of them) and the nodes the output
    still reads; the second is reused from ``cache`` while the first is the same."""
    kinds, modules = cache.kinds, cache.modules
    if cache.sum_order is None:  # α gates and sums, in graph order
        cache.sum_order = [n for n in gm.graph.nodes
                           if getattr(n.meta.get(GATE), "kind", None) == "op" or kinds.get(n) == Kind.ADD]
    zero: set[fx.Node] = set()
    for n in cache.sum_order:
        if kinds.get(n) == Kind.ADD:
            if all(a in zero for a in n.args):
                zero.add(n)
        elif float(gate_value(gm, n, modules)) == 0.0:
            zero.add(n)
    if cache.alive is not None and cache.alive[0] == zero:
        return zero, cache.alive[1]
    alive = _alive(gm, kinds, zero)
    cache.alive = (frozenset(zero), alive)
    return zero, alive


def _alive(gm: fx.GraphModule, kinds, zero: set[fx.Node]) -> set[fx.Node]:
    alive: set[fx.Node] = set()
    out = [n for n in gm.graph.nodes if n.op == "output"]
    stack = list(out)
    while stack:
        n = stack.pop()
        if n in alive:
            continue
        alive.add(n)
        ins = n.all_input_nodes
        if kinds.get(n) == Kind.ADD:
            ins = [a for a in n.args if isinstance(a, fx.Node) and a not in zero]
        for a in ins:
            if a in zero:
                raise GranularError(f"export: {n.format_node()} reads {a.name}, whose every operation is "
                                    f"pruned; keep one operation per sum (last-op protection)")
            stack.append(a)
    return alive


def _reads_as_data(gm, user: fx.Node, attr: fx.Node, modules) -> bool:
    """Whether ``user`` reads the tensor ``attr`` other than as its own weight or bias (which
    the planned layer carries): a layer fed a buffer as input, an add of a parameter, ..."""
    lv = layer_view(gm, user, modules)
    return lv is None or lv.x is attr


def _foldable(lv: LayerView) -> bool:
    if isinstance(lv.module, nn.Linear):
        return True
    return all(p == 0 for p in lv.module.padding) if isinstance(lv.module.padding, tuple) else lv.module.padding == 0


@dataclass
class PlanCache:
    """What :func:`plan_export` may reuse between calls on one graph while only its gates
    and masks change (the counts of one pruning round): the node kinds, the channel analysis
    while the set of pruned operations is the same, and the constants of per-channel nodes
    while their inputs are. Not valid across training steps (norm statistics move) or graph
    edits: make a new one."""

    modules: Optional[dict] = None
    kinds: Optional[dict] = None
    zero: Optional[frozenset] = None
    analysis: Optional[ChannelAnalysis] = None
    constants: dict = field(default_factory=dict)
    folds: Optional[dict] = None  # node -> (inputs, its stored ω mask, folded layer or norm): None = keep none
    sum_order: Optional[list] = None
    alive: Optional[tuple] = None


def plan_export(gm: fx.GraphModule, cache: Optional[PlanCache] = None) -> ExportPlan:
    """Decide what :func:`build_export` will build (see module docstring)."""
    if not gm.training:  # walking every submodule to set a mode costs time on large graphs
        return _plan(gm, cache or PlanCache())
    gm.eval()
    try:
        return _plan(gm, cache or PlanCache())
    finally:
        gm.train()


def _plan(gm: fx.GraphModule, cache: PlanCache) -> ExportPlan:
    from granular.passes._graph import node_kind
    if cache.modules is None:
        cache.modules = dict(gm.named_modules())
        cache.kinds = {n: node_kind(gm, n, cache.modules) for n in gm.graph.nodes}
    modules = cache.modules
    zero, alive = _zero_and_alive(gm, cache)
    if cache.analysis is None or cache.zero != frozenset(zero):
        cache.zero, cache.analysis = frozenset(zero), analyze_channels(gm, alive, modules, cache.kinds)
    analysis = cache.analysis
    kinds = analysis.kinds
    gv = {n: gate_value(gm, n, modules) for n in alive if kinds.get(n) in (Kind.GATE_OP, Kind.GATE_FILTER)}
    consts = channel_constants(gm, analysis, gate_value=lambda n: gv[n],
                               layer_weight=lambda lv: effective_weight(gm, lv, modules), modules=modules,
                               memo=cache.constants)
    plan = ExportPlan(alive=alive, zero=zero, analysis=analysis, layers=dict(analysis.layers))

    # Removable classes: every reader sees an absorbable constant.
    all_classes = {c for ids in analysis.slots.values() for c in ids}
    removable = all_classes - analysis.fixed
    for reader, x in analysis.readers:
        lv = analysis.layers[reader]
        fold_ok = _foldable(lv)
        for c, kp in zip(analysis.slots[x], consts[x].tolist()):
            if c in removable and (math.isnan(kp) or (kp != 0.0 and not fold_ok)):
                removable.discard(c)
    tensors = list(analysis.slots.values()) + [p[1] for parts in analysis.part_slots.values()
                                              for p in parts if p is not None]
    changed = True
    while changed:  # every tensor keeps at least one channel
        changed = False
        for ids in tensors:
            if ids and all(c in removable for c in ids):
                removable.discard(ids[0])
                changed = True

    memo: dict[tuple, torch.Tensor] = {}

    def kept(ids):  # many nodes carry the same classes (a layer's output, its norm, its gates)
        key = tuple(ids)
        if key not in memo:
            memo[key] = torch.tensor([p for p, c in enumerate(ids) if c not in removable], dtype=torch.long)
        return memo[key]

    for n, ids in analysis.slots.items():
        plan.keep[n] = kept(ids)
    for n, parts in analysis.part_slots.items():
        plan.part_keep[n] = [None if p is None else kept(p[1]) for p in parts]

    # Fold layers and norms with the gates that follow them.
    head_gates = []
    for n in gm.graph.nodes:
        if n not in alive:
            continue
        k = kinds.get(n)
        if n in analysis.layers and n not in plan.folded_into:
            _plan_layer(gm, plan, n, kinds, gv, consts, modules, cache.folds)
        elif layer_view(gm, n, modules) is not None and n not in analysis.layers:  # channels fixed
            _plan_fixed_layer(gm, plan, n, modules)
        elif k == Kind.BN and n not in plan.folded_into:
            _plan_norm(gm, plan, n, kinds, gv, modules, cache.folds)
        elif k == Kind.GATE_OP and n not in plan.folded_into:
            plan.literals[n] = float(gv[n])
        elif k == Kind.GATE_FILTER and HEADS in n.meta:
            head_gates.append(n)
        elif k == Kind.GATE_FILTER and n not in plan.folded_into:
            raise GranularError(f"export: filter gate {n.name} follows neither a layer nor a norm")
        elif n.op == "get_attr" and not str(n.target).startswith(GATE_ROOT):
            if any(u in alive and kinds.get(u) != Kind.GATE_WEIGHT and _reads_as_data(gm, u, n, modules)
                   for u in n.users):
                plan.attrs[str(n.target)] = _fetch_attr(gm, n.target)
        elif n.op == "call_module" and k not in (Kind.GATE_WEIGHT,) and n not in plan.folded_into:
            if str(n.target) not in plan.modules:  # copied when the module is built
                plan.modules[str(n.target)] = module_of(gm, n, modules)
                plan.copied.add(str(n.target))
                plan.module_of_node[n] = str(n.target)
    plan_heads(gm, plan, head_gates, gv)
    return plan


def _chain(n: fx.Node, kinds, alive, allow_bn: bool) -> list[fx.Node]:
    """The norm and gates that directly follow ``n`` and can be folded into it."""
    chain = []
    cur = n
    while True:
        users = [u for u in cur.users if u in alive]
        if len(users) != 1 or users[0].args[0] is not cur:
            break
        u = users[0]
        ku = kinds.get(u)
        if ku == Kind.BN and allow_bn and not chain:
            chain.append(u)
        elif ku in (Kind.GATE_FILTER, Kind.GATE_OP):
            chain.append(u)
        else:
            break
        cur = u
    return chain


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as ``scale * x + shift`` per channel (what folding absorbs)."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        s = s * bn.weight.detach()
    b = -bn.running_mean * s
    if bn.affine:
        b = b + bn.bias.detach()
    return s, b


def _key(*tensors) -> tuple:
    return tuple(t.detach().cpu().numpy().tobytes() for t in tensors)


def _reuse(folds: Optional[dict], n: fx.Node, key: tuple, mask: Optional[torch.Tensor]):
    """The layer or norm folded for ``n`` by an earlier count of the same graph, if every input
    of the fold is the same (its kept positions, gate values, constants and stored ω mask)."""
    if folds is None or n not in folds:
        return None
    old_key, old_mask, folded = folds[n]
    if old_key != key or (mask is not None and not torch.equal(old_mask, mask)):
        return None
    return folded


def _plan_layer(gm, plan: ExportPlan, n: fx.Node, kinds, gv, consts, modules, folds=None) -> None:
    lv = plan.layers[n]
    chain = _chain(n, kinds, plan.alive, allow_bn=True)
    for c in chain:
        plan.folded_into[c] = n
    plan.module_of_node[n] = lv.path
    mask = _stored_mask(gm, lv, modules)
    key = None
    if folds is not None:
        inputs = [plan.keep[n], plan.keep.get(lv.x), consts.get(lv.x)] + [gv[c] for c in chain if c in gv]
        key = (tuple(chain),) + _key(*(t for t in inputs if t is not None))
        hit = _reuse(folds, n, key, mask)
        if hit is not None:
            plan.modules[lv.path] = hit
            return
    plan.modules[lv.path] = folded = _fold_layer(gm, plan, n, lv, chain, kinds, gv, consts, modules)
    if folds is not None:
        folds[n] = (key, None if mask is None else mask.clone(), folded)


def _fold_layer(gm, plan: ExportPlan, n: fx.Node, lv: LayerView, chain, kinds, gv, consts, modules) -> "FoldedLayer":
    """The layer sliced to its kept channels, with its norm and gates folded in and the
    constants of its removed inputs folded into its bias."""
    m = lv.module
    w = effective_weight(gm, lv, modules)
    out_keep = plan.keep[n]
    c_out = w.shape[0]
    s = torch.ones(c_out)
    b = torch.zeros(c_out)
    has_bias = m.bias is not None
    bias = m.bias.detach().clone() if has_bias else torch.zeros(c_out)
    for c in chain:
        if kinds[c] == Kind.BN:
            bs, bb = bn_affine(module_of(gm, c, modules))
            s, b = s * bs, b * bs + bb
            has_bias = True
        else:
            g = gv[c].reshape(-1).expand(c_out) if gv[c].dim() else gv[c].expand(c_out)
            s, b = s * g, b * g
    if lv.kind == "dwconv":
        w_new = w[out_keep]
        in_keep = out_keep
    elif lv.kind == "gconv":  # classes are coupled across groups: the same local slots go
        groups, per_in = m.groups, w.shape[1]
        in_keep = plan.keep[lv.x]
        local = in_keep[in_keep < per_in]
        removed = torch.ones(per_in, dtype=torch.bool)
        removed[local] = False
        if removed.any():
            k = consts[lv.x].nan_to_num(0.0).view(groups, per_in)[torch.arange(c_out) // (c_out // groups)]
            wsum = w.reshape(c_out, per_in, -1).sum(-1)
            if (k[:, removed] != 0).any():
                bias = bias + (wsum[:, removed] * k[:, removed]).sum(1)
                has_bias = True
        w_new = w[:, local]
    else:
        in_keep = plan.keep[lv.x]
        removed = torch.ones(w.shape[1], dtype=torch.bool)
        removed[in_keep] = False
        if removed.any():
            k = consts[lv.x][removed].nan_to_num(0.0)
            if (k != 0).any():
                wsum = w[:, removed].reshape(c_out, int(removed.sum()), -1).sum(-1)
                bias = bias + (wsum * k).sum(1)
                has_bias = True
        w_new = w[:, in_keep]
    w_new = w_new[out_keep] if lv.kind != "dwconv" else w_new
    scale = s[out_keep].view((-1,) + (1,) * (w.dim() - 1))
    w_new = (w_new * scale).contiguous()
    b_new = (bias * s + b)[out_keep].contiguous()
    groups = len(out_keep) if lv.kind == "dwconv" else getattr(m, "groups", 1)
    return FoldedLayer(m, len(in_keep), len(out_keep), groups, w_new.to(m.weight.dtype),
                       b_new.to(m.weight.dtype) if has_bias else None)


@dataclass
class FoldedLayer:
    """A ``Linear`` or ``ConvNd`` like ``template``, resized and holding folded tensors.

    The plan keeps this record rather than a module: :func:`granular.count_params` only
    needs the tensors, and constructing some two thousand modules (each initialising
    weights only to have them replaced) was most of its time on large graphs.
    :func:`build_export` calls :meth:`build`.
    """

    template: nn.Module
    c_in: int
    c_out: int
    groups: int
    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    def parameters(self):
        yield self.weight
        if self.bias is not None:
            yield self.bias

    def build(self) -> nn.Module:
        m, has_bias = self.template, self.bias is not None
        if isinstance(m, nn.Linear):
            new = nn.Linear(self.c_in, self.c_out, bias=has_bias, device="meta")
        else:
            new = type(m)(self.c_in, self.c_out, m.kernel_size, stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=self.groups, bias=has_bias, device="meta")
        new.weight = nn.Parameter(self.weight)
        if has_bias:
            new.bias = nn.Parameter(self.bias)
        return new


def _plan_fixed_layer(gm, plan: ExportPlan, n: fx.Node, modules) -> None:
    """A layer kept whole: only its weight mask is applied."""
    lv = layer_view(gm, n, modules)
    new = copy.deepcopy(lv.module)
    with torch.no_grad():
        new.weight.copy_(effective_weight(gm, lv, modules))
    plan.modules[lv.path] = new
    plan.module_of_node[n] = lv.path
    plan.layers[n] = lv


def _plan_norm(gm, plan: ExportPlan, n: fx.Node, kinds, gv, modules, folds=None) -> None:
    bn = module_of(gm, n, modules)
    chain = _chain(n, kinds, plan.alive, allow_bn=False)
    keep = plan.keep[n]
    for u in chain:
        plan.folded_into[u] = n
    plan.module_of_node[n] = str(n.target)
    key = None
    if folds is not None:
        key = (tuple(chain),) + _key(keep, *(gv[u] for u in chain))
        hit = _reuse(folds, n, key, None)
        if hit is not None:
            plan.modules[str(n.target)] = hit
            return
    c = bn.num_features
    g = torch.ones(c)
    for u in chain:
        gu = gv[u]
        g = g * (gu.reshape(-1).expand(c) if gu.dim() else gu.expand(c))
    affine = bn.affine or bool(chain)
    new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=affine,
                   track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if affine:
            w = bn.weight.detach() if bn.affine else torch.ones(c)
            bias = bn.bias.detach() if bn.affine else torch.zeros(c)
            new.weight.copy_((w * g)[keep])
            new.bias.copy_((bias * g)[keep])
    plan.modules[str(n.target)] = new
    if folds is not None:
        folds[n] = (key, None, new)


def build_export(gm: fx.GraphModule, plan: ExportPlan) -> fx.GraphModule:
    """Build the compact GraphModule that ``plan`` describes."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kinds = plan.analysis.kinds
    root = nn.Module()
    for path, m in plan.modules.items():
        if isinstance(m, FoldedLayer):
            m = m.build()
        elif path in plan.copied:
            m = copy.deepcopy(m)
        _set_path(root, path, m)
    for target, t in plan.attrs.items():
        _set_attr(root, target, t)

    def arg(a):
        return fx.node.map_arg(a, lambda x: env[x])

    for n in gm.graph.nodes:
        if n not in plan.alive and n.op != "placeholder":  # the compact model takes the same inputs,
            continue                                       # even ones that pruning left unread
        if n in plan.folded_into:
            env[n] = env[plan.folded_into[n]]
            continue
        k = kinds.get(n)
        if n.op == "placeholder":
            env[n] = graph.node_copy(n)
        elif n.op == "output":
            graph.output(arg(n.args[0]))
        elif n in plan.resize:
            env[n] = build_resized(graph, n, env, plan)
        elif n in plan.head_masks:
            env[n] = build_masked(graph, n, env, plan)
        elif n in plan.layers:
            env[n] = graph.call_module(plan.module_of_node[n], (env[plan.layers[n].x],))
        elif k == Kind.BN:
            env[n] = graph.call_module(plan.module_of_node[n], (env[n.args[0]],))
        elif k == Kind.GATE_OP:
            env[n] = graph.call_function(operator.mul, (env[n.args[0]], plan.literals[n]))
        elif k == Kind.ADD:
            live = [a for a in n.args if isinstance(a, fx.Node) and a not in plan.zero]
            env[n] = env[live[0]] if len(live) == 1 else graph.node_copy(n, lambda x: env[x])
        elif n.op == "get_attr":
            if str(n.target) in plan.attrs:
                env[n] = graph.get_attr(n.target)
        elif k == Kind.GATE_WEIGHT:
            continue
        elif k == Kind.MOVE:
            env[n] = _rebuild_move(graph, n, env, plan)
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
        if n in env and env[n] is not None and env[n].op != "placeholder":
            env[n].meta["tensor_meta"] = n.meta.get("tensor_meta")
    compact = fx.GraphModule(root, graph, "CompactModel")
    if compact.graph.eliminate_dead_code():  # the constructor compiled the graph; only an edit needs a recompile
        compact.recompile()
    compact.eval()
    return compact


_SPLITS = {torch.split: 2, torch.chunk: 2, torch.tensor_split: 2, "split": 2, "chunk": 2, "tensor_split": 2}


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _rebuild_move(graph: fx.Graph, n: fx.Node, env, plan: ExportPlan) -> fx.Node:
    """Copy a data-movement node, rewriting the sizes and offsets along the channel axis
    that removed channels change (split sizes, slice bounds, reshape sizes)."""
    an = plan.analysis
    x = n.args[0] if n.args else None
    copy_node = lambda: graph.node_copy(n, lambda a: env[a])  # noqa: E731
    if not isinstance(x, fx.Node) or x not in an.slots or len(plan.keep[x]) == len(an.slots[x]):
        return copy_node()
    ax, keep, old = an.axis[x], plan.keep[x], len(an.slots[x])
    ndim = len(tensor_shape(x))

    def new_pos(i: int) -> int:  # kept positions before old position i
        i = i + old if i < 0 else min(i, old)
        return int((keep < i).sum())

    t = n.target
    if t in _SPLITS:
        dim = _arg(n, _SPLITS[t], "dim", 0) % ndim
        if dim != ax:
            return copy_node()
        sizes = [len(k) for k in plan.part_keep[n]]
        return graph.call_function(torch.split, (env[x], sizes, ax))
    if t is operator.getitem:
        items = list(n.args[1]) if isinstance(n.args[1], tuple) else [n.args[1]]
        pos, entry = index_entry_for_dim(n.args[1], ndim, ax)
        if pos is None:
            return copy_node()
        if isinstance(entry, slice):
            start = 0 if entry.start is None else entry.start
            stop = old if entry.stop is None else entry.stop
            items[pos] = slice(new_pos(start), new_pos(stop), None)
        else:
            items[pos] = new_pos(entry)
        index = tuple(items) if isinstance(n.args[1], tuple) else items[0]
        return graph.call_function(operator.getitem, (env[x], index))
    if t in (torch.narrow, "narrow") and _arg(n, 1, "dim") % ndim == ax:
        start, length = _arg(n, 2, "start"), _arg(n, 3, "length")
        s0 = new_pos(start)
        return graph.call_function(torch.narrow, (env[x], ax, s0, new_pos(start + length) - s0))
    if t in (torch.select, "select") and _arg(n, 1, "dim") % ndim == ax:
        return graph.call_function(torch.select, (env[x], ax, new_pos(_arg(n, 2, "index"))))
    if t in ("view", "reshape", "expand", torch.reshape) and n in an.axis:
        sizes = shape_args(n)
        oa = an.axis[n]
        if isinstance(sizes[oa], int) and sizes[oa] != -1:
            sizes[oa] = len(plan.keep[n])
        if t is torch.reshape:
            return graph.call_function(torch.reshape, (env[x], tuple(fx.node.map_arg(sizes, lambda a: env[a]))))
        return graph.call_method(t, (env[x], *fx.node.map_arg(sizes, lambda a: env[a])))
    return copy_node()


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The (created-as-needed) container that holds ``path``, and the last name in it."""
    parent = root
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    return parent, parts[-1]


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = _parent_of(root, path)
    parent.add_module(name, module)


def _set_attr(root: nn.Module, target: str, t: torch.Tensor) -> None:
    parent, name = _parent_of(root, target)
    if isinstance(t, nn.Parameter):
        parent.register_parameter(name, nn.Parameter(t.detach().clone()))
    else:
        parent.register_buffer(name, t.detach().clone())


class Export(PassBase):
    """Transform: gated GraphModule -> compact GraphModule (a new module; the input is kept)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(build_export(gm, plan_export(gm)), True)


def export_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`Export` (``granular.export`` calls it)."""
    return run_passes(gm, [Export()])
