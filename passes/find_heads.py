"""``find_heads``: an analysis pass that finds the heads of attention layers as units.

Requires meta: ``tensor_meta`` and ``granular.member`` (run ``trace`` and ``find_units``).
Produces meta: ``granular.heads`` (:class:`~granular.meta.HeadUnit`) on each
``scaled_dot_product_attention`` node whose heads can be removed exactly; ``insert_gates``
then gives it one filter-level gate per head.

The pattern, as timm's ``Attention`` and ``WindowAttention`` write it (ViT, DeiT, Swin, ...)::

    qkv = linear(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)   # head h: 3 x D rows
    q, k, v = qkv.unbind(0); q, k = q_norm(q), k_norm(k)
    o = scaled_dot_product_attention(q, k, v, attn_mask=bias)        # (B, H, N, D)
    y = proj(o.transpose(1, 2).reshape(B, N, H * D))                 # head h: D columns

Removing head h removes its q/k/v rows from the linears that produce them, its columns from
``proj``, its slice of a per-head attention mask, and one head from every reshape that
counts heads (``H -> H'``, ``H * D -> H' * D``, written as literals). Between those linears
and the attention, and from it to ``proj``, the paths may hold only data movement
(reshape, view, permute, transpose, unbind, split, indexing, flatten, (un)squeeze), identity and dropout
modules, norms over the last dim (``q_norm``: per head), and scaling by a number, and every
node on them must be read only by the pattern; anything else leaves the heads whole.

How it knows: each path is replayed on a field of row ids (as the channel analysis replays
moves on channel ids), which shows the rows of every head at the attention's inputs and
the columns of every head at ``proj``. The rewrite is then proved on the fields, not
assumed: replayed with the first or the last head removed and the reshapes resized, the
fields must equal the originals without that head.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.config import GateConfig
from granular.meta import HEADS, MEMBER, HeadUnit, tensor_shape
from granular.passes._attention import Core, find_core
from granular.passes._channels import shape_args
from granular.passes._graph import evaluate_scalar, layer_view, shared_layer_paths
from granular.passes._manager import run_passes
from granular.passes.find_units import _common_path, sanitize

__all__ = ["FindHeads", "find_heads", "resized_args"]

log = logging.getLogger(__name__)

_MOVE_METHODS = {"reshape", "view", "permute", "transpose", "contiguous", "unbind", "flatten", "unsqueeze",
                 "squeeze", "swapaxes", "movedim", "split", "chunk"}
_MOVE_FUNCS = {torch.reshape, torch.permute, torch.transpose, torch.unbind, torch.flatten, operator.getitem,
               torch.unsqueeze, torch.squeeze, torch.swapaxes, torch.movedim, torch.split, torch.chunk}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
_RESIZABLE = {"reshape", "view", torch.reshape}


def _tensor_input(node: fx.Node) -> Optional[fx.Node]:
    ins = [a for a in node.args if isinstance(a, fx.Node)]
    return ins[0] if len(ins) == 1 else None


def _src(node: fx.Node, kind: str) -> Optional[fx.Node]:
    """The input a path node carries the heads from (a move's first argument, a module's
    input, the tensor a number scales)."""
    src = node.args[0] if (kind == "move" or node.op == "call_module") and node.args else _tensor_input(node)
    return src if isinstance(src, fx.Node) else None


def _step(node: fx.Node, modules) -> Optional[str]:
    """``"move"`` (replayed on the field), ``"same"`` (the field passes unchanged: identity,
    dropout, a per-head norm, scaling by a number) or None (not allowed on a head path)."""
    if node.op == "call_method" and node.target in _MOVE_METHODS or \
            node.op == "call_function" and node.target in _MOVE_FUNCS:
        return "move" if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return "same"
        shape = getattr(m, "normalized_shape", None)
        x = tensor_shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if shape is not None and x and tuple(shape) == (x[-1],):  # LayerNorm / RMSNorm over the last dim
            return "same"
        return None
    if node.op in ("call_function", "call_method") and node.target in _SCALE and not node.kwargs and \
            len(node.args) == 2 and _tensor_input(node) is not None and \
            any(isinstance(a, (int, float)) for a in node.args) and \
            (node.target not in (operator.truediv, torch.div, "div") or isinstance(node.args[0], fx.Node)):
        return "same"
    return None


def resized_args(node: fx.Node, args: tuple, dim: int, size: int) -> tuple:
    """``args`` of a reshape/view ``node`` (already mapped) with the size at ``dim`` replaced."""
    if node.target is torch.reshape:
        sizes = list(args[1])
        sizes[dim] = size
        return (args[0], tuple(sizes))
    rest = args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        sizes = list(rest[0])
        sizes[dim] = size
        return (args[0], tuple(sizes))
    sizes = list(rest)
    sizes[dim] = size
    return (args[0], *sizes)


def _replay(nodes: list[fx.Node], env: dict, modules, resize: Optional[dict] = None,
            same: Optional[dict] = None) -> dict:
    """Run ``nodes`` (graph order) on fields; ``env`` holds the fields of their inputs;
    ``same`` maps nodes that pass a field on unchanged to that field's node."""
    for n in nodes:
        if same and n in same:
            env[n] = env[same[n]]
            continue
        kind = _step(n, modules)
        if kind == "same":
            env[n] = env[_src(n, kind)]
            continue
        args = fx.node.map_arg(n.args, lambda a: env[a] if a in env else evaluate_scalar(a))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a] if a in env else evaluate_scalar(a))
        if resize and n in resize:
            args = resized_args(n, args, *resize[n])
        fn = n.target if n.op == "call_function" else getattr(torch.Tensor, n.target)
        env[n] = fn(*args, **kwargs)
    return env


def _back(node: fx.Node, gm, modules, shared) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """The linear layer that produces an attention input, and the nodes between them."""
    path, cur = [], node
    while True:
        lv = layer_view(gm, cur, modules)
        if lv is not None:
            return (cur, path) if lv.kind == "linear" and lv.path not in shared else None
        kind = _step(cur, modules)
        src = _src(cur, kind) if kind is not None else None
        if src is None:
            return None
        path.append(cur)
        cur = src


def _forward(node: fx.Node, gm, modules, shared) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """The linear layer that reads the attention's output, and the nodes between them."""
    path, cur = [], node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        lv = layer_view(gm, u, modules)
        if lv is not None:
            return (u, path) if lv.kind == "linear" and lv.x is cur and lv.path not in shared else None
        kind = _step(u, modules)
        if kind is None or _src(u, kind) is not cur:
            return None
        path.append(u)
        cur = u


def _reads_batch(arg) -> bool:
    """Whether a size argument may depend on the batch size (so replacing it by a literal
    would tie the export to the traced batch): it reads dim 0 of some tensor's shape, or a
    whole shape or element count. ``x.shape[2]`` (a channel count, constant) does not."""
    if not isinstance(arg, fx.Node):
        return False
    stack, seen = [arg], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if tensor_shape(n) is not None:  # reached the tensor itself through a size it was not indexed by
            return True
        t = n.target
        if n.op == "call_method" and t == "size":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if dim is None or not isinstance(dim, int) or dim % len(tensor_shape(n.args[0]) or (1,)) == 0:
                return True
            continue
        if n.op == "call_method" and t in ("numel", "nelement"):
            return True
        if n.op == "call_function" and t is operator.getitem and isinstance(n.args[0], fx.Node) and \
                (n.args[0].op == "call_function" and n.args[0].target is getattr or
                 n.args[0].op == "call_method" and n.args[0].target == "size" and len(n.args[0].args) == 1):
            src = n.args[0].args[0]
            i = n.args[1]
            if not isinstance(i, int) or i % len(tensor_shape(src) or (1,)) == 0:
                return True
            continue
        stack.extend(n.all_input_nodes)
    return False


def _field(shape, ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.float64).expand(tuple(shape)).clone()


def _head_dims(field: torch.Tensor, heads: int) -> Optional[list[tuple[int, int]]]:
    """(dim, units per head) of the dims along which a head-id field varies; None when a dim
    mixes heads with something else (its size is not a multiple of the heads)."""
    out = []
    for d in range(field.dim()):
        f = field.movedim(d, 0).reshape(field.shape[d], -1)
        if bool((f == f[:1]).all()):
            continue  # constant along d
        if field.shape[d] % heads:
            return None
        out.append((d, field.shape[d] // heads))
    return out


def analyze_attention(gm: fx.GraphModule, core: Core, modules, shared) -> Optional[HeadUnit]:
    """The :class:`HeadUnit` of one attention core, or None when its heads must stay whole."""
    shapes = [tensor_shape(a) for a in core.inputs] + [tensor_shape(core.out)]
    if any(s is None or len(s) != 4 for s in shapes) or len({s[1] for s in shapes}) != 1:
        return None
    heads = shapes[0][1]
    backs = [_back(a, gm, modules, shared) for a in core.inputs]
    fwd = _forward(core.out, gm, modules, shared)
    if any(b is None for b in backs) or fwd is None or heads < 2:
        return None
    producers = list(dict.fromkeys(b[0] for b in backs))
    path_in = set(n for b in backs for n in b[1])
    readers = path_in | {core.out, core.scores}
    if any(u not in path_in for p in producers for u in p.users) or \
            any(u not in readers for n in path_in for u in n.users):
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    path_in_l = sorted(path_in, key=order.__getitem__)
    try:
        return _prove(gm, core, heads, producers, path_in_l, fwd, modules)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a path we cannot replay
        log.debug("find_heads: %s kept whole (%s)", core.out.name, e)
        return None


def _heads_at_dim1(shape, heads: int) -> torch.Tensor:
    return _field(shape, torch.arange(1, heads + 1, dtype=torch.float64).view(1, heads, 1, 1))


def _prove_core(core: Core, heads: int, modules) -> Optional[tuple[list, list]]:
    """The explicit form's reshapes that count heads and every mask's head dim, proved like
    the paths: (resizes, masks) or None. sdpa's scores are implicit, heads at dim 1."""
    if core.scores is None:
        masks = []
        for node, key in core.masks:
            ms = tensor_shape(node.kwargs[key] if isinstance(key, str) else node.args[key])
            rel = len(ms) - 3
            if rel >= 0 and ms[rel] == heads:
                masks.append((node, key, rel))
            elif rel >= 0 and ms[rel] != 1:
                return None
        return [], masks
    s_shape = tensor_shape(core.scores)
    probs = core.chain[-1]
    env_h = _replay(core.chain, {core.scores: _heads_at_dim1(s_shape, heads)}, modules, same=core.same)
    if not torch.equal(env_h[probs], _heads_at_dim1(tensor_shape(probs), heads)):
        return None
    for n, src in core.same.items():  # a softmax (over the last dim) must see one head at a time
        f = env_h[src]
        if n not in core.masks_nodes() and not bool((f == f[..., :1]).all()):
            return None
    resizes = []
    for n in core.chain:
        if n not in core.same:
            dims = _head_dims(env_h[n], heads)
            if dims is None or len(dims) > 1 or any(_reads_batch(shape_args(n)[d]) for d, _ in dims):
                return None
            resizes += [(n, d, u) for d, u in dims if shape_args(n)[d] != -1]
    masks = []
    for node, key in core.masks:
        dims = _head_dims(env_h[core.same[node]], heads)
        if not dims or len(dims) > 1:
            return None
        (d, units), = dims
        ms = tensor_shape(node.args[key])
        rel = d - (len(tensor_shape(node)) - len(ms))
        if rel >= 0 and ms[rel] != 1:
            if ms[rel] != heads or units != 1:
                return None
            masks.append((node, key, rel))
    ids = _field(s_shape, torch.arange(1, math.prod(s_shape) + 1, dtype=torch.float64).view(s_shape))
    want = _replay(core.chain, {core.scores: ids}, modules, same=core.same)[probs]
    for drop in {0, heads - 1}:
        keep = [h for h in range(heads) if h != drop]
        resize = {n: (d, u * len(keep)) for n, d, u in resizes}
        got = _replay(core.chain, {core.scores: ids[:, keep]}, modules, resize, same=core.same)[probs]
        if not torch.equal(got, want[:, keep]):
            return None
    return resizes, masks


def _prove(gm, core: Core, heads, producers, path_in, fwd, modules) -> Optional[HeadUnit]:
    proj, path_out = fwd
    out = core.out
    # 1. Rows of each head: replay the producers' row ids to the core's inputs.
    starts, offset = {}, 0
    for p in producers:
        width = tensor_shape(p)[-1]
        starts[p] = (offset, width)
        offset += width
    env = {p: _field(tensor_shape(p), torch.arange(o + 1, o + w + 1)) for p, (o, w) in starts.items()}
    env = _replay(path_in, env, modules)
    rows: list[set[int]] = [set() for _ in range(heads)]
    for a in core.inputs:
        for h in range(heads):
            rows[h].update(int(v) - 1 for v in torch.unique(env[a][:, h]).tolist())
    if any(not r for r in rows) or sum(len(r) for r in rows) != len(set().union(*rows)) or \
            any(v < 0 for r in rows for v in r):
        return None
    # 2. Columns of each head at proj: replay (head, position) ids from the core's output.
    out_shape = tensor_shape(out)
    per = out_shape[-1]
    o_ids = torch.arange(1, heads * per + 1).view(1, heads, 1, per)
    env_out = _replay(path_out, {out: _field(out_shape, o_ids)}, modules)
    p_in = env_out[path_out[-1]] if path_out else env_out[out]
    cols_f = p_in.reshape(-1, p_in.shape[-1])
    if not bool((cols_f.min(0).values == cols_f.max(0).values).all()):
        return None
    col_ids = [int(v) - 1 for v in cols_f[0].tolist()]
    cols = [[c for c, i in enumerate(col_ids) if i // per == h] for h in range(heads)]
    if any(not c for c in cols) or sorted(col_ids) != list(range(heads * per)):
        return None
    # 3. The reshapes that count heads, from head-id fields; norms see one head at a time.
    head_of_row = torch.zeros(offset + 1, dtype=torch.float64)
    for h, r in enumerate(rows):
        head_of_row[torch.tensor(sorted(r)) + 1] = h + 1
    env_h = {p: head_of_row[env[p].long()] for p in producers}
    env_h = _replay(path_in, env_h, modules)
    env_h.update(_replay(path_out, {out: _heads_at_dim1(out_shape, heads)}, modules))
    for n in path_in + path_out:
        if n.op == "call_module" and not isinstance(modules[n.target], (nn.Identity, nn.Dropout)):
            f = env_h[n.args[0]]
            if not bool((f == f[..., :1]).all()):
                return None
    resizes = []
    for n in path_in + path_out:
        if not (n.target in _RESIZABLE and isinstance(env_h[n], torch.Tensor)):
            continue
        dims = _head_dims(env_h[n], heads)
        if dims is None or len(dims) > 1:
            return None
        for d, units in dims:
            if d >= len(shape_args(n)) or _reads_batch(shape_args(n)[d]):
                return None  # a size that follows the batch cannot become a literal
            if shape_args(n)[d] != -1:
                resizes.append((n, d, units))
    core_proof = _prove_core(core, heads, modules)
    if core_proof is None:
        return None
    core_resizes, masks = core_proof
    # 4. Proof: without the first (or the last) head, the fields are the originals without it.
    for drop in {0, heads - 1}:
        keep = [h for h in range(heads) if h != drop]
        resize = {n: (d, units * len(keep)) for n, d, units in resizes}
        kept_rows = set().union(*(rows[h] for h in keep))
        env_k = {}
        for p, (o, w) in starts.items():
            ids = [o + i + 1 for i in range(w) if (o + i) in kept_rows or not any((o + i) in r for r in rows)]
            env_k[p] = _field(tensor_shape(p)[:-1] + (len(ids),), torch.tensor(ids))
        env_k = _replay(path_in, env_k, modules, resize)
        if any(not torch.equal(env_k[a], env[a][:, keep]) for a in core.inputs):
            return None
        o_k = o_ids[:, keep]
        env_o = _replay(path_out, {out: _field(out_shape[:1] + (len(keep),) + out_shape[2:], o_k)}, modules, resize)
        got = env_o[path_out[-1]] if path_out else env_o[out]
        want_cols = [c for h in keep for c in cols[h]]
        if not torch.equal(got, p_in[..., sorted(want_cols)]):
            return None
    lv_paths = [layer_view(gm, p, modules).path for p in producers]
    proj_path = layer_view(gm, proj, modules).path
    path = _common_path(lv_paths + [proj_path])
    key = f"{sanitize(path) if path else out.name}_heads"
    per_layer = []
    for p, path_p in zip(producers, lv_paths):
        o, w = starts[p]
        per_layer.append((path_p, tuple(tuple(sorted(r - o for r in rows[h] if o <= r < o + w))
                                        for h in range(heads))))
    return HeadUnit(key=key, scope=out.meta.get(MEMBER) or key, heads=heads, rows=tuple(per_layer),
                    proj=proj_path, cols=tuple(tuple(c) for c in cols),
                    resizes=tuple((n.name, d, u) for n, d, u in resizes + core_resizes),
                    masks=tuple((n.name, key_, d) for n, key_, d in masks))


class FindHeads(PassBase):
    """Analysis: mark the attention nodes whose heads are units (``granular.heads``)."""

    mutates = False  # meta only: run_passes skips the recompile and lint

    def __init__(self, config: GateConfig | None = None):
        self.config = config or GateConfig()

    def call(self, gm: fx.GraphModule) -> PassResult:
        for n in gm.graph.nodes:
            n.meta.pop(HEADS, None)
        if not (self.config.filter_gates and self.config.head_gates):
            return PassResult(gm, False)
        modules = dict(gm.named_modules())
        shared = shared_layer_paths(gm, modules)
        found = 0
        used = {sanitize(lv.path) for n in gm.graph.nodes for lv in [layer_view(gm, n, modules)] if lv is not None}
        for n in list(gm.graph.nodes):
            core = find_core(n, modules)
            unit = analyze_attention(gm, core, modules, shared) if core is not None else None
            if unit is not None:
                key, k = unit.key, 1
                while key in used:  # two attentions under one module, or a layer of that name
                    k += 1
                    key = f"{unit.key}_{k}"
                used.add(key)
                n.meta[HEADS] = dataclasses.replace(unit, key=key, scope=key if unit.scope == unit.key else unit.scope)
                found += 1
        log.info("find_heads: %d attention layers with head units", found)
        return PassResult(gm, False)


def find_heads(gm: fx.GraphModule, config: GateConfig | None = None) -> fx.GraphModule:
    """Functional form of :class:`FindHeads`; returns ``gm`` (annotated in place)."""
    return run_passes(gm, [FindHeads(config)])
