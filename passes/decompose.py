"""``decompose_norm_act`` and ``decompose_attention``: open leaves that hide units.

**Norm + activation.**
timm keeps ``BatchNormAct2d`` (BatchNorm, dropout and activation in one module) as an FX
leaf, because its forward branches on ``self.training``. As one opaque node it would fix
every channel it touches and could not be folded into the conv before it. This pass
replaces each such node by three ``call_module`` nodes on plain modules (``nn.BatchNorm2d``
sharing the original's parameters and running statistics, then its ``drop`` and ``act``)::

    x = self.bn1(conv)                x = self.bn1.bn(conv)
                              ->      x = self.bn1.drop(x)
                                      x = self.bn1.act(x)

**``nn.MultiheadAttention``** (self-attention; FX keeps it whole, and its ``in_proj_weight``
is a bare parameter, so neither its heads nor its widths could be pruned) becomes the form
``find_heads`` proves, with plain ``nn.Linear`` modules sharing its parameters::

    out, _ = self.attn(x, x, x, need_weights=False)
                      ->  qkv = self.attn.in_proj(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
                          o = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
                          out = self.attn.out_proj(o.transpose(1, 2).reshape(B, N, E))

Only what that form computes is opened: one batched 3-d input for query, key and value,
equal embedding sizes, no masks, no added bias_k/bias_v or zero attention, attention
dropout 0, the attention weights unused, and the module called once with its parameters
read nowhere else; any other use stays one leaf. It needs ``tensor_meta`` (``trace`` runs
it after shape propagation, then propagates again where it opened one). Equal up to float rounding
(the leaf takes PyTorch's fused path in eval mode).

The user's model is not changed: the new modules live in the GraphModule's own hierarchy.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.meta import tensor_shape
from granular.passes._manager import run_passes

__all__ = ["DecomposeNormAct", "decompose_norm_act", "DecomposeAttention", "decompose_attention"]


def _is_norm_act(m: nn.Module) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and hasattr(m, "act")
            and hasattr(m, "drop") and type(m).__name__ == "BatchNormAct2d")


def _plain_batchnorm(m: nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                        track_running_stats=m.track_running_stats, device="meta")
    if m.affine:
        bn.weight, bn.bias = m.weight, m.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, name, getattr(m, name))
    bn.train(m.training)
    return bn


class DecomposeNormAct(PassBase):
    """Transform: BatchNormAct2d leaves -> BatchNorm2d, dropout and activation nodes."""

    def applies(self, gm: fx.GraphModule) -> bool:
        """Whether the graph calls a fused norm+act module (``run_passes`` skips it otherwise)."""
        return any(_is_norm_act(m) for m in gm.modules())

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        modules = dict(gm.named_modules())  # the nodes visited are the original ones: their targets stay
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            m = modules[node.target]
            if not _is_norm_act(m) or len(node.args) != 1 or node.kwargs:
                continue
            box = nn.Module()
            box.bn, box.drop, box.act = _plain_batchnorm(m), m.drop, m.act
            path = str(node.target)
            parent, _, name = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, box)
            with gm.graph.inserting_after(node):
                bn = gm.graph.call_module(f"{path}.bn", node.args)
            with gm.graph.inserting_after(bn):
                drop = gm.graph.call_module(f"{path}.drop", (bn,))
            with gm.graph.inserting_after(drop):
                act = gm.graph.call_module(f"{path}.act", (drop,))
            node.replace_all_uses_with(act)
            gm.graph.erase_node(node)
            changed = True
        return PassResult(gm, changed)


def decompose_norm_act(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`DecomposeNormAct`."""
    return run_passes(gm, [DecomposeNormAct()])


def _plain_linear(weight: nn.Parameter, bias) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight
    if bias is not None:
        lin.bias = bias
    return lin


def _opens(node: fx.Node, m: nn.Module) -> bool:
    """Whether this call computes exactly what the opened form does (module docstring)."""
    args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args):]]
    kw = {k: v for k, v in node.kwargs.items() if k not in ("query", "key", "value")}
    allowed = {"need_weights": (False, True), "attn_mask": (None,), "key_padding_mask": (None,),
               "is_causal": (False,), "average_attn_weights": (True, False)}
    if len(args) != 3 or not (isinstance(args[0], fx.Node) and args[0] is args[1] is args[2]):
        return False
    if any(k not in allowed or v not in allowed[k] for k, v in kw.items()):
        return False
    if not (m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None and m.bias_v is None
            and not m.add_zero_attn and m.dropout == 0.0 and type(m.out_proj) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)):
        return False
    if len(tensor_shape(args[0]) or ()) != 3:  # unbatched (L, E) input: leave it to the module
        return False
    path = str(node.target)
    graph = node.graph
    if any(n is not node and (n.op == "call_module" and n.target == path or
                              n.op == "get_attr" and str(n.target).startswith(path + "."))
           for n in graph.nodes):  # called twice, or its parameters read elsewhere: keep it whole
        return False
    users = list(node.users)
    return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) and
               (u.args[1] == 0 or not u.users) for u in users)


class DecomposeAttention(PassBase):
    """Transform: self-attention ``nn.MultiheadAttention`` leaves -> linear, sdpa, linear."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        g = gm.graph
        for node in list(g.nodes):
            if node.op != "call_module":
                continue
            m = gm.get_submodule(node.target)
            if type(m) is not nn.MultiheadAttention or not _opens(node, m):
                continue
            x = node.args[0] if node.args else node.kwargs["query"]
            path = str(node.target)
            box = nn.Module()
            box.in_proj = _plain_linear(m.in_proj_weight, m.in_proj_bias)
            box.out_proj = _plain_linear(m.out_proj.weight, m.out_proj.bias)
            parent, _, name = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, box)
            h, d, e = m.num_heads, m.head_dim, m.embed_dim
            b_dim, n_dim = (0, 1) if m.batch_first else (1, 0)
            with g.inserting_before(node):
                b = g.call_method("size", (x, b_dim))
                n = g.call_method("size", (x, n_dim))
                qkv = g.call_module(f"{path}.in_proj", (x,))
                sizes = (b, n, 3, h, d) if m.batch_first else (n, b, 3, h, d)
                r = g.call_method("reshape", (qkv, *sizes))
                p = g.call_method("permute", (r, 2, 0, 3, 1, 4) if m.batch_first else (r, 2, 1, 3, 0, 4))
                q, k, v = (g.call_function(operator.getitem, (p, i)) for i in range(3))
                o = g.call_function(F.scaled_dot_product_attention, (q, k, v))
                if m.batch_first:
                    merged = g.call_method("reshape", (g.call_method("transpose", (o, 1, 2)), b, n, e))
                else:
                    merged = g.call_method("reshape", (g.call_method("permute", (o, 2, 0, 1, 3)), n, b, e))
                out = g.call_module(f"{path}.out_proj", (merged,))
            for u in list(node.users):
                if u.args[1] == 0:
                    u.replace_all_uses_with(out)
                g.erase_node(u)
            g.erase_node(node)
            changed = True
        return PassResult(gm, changed)


def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Functional form of :class:`DecomposeAttention`."""
    return run_passes(gm, [DecomposeAttention()])
