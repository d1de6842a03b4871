"""``fuse_kernels``: rewrite gated conv patterns to the fused Triton op (CUDA only).

Requires meta: ``granular.gate`` (from ``insert_gates``) and ``tensor_meta``.
Produces: a ``granular_kernels`` submodule of :class:`~granular.kernels.module.GatedConv2d`
modules, each replacing one pattern; they read every tensor from the graph's own
``get_attr`` nodes, so parameters and the state dict are unchanged. Off CUDA (or without
triton) it returns the graph unchanged, unless ``enabled=True`` (tests, ``TRITON_INTERPRET=1``).

The eager gated conv materialises ``w * mask(w)``, runs the dense conv over pruned
channels too, then multiplies by the filter and op gates, each a kernel that autograd saves
for. The fused op loads the weight mask with the weight tiles, computes only the channels
that can be non-zero, and applies the gates in its epilogue (``docs/kernels.md``).

Patterns (``wm`` is the ω gate; brackets are optional)::

    wm = weight_mask(w, t_ω); y = conv2d(x, wm, b, ...) [; y = filter_gate(y, t_β) [; y = op_gate(y, t_α)]]
        -> y = granular_kernels.k(x, w, b, t_ω · scale, wmask, gates=[(β, t_β, mask_β, gain_β), (α, ...)], ...)

Gates directly after the conv go into the epilogue. Gates after the conv's BatchNorm stay
where they are (a train-mode BatchNorm sits between them and the conv), but their stored
masks still tell the kernel which output channels it may skip. Gates upstream of the input,
through ReLUs and sums, tell it which input channels are exactly zero. Only stored masks
count: a live-threshold zero is not hard (its gradient is not zero), so it is never skipped.

Convs that are not groups=1 or depthwise, 1-d convs and string paddings are left alone.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from granular.gates import FilterGate
from granular.meta import GATE, tensor_shape
from granular.passes._graph import ADD_TARGETS
from granular.passes._manager import run_passes

__all__ = ["FuseKernels", "fuse_kernels", "KERNEL_ROOT"]

KERNEL_ROOT = "granular_kernels"
_CONVS = (torch.conv2d, F.conv2d)
_RELUS = (F.relu, torch.relu, torch.relu_)


def _gate(gm: fx.GraphModule, n, kind: str) -> Optional[nn.Module]:
    """The gate module of ``n`` if it is a ``kind`` gate (a channels-first one for filters)."""
    if not isinstance(n, fx.Node) or n.op != "call_module" or GATE not in n.meta or n.meta[GATE].kind != kind:
        return None
    mod = gm.get_submodule(str(n.target))
    if isinstance(mod, FilterGate) and mod.channels_last:
        return None
    return mod


def _only_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _is_bn(gm: fx.GraphModule, n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), nn.BatchNorm2d))


def _passes_zero(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Nodes that map an exactly-zero channel to zero, per channel: ReLU, identity."""
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), (nn.ReLU, nn.Identity))
    return n.op == "call_function" and n.target in _RELUS and len(n.args) == 1


class FuseKernels(PassBase):
    """Transform: swap gated conv patterns for :class:`GatedConv2d` modules.

    Args:
        enabled: fuse (True), leave alone (False), or fuse only when the graph's parameters
            are on CUDA and triton is installed (None, the default).
        use_kernel: passed to each module: the Triton op (True), the reference twin (False),
            or the op where it can run (None).
    """

    def __init__(self, enabled: Optional[bool] = None, use_kernel: Optional[bool] = None):
        super().__init__()
        self.enabled = enabled
        self.use_kernel = use_kernel

    def applies(self, gm: fx.GraphModule) -> bool:
        """Whether this pass fuses anything here (``run_passes`` skips it otherwise)."""
        return self._should_run(gm)

    def _should_run(self, gm: fx.GraphModule) -> bool:
        if self.enabled is not None:
            return self.enabled
        from granular.kernels import has_triton
        p = next(gm.parameters(), None)
        return p is not None and p.device.type == "cuda" and has_triton()

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self._should_run(gm):
            return PassResult(gm, False)
        from granular.kernels.module import GatedConv2d

        graph = gm.graph
        root = gm.get_submodule(KERNEL_ROOT) if hasattr(gm, KERNEL_ROOT) else None
        if root is None:
            root = nn.Module()
            gm.add_submodule(KERNEL_ROOT, root)
        memo: dict[fx.Node, Optional[list]] = {}
        fused = 0
        for conv in list(graph.nodes):
            if conv.op != "call_function" or conv.target not in _CONVS:
                continue
            spec = self._match(gm, conv)
            if spec is None:
                continue
            x, w, bias, t, wmask_target, stride, padding, dilation, groups = spec
            epilogue, tail = [], conv
            for kind in ("filter", "op"):
                nxt = _only_user(tail)
                if nxt is not None and _gate(gm, nxt, kind) is not None and nxt.args[0] is tail:
                    epilogue.append(nxt)
                    tail = nxt
            out_gates = self._gates_after_bn(gm, conv) if not epilogue else []
            with graph.inserting_before(conv):
                def attr(target: str) -> fx.Node:
                    return graph.get_attr(target)

                wmask = attr(wmask_target) if wmask_target else None
                if wmask_target:  # t_ω is on the layer's normalised scale (WeightMask.scale)
                    t = graph.call_function(operator.mul, (t, attr(wmask_target.removesuffix("mask") + "scale")))
                gates = []
                for g in epilogue:
                    pname = "beta" if g.meta[GATE].kind == "filter" else "alpha"
                    gates.append((attr(f"{g.target}.{pname}"), g.args[1], attr(f"{g.target}.mask"),
                                  attr(f"{g.target}.gain")))
                out_masks = [attr(f"{g.target}.mask") for g in out_gates]
                in_zero = [[attr(f"{g.target}.mask") for g in clause] for clause in (_zero_clauses(gm, x, memo) or [])]
            name = str(w.target).rsplit(".", 1)[0].replace(".", "_") if w.op == "get_attr" else conv.name
            root.add_module(name, GatedConv2d(stride, padding, dilation, groups,
                                              [g.meta[GATE].kind for g in epilogue], self.use_kernel))
            with graph.inserting_after(tail):
                new = graph.call_module(f"{KERNEL_ROOT}.{name}", (x, w, bias, t, wmask, gates, out_masks, in_zero))
            new.meta.update({k: v for k, v in conv.meta.items() if k != GATE})
            new.meta["tensor_meta"] = tail.meta.get("tensor_meta")
            tail.replace_all_uses_with(new)
            for n in reversed([conv, *epilogue]):
                if not n.users:
                    graph.erase_node(n)
            fused += 1
        graph.eliminate_dead_code()
        return PassResult(gm, fused > 0)

    @staticmethod
    def _match(gm: fx.GraphModule, conv: fx.Node):
        """``(x, w, bias, t_ω, mask target, stride, padding, dilation, groups)`` or None."""
        args = list(conv.args) + [None] * (7 - len(conv.args))
        if conv.kwargs:
            return None
        x, wnode, bias, stride, padding, dilation, groups = args
        stride, padding, dilation, groups = stride or (1, 1), padding or (0, 0), dilation or (1, 1), groups or 1
        if isinstance(padding, str) or not all(isinstance(v, (tuple, list)) and len(v) == 2
                                               for v in (stride, padding, dilation)):
            return None
        xs = tensor_shape(x)
        if _gate(gm, wnode, "weight") is not None:
            w, t = wnode.args
            wmask_target = f"{wnode.target}.mask"
        elif isinstance(wnode, fx.Node) and wnode.op == "get_attr":
            w, t, wmask_target = wnode, None, None
        else:
            return None
        ws = _attr_shape(gm, w)
        if xs is None or ws is None or len(xs) != 4 or len(ws) != 4:
            return None
        depthwise = groups > 1 and groups == xs[1] == ws[0] and ws[1] == 1
        if groups != 1 and not depthwise:
            return None
        if wmask_target is None and _gate(gm, _only_user(conv), "filter") is None:
            return None   # an ungated conv: nothing to fuse
        return x, w, bias, t, wmask_target, tuple(stride), tuple(padding), tuple(dilation), groups

    @staticmethod
    def _gates_after_bn(gm: fx.GraphModule, conv: fx.Node) -> list[fx.Node]:
        """Gates that follow the conv's only user, a BatchNorm: their zeros zero the channel."""
        bn = _only_user(conv)
        if bn is None or not _is_bn(gm, bn):
            return []
        out, tail = [], bn
        for kind in ("filter", "op"):
            nxt = _only_user(tail)
            if nxt is None or _gate(gm, nxt, kind) is None:
                break
            out.append(nxt)
            tail = nxt
        return out


def _zero_clauses(gm: fx.GraphModule, n, memo: dict) -> Optional[list[list[fx.Node]]]:
    """Gate nodes whose stored masks make ``n`` zero per channel, as an AND of ORs; None if
    no gate can (the channel is zero when every clause has a gate whose mask is 0 there)."""
    if not isinstance(n, fx.Node):
        return None
    if n in memo:
        return memo[n]
    memo[n] = None   # guards cycles; graphs have none
    result = None
    if _gate(gm, n, "filter") is not None or _gate(gm, n, "op") is not None:
        inner = _zero_clauses(gm, n.args[0], memo)
        result = [[n]] if inner is None else [clause + [n] for clause in inner]
    elif _passes_zero(gm, n):
        result = _zero_clauses(gm, n.args[0], memo)
    elif n.op == "call_function" and n.target in ADD_TARGETS and len(n.args) == 2 and not n.kwargs:
        a, b = (_zero_clauses(gm, v, memo) for v in n.args)
        shapes = {tensor_shape(v) if isinstance(v, fx.Node) else None for v in n.args}
        if a is not None and b is not None and len(shapes) == 1:
            result = a + b
    memo[n] = result
    return result


def _attr_shape(gm: fx.GraphModule, n: fx.Node) -> Optional[tuple[int, ...]]:
    """The shape of a ``get_attr`` tensor (a conv weight)."""
    if n.op != "get_attr":
        return tensor_shape(n)
    obj = gm
    for part in str(n.target).split("."):
        obj = getattr(obj, part, None)
    return tuple(obj.shape) if isinstance(obj, torch.Tensor) else None


def fuse_kernels(gm: fx.GraphModule, enabled: Optional[bool] = None, use_kernel: Optional[bool] = None) -> fx.GraphModule:
    """Functional form of :class:`FuseKernels`; returns ``gm`` (rewritten in place when it fuses)."""
    return run_passes(gm, [FuseKernels(enabled, use_kernel)])
