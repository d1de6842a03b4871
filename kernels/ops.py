"""``granular::masked_conv2d``: the Triton kernels registered as a torch.library op.

``torch.library.triton_op`` makes the op visible to torch.compile (it traces into the
Triton kernels), ``register_autograd`` gives it the fused backward
(``granular::masked_conv2d_backward``: dgrad, wgrad and the weight epilogue), and
``register_fake`` gives shapes without running anything. Importing this module imports
triton; use :func:`granular.kernels.masked_conv2d`, which imports it lazily.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from granular.kernels import triton_conv as tk
from granular.kernels.reference import is_depthwise

__all__ = ["masked_conv2d_op", "tile_config"]


def tile_config(dtype: torch.dtype, depthwise: bool) -> dict:
    """Tile sizes: one fixed config (the interpreter cannot autotune over several; ``docs/kernels.md``, "Testing without a GPU").

    The interpreter runs program instances one after another, so there fewer, larger tiles
    along pixels pay. ``num_warps`` stays at 4 (the conv miscompile at 8, ``docs/kernels.md``, "Why a custom kernel").
    """
    if tk.INTERPRET:
        return {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_C": 16, "num_warps": 4}
    if depthwise:
        return {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32 if dtype == torch.float32 else 64, "num_warps": 4}


def _precision(dtype: torch.dtype) -> str:
    """fp32 dot precision: TF32 where cuDNN's convs use it too, so both sides round alike."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not tk.INTERPRET else "ieee"


def _out_size(h: int, w: int, r: int, s: int, stride, padding, dilation) -> tuple[int, int]:
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _geometry(stride, padding, dilation) -> dict:
    return dict(STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
                DIL_H=dilation[0], DIL_W=dilation[1])


def _split_rows(m: int, programs: int, block_m: int) -> tuple[int, int]:
    """Split the pixel reduction of wgrad so that the grid fills the GPU (fp32 atomics join the parts)."""
    if tk.INTERPRET or not torch.cuda.is_available():
        return 1, m
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(m, 4 * block_m)))
    rows = triton.cdiv(triton.cdiv(m, want), block_m) * block_m
    return triton.cdiv(m, rows), rows


@triton_op("granular::masked_conv2d", mutates_args=())
def masked_conv2d_op(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, wmask: torch.Tensor,
                     scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                     in_idx: torch.Tensor, out_idx: torch.Tensor,
                     stride: List[int], padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """Forward of the masked, gated conv (semantics: ``granular.kernels.reference``)."""
    n, _, h, wd = x.shape
    k_all, _, r, s = w.shape
    p, q = _out_size(h, wd, r, s, stride, padding, dilation)
    depthwise = is_depthwise(x, w, groups)
    n_out = out_idx.numel()
    y = (x.new_zeros if n_out < k_all else x.new_empty)((n, k_all, p, q))
    if n_out == 0 or y.numel() == 0:
        return y
    w = w.contiguous()
    wmask = wmask.to(w.dtype).contiguous()
    cfg = tile_config(x.dtype, depthwise)
    m = n * p * q
    common = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, R=r, S=s, num_warps=cfg["num_warps"],
                  **_geometry(stride, padding, dilation))
    sc = scale if scale is not None else t
    sh = shift if shift is not None else t
    if depthwise:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n_out, cfg["BLOCK_C"]))
        wrap_triton(tk._dw_fwd)[grid](
            x, w, wmask, t, sc, sh, out_idx, y, m, p, q, h, wd, n_out,
            *x.stride(), w.stride(0), w.stride(2), w.stride(3), *y.stride(),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], **common)
    else:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n_out, cfg["BLOCK_N"]))
        wrap_triton(tk._conv_fwd)[grid](
            x, w, wmask, t, sc, sh, in_idx, out_idx, y, m, p, q, h, wd, in_idx.numel(), n_out,
            *x.stride(), *w.stride(), *y.stride(),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            PRECISION=_precision(x.dtype), **common)
    return y


@masked_conv2d_op.register_fake
def _(x, w, t, wmask, scale, shift, in_idx, out_idx, stride, padding, dilation, groups):
    p, q = _out_size(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding, dilation)
    return x.new_empty((x.shape[0], w.shape[0], p, q))


@triton_op("granular::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor,
                              wmask: torch.Tensor, scale: Optional[torch.Tensor],
                              in_idx: torch.Tensor, out_idx: torch.Tensor,
                              stride: List[int], padding: List[int], dilation: List[int], groups: int,
                              need_dx: bool, need_dshift: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dw, dt, dscale, dshift)``; dscale/dshift are zero on inactive channels, and
    dx/dshift empty unless asked for (dshift is a full pass over dy)."""
    n, _, h, wd = x.shape
    k_all, c_w, r, s = w.shape
    p, q = _out_size(h, wd, r, s, stride, padding, dilation)
    depthwise = is_depthwise(x, w, groups)
    dy = dy.to(x.dtype)
    w = w.contiguous()
    wmask = wmask.to(w.dtype).contiguous()
    cfg = tile_config(x.dtype, depthwise)
    geo = _geometry(stride, padding, dilation)
    n_out = out_idx.numel()
    act_in = out_idx if depthwise else in_idx
    n_in = act_in.numel()
    dx = torch.zeros_like(x) if need_dx else x.new_empty((0,))
    dw = torch.zeros_like(w)
    dt = torch.zeros((), device=x.device, dtype=torch.float32)
    dscale = torch.zeros(k_all, device=x.device, dtype=torch.float32)
    dshift = torch.zeros(k_all if need_dshift else 0, device=x.device, dtype=torch.float32)
    if need_dshift and n_out:
        dshift.index_copy_(0, out_idx.long(), dy.index_select(1, out_idx).float().sum((0, 2, 3)))
    if n_out == 0 or n_in == 0 or x.numel() == 0:
        return dx, dw, dt.to(t.dtype), dscale, dshift
    sc = scale if scale is not None else t
    m, mx = n * p * q, n * h * wd
    g = torch.zeros(w.shape, device=x.device, dtype=torch.float32)
    if depthwise:
        if need_dx:
            grid = (triton.cdiv(mx, cfg["BLOCK_M"]), triton.cdiv(n_out, cfg["BLOCK_C"]))
            wrap_triton(tk._dw_dgrad)[grid](
                dy, w, wmask, t, sc, out_idx, dx, mx, h, wd, p, q, n_out,
                *dy.stride(), w.stride(0), w.stride(2), w.stride(3), *dx.stride(),
                R=r, S=s, HAS_SCALE=scale is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
                num_warps=cfg["num_warps"], **geo)
        tiles = triton.cdiv(n_out, cfg["BLOCK_C"])
        splits, rows = _split_rows(m, tiles * r * s, cfg["BLOCK_M"])
        wrap_triton(tk._dw_wgrad)[(tiles, r * s * splits)](
            dy, x, out_idx, g, m, p, q, h, wd, n_out, rows,
            *dy.stride(), *x.stride(), g.stride(0),
            R=r, S=s, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], **geo)
        col_idx = torch.zeros(1, dtype=out_idx.dtype, device=x.device)
    else:
        if need_dx:
            grid = (triton.cdiv(mx, cfg["BLOCK_M"]), triton.cdiv(n_in, cfg["BLOCK_N"]))
            wrap_triton(tk._conv_dgrad)[grid](
                dy, w, wmask, t, sc, in_idx, out_idx, dx, mx, h, wd, p, q, n_in, n_out,
                *dy.stride(), *w.stride(), *dx.stride(),
                R=r, S=s, HAS_SCALE=scale is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(x.dtype), num_warps=cfg["num_warps"], **geo)
        bk, bn = cfg["BLOCK_K"], cfg["BLOCK_N"]
        tiles = triton.cdiv(n_out, bk) * triton.cdiv(n_in, bn)
        splits, rows = _split_rows(m, tiles * r * s, cfg["BLOCK_M"])
        wrap_triton(tk._conv_wgrad)[(triton.cdiv(n_out, bk), triton.cdiv(n_in, bn), r * s * splits)](
            dy, x, in_idx, out_idx, g, m, p, q, h, wd, n_in, n_out, rows,
            *dy.stride(), *x.stride(), g.stride(0), g.stride(1),
            R=r, S=s, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x.dtype),
            num_warps=cfg["num_warps"], **geo)
        col_idx = in_idx
    be_k, be_n = 16, 64
    grid = (triton.cdiv(n_out, be_k), triton.cdiv(col_idx.numel() * r * s, be_n))
    wrap_triton(tk._weight_epilogue)[grid](
        g, w, wmask, t, sc, col_idx, out_idx, dw, dt, dscale, col_idx.numel(), n_out, w.stride(0), w.stride(1),
        RS=r * s, HAS_SCALE=scale is not None, BLOCK_K=be_k, BLOCK_N=be_n, num_warps=4)
    return dx, dw, dt.to(t.dtype), dscale, dshift


@masked_conv2d_backward_op.register_fake
def _(dy, x, w, t, wmask, scale, in_idx, out_idx, stride, padding, dilation, groups, need_dx, need_dshift):
    k = w.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    return (x.new_empty(x.shape if need_dx else (0,)), w.new_empty(w.shape), t.new_empty(()),
            torch.empty(k, **f32), torch.empty(k if need_dshift else 0, **f32))


def _setup_context(ctx, inputs, output):
    x, w, t, wmask, scale, shift, in_idx, out_idx, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, w, t, wmask, scale, in_idx, out_idx)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_shift = shift is not None
    ctx.shift_dtype = shift.dtype if shift is not None else None


def _backward(ctx, dy):
    x, w, t, wmask, scale, in_idx, out_idx = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    dx, dw, dt, dscale, dshift = torch.ops.granular.masked_conv2d_backward(
        dy, x, w, t, wmask, scale, in_idx, out_idx, stride, padding, dilation, groups, ctx.needs_input_grad[0],
        ctx.has_shift)
    return (dx if ctx.needs_input_grad[0] else None, dw, dt.reshape(t.shape), None,
            dscale.to(scale.dtype) if scale is not None else None,
            dshift.to(ctx.shift_dtype) if ctx.has_shift else None,
            None, None, None, None, None, None)


masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
