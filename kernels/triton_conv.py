"""Triton kernels for the masked, gated, channel-skipping conv2d (``docs/kernels.md``, "Design").

Importing this module imports triton; ``granular.kernels`` imports it lazily. Set
``TRITON_INTERPRET=1`` *before* importing it to run the kernels on CPU tensors.

Kernels (semantics in :mod:`granular.kernels.reference`):

- ``_conv_fwd``: implicit GEMM. Rows are output pixels ``(n, p, q)``, columns are *active*
  output channels read through ``out_idx``, and the reduction runs over ``(r, s)`` and the
  *active* input channels read through ``in_idx``. The weight mask ``|w| >= t`` and the
  stored mask are applied to each weight tile as it loads; the epilogue applies
  ``scale[k]`` (filter gate × op gate) and ``shift[k]``. Pruned channels cost nothing.
- ``_dw_fwd``: depthwise, a direct kernel over (pixels × active channels), no ``tl.dot``.
- ``_conv_dgrad`` / ``_dw_dgrad``: input gradient, with ``dy * scale[k]`` applied on load, reducing
  over active output channels only.
- ``_conv_wgrad`` / ``_dw_wgrad``: ``G = Σ_{n,p,q} dy ⊗ x`` on active (k, c) pairs, split over
  pixels with fp32 atomics.
- ``_weight_epilogue``: from ``G`` alone, the weight gradient through the long-tailed step
  estimator, the threshold gradient and the gate gradient
  ``dscale[k] = <W_eff[k], G[k]>`` (``docs/kernels.md``, "Gate gradients without saved outputs"), so no pre-gate output is ever saved.

fp32 dots use TF32 exactly when cuDNN convs would (``torch.backends.cudnn.allow_tf32``).
Addressing is stride-generic (NCHW or channels-last activations); weights, masks and ``G``
are contiguous ``[K, C, R, S]``. Offsets are 64-bit.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pixels(pid, total, A, B, BLOCK_M: tl.constexpr):
    """Rows ``pid*BLOCK_M + i`` of a flattened ``[N, A, B]`` pixel grid: ``(ok, n, a, b)``."""
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ab = offs % (A * B)
    return offs < total, offs // (A * B), ab // B, ab % B


@triton.jit
def _channel_tile(idx_ptr, pid, count, BLOCK: tl.constexpr):
    """Tile ``pid`` of an active-channel list: ``(channel ids as int64, ok)``."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    return tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64), ok


@triton.jit
def _store_output(acc, k, k_ok, m_ok, nb, p, q, scale_ptr, shift_ptr, y_ptr, syn, syk, syp, syq,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Epilogue: ``acc * scale[k] + shift[k]``, stored at ``y[n, k, p, q]``."""
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    y_off = (nb.to(tl.int64) * syn + p.to(tl.int64) * syp + q.to(tl.int64) * syq)[:, None] + k[None, :] * syk
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _input_tap(m_ok, nb, p, q, r, s, H, W, sxn, sxh, sxw, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W):
    """Where output pixel ``(n, p, q)`` reads tap ``(r, s)``: ``(in bounds, x offset without channel)``."""
    h = p * STRIDE_H - PAD_H + r * DIL_H
    wc = q * STRIDE_W - PAD_W + s * DIL_W
    ok = m_ok & (h >= 0) & (h < H) & (wc >= 0) & (wc < W)
    return ok, nb.to(tl.int64) * sxn + h.to(tl.int64) * sxh + wc.to(tl.int64) * sxw


@triton.jit
def _output_tap(m_ok, nb, h, wc, r, s, P, Q, sdn, sdp, sdq, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W):
    """Which output pixel reads input ``(n, h, w)`` through tap ``(r, s)``, if any:
    ``(exists, dy offset without channel)``."""
    ph = h + PAD_H - r * DIL_H
    qw = wc + PAD_W - s * DIL_W
    p = tl.where(ph >= 0, ph, 0) // STRIDE_H
    q = tl.where(qw >= 0, qw, 0) // STRIDE_W
    ok = m_ok & (ph >= 0) & (ph % STRIDE_H == 0) & (p < P) & (qw >= 0) & (qw % STRIDE_W == 0) & (q < Q)
    return ok, nb.to(tl.int64) * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq


@triton.jit
def _masked_weight(w_ptr, m_ptr, off, ok, t):
    """Load a weight tile with its ω mask applied: ``w * mask * (|w| - t >= 0)``."""
    wv = tl.load(w_ptr + off, mask=ok, other=0.0)
    mv = tl.load(m_ptr + off, mask=ok, other=0.0)
    keep = ((tl.abs(wv.to(tl.float32)) - t) >= 0) & (mv != 0)
    return tl.where(keep, wv * mv, 0.0).to(wv.dtype)


@triton.jit
def _conv_fwd(x_ptr, w_ptr, m_ptr, t_ptr, scale_ptr, shift_ptr, in_idx_ptr, out_idx_ptr, y_ptr,
              M, P, Q, H, W, n_in, n_out,
              sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syk, syp, syq,
              STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
              R: tl.constexpr, S: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    m_ok, nb, p, q = _pixels(tl.program_id(0), M, P, Q, BLOCK_M)
    k, j_ok = _channel_tile(out_idx_ptr, tl.program_id(1), n_out, BLOCK_N)
    t = tl.load(t_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        for s in range(S):
            pix_ok, x_row = _input_tap(m_ok, nb, p, q, r, s, H, W, sxn, sxh, sxw,
                                          STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            for c0 in range(0, tl.cdiv(n_in, BLOCK_K)):
                c, c_ok = _channel_tile(in_idx_ptr, c0, n_in, BLOCK_K)
                a = tl.load(x_ptr + x_row[:, None] + c[None, :] * sxc,
                            mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
                w_off = k[None, :] * swk + c[:, None] * swc + r * swr + s * sws
                wv = _masked_weight(w_ptr, m_ptr, w_off, c_ok[:, None] & j_ok[None, :], t)
                acc += tl.dot(a, wv, input_precision=PRECISION)
    _store_output(acc, k, j_ok, m_ok, nb, p, q, scale_ptr, shift_ptr, y_ptr, syn, syk, syp, syq, HAS_SCALE, HAS_SHIFT)


@triton.jit
def _dw_fwd(x_ptr, w_ptr, m_ptr, t_ptr, scale_ptr, shift_ptr, idx_ptr, y_ptr,
            M, P, Q, H, W, n_act,
            sxn, sxc, sxh, sxw, swk, swr, sws, syn, syk, syp, syq,
            STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
            R: tl.constexpr, S: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    m_ok, nb, p, q = _pixels(tl.program_id(0), M, P, Q, BLOCK_M)
    c, j_ok = _channel_tile(idx_ptr, tl.program_id(1), n_act, BLOCK_C)
    t = tl.load(t_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r in range(R):
        for s in range(S):
            pix_ok, x_row = _input_tap(m_ok, nb, p, q, r, s, H, W, sxn, sxh, sxw,
                                          STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            a = tl.load(x_ptr + x_row[:, None] + c[None, :] * sxc, mask=pix_ok[:, None] & j_ok[None, :], other=0.0)
            wv = _masked_weight(w_ptr, m_ptr, c * swk + r * swr + s * sws, j_ok, t)
            acc += a.to(tl.float32) * wv.to(tl.float32)[None, :]
    _store_output(acc, c, j_ok, m_ok, nb, p, q, scale_ptr, shift_ptr, y_ptr, syn, syk, syp, syq, HAS_SCALE, HAS_SHIFT)


@triton.jit
def _conv_dgrad(dy_ptr, w_ptr, m_ptr, t_ptr, scale_ptr, in_idx_ptr, out_idx_ptr, dx_ptr,
                MX, H, W, P, Q, n_in, n_out,
                sdn, sdk, sdp, sdq, swk, swc, swr, sws, sxn, sxc, sxh, sxw,
                STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                R: tl.constexpr, S: tl.constexpr, HAS_SCALE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """dx[n, c, h, w] = Σ_{k, r, s} dy[n, k, p, q] * scale[k] * W_eff[k, c, r, s] over active k."""
    m_ok, nb, h, wc = _pixels(tl.program_id(0), MX, H, W, BLOCK_M)
    c, j_ok = _channel_tile(in_idx_ptr, tl.program_id(1), n_in, BLOCK_N)
    t = tl.load(t_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        for s in range(S):
            pix_ok, dy_row = _output_tap(m_ok, nb, h, wc, r, s, P, Q, sdn, sdp, sdq,
                                           STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            for k0 in range(0, tl.cdiv(n_out, BLOCK_K)):
                k, k_ok = _channel_tile(out_idx_ptr, k0, n_out, BLOCK_K)
                g = tl.load(dy_ptr + dy_row[:, None] + k[None, :] * sdk, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_SCALE:
                    sc = tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                    g = (g.to(tl.float32) * sc[None, :]).to(g.dtype)
                w_off = k[:, None] * swk + c[None, :] * swc + r * swr + s * sws
                wv = _masked_weight(w_ptr, m_ptr, w_off, k_ok[:, None] & j_ok[None, :], t)
                acc += tl.dot(g, wv, input_precision=PRECISION)
    dx_off = (nb.to(tl.int64) * sxn + h.to(tl.int64) * sxh + wc.to(tl.int64) * sxw)[:, None] + c[None, :] * sxc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & j_ok[None, :])


@triton.jit
def _dw_dgrad(dy_ptr, w_ptr, m_ptr, t_ptr, scale_ptr, idx_ptr, dx_ptr,
              MX, H, W, P, Q, n_act,
              sdn, sdk, sdp, sdq, swk, swr, sws, sxn, sxc, sxh, sxw,
              STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
              R: tl.constexpr, S: tl.constexpr, HAS_SCALE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    m_ok, nb, h, wc = _pixels(tl.program_id(0), MX, H, W, BLOCK_M)
    c, j_ok = _channel_tile(idx_ptr, tl.program_id(1), n_act, BLOCK_C)
    t = tl.load(t_ptr)
    sc = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c, mask=j_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r in range(R):
        for s in range(S):
            pix_ok, dy_row = _output_tap(m_ok, nb, h, wc, r, s, P, Q, sdn, sdp, sdq,
                                           STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            g = tl.load(dy_ptr + dy_row[:, None] + c[None, :] * sdk, mask=pix_ok[:, None] & j_ok[None, :], other=0.0)
            wv = _masked_weight(w_ptr, m_ptr, c * swk + r * swr + s * sws, j_ok, t)
            acc += g.to(tl.float32) * (wv.to(tl.float32) * sc)[None, :]
    dx_off = (nb.to(tl.int64) * sxn + h.to(tl.int64) * sxh + wc.to(tl.int64) * sxw)[:, None] + c[None, :] * sxc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & j_ok[None, :])


@triton.jit
def _conv_wgrad(dy_ptr, x_ptr, in_idx_ptr, out_idx_ptr, g_ptr,
                M, P, Q, H, W, n_in, n_out, rows_per_split,
                sdn, sdk, sdp, sdq, sxn, sxc, sxh, sxw, sgk, sgc,
                STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                R: tl.constexpr, S: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """G[k, c, r, s] += Σ_{(n,p,q) in this split} dy[n, k, p, q] * x[n, c, h, w] (fp32 atomics)."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_z = tl.program_id(2)
    rs = pid_z % (R * S)
    split = pid_z // (R * S)
    r = rs // S
    s = rs % S
    k, k_ok = _channel_tile(out_idx_ptr, pid_k, n_out, BLOCK_K)
    c, c_ok = _channel_tile(in_idx_ptr, pid_c, n_in, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        m_ok, nb, p, q = _pixels(m0 // BLOCK_M, stop, P, Q, BLOCK_M)
        pix_ok, x_row = _input_tap(m_ok, nb, p, q, r, s, H, W, sxn, sxh, sxw,
                                          STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
        dy_row = nb.to(tl.int64) * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq
        g = tl.load(dy_ptr + dy_row[None, :] + k[:, None] * sdk, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        a = tl.load(x_ptr + x_row[:, None] + c[None, :] * sxc, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.dot(g, a, input_precision=PRECISION)
    g_off = k[:, None] * sgk + c[None, :] * sgc + rs
    tl.atomic_add(g_ptr + g_off, acc, mask=k_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_wgrad(dy_ptr, x_ptr, idx_ptr, g_ptr,
              M, P, Q, H, W, n_act, rows_per_split,
              sdn, sdk, sdp, sdq, sxn, sxc, sxh, sxw, sgk,
              STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
              R: tl.constexpr, S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """G[c, 0, r, s] += Σ_{(n,p,q) in this split} dy[n, c, p, q] * x[n, c, h, w]."""
    pid_c = tl.program_id(0)
    pid_z = tl.program_id(1)
    rs = pid_z % (R * S)
    split = pid_z // (R * S)
    r = rs // S
    s = rs % S
    c, j_ok = _channel_tile(idx_ptr, pid_c, n_act, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BLOCK_M):
        m_ok, nb, p, q = _pixels(m0 // BLOCK_M, stop, P, Q, BLOCK_M)
        pix_ok, x_row = _input_tap(m_ok, nb, p, q, r, s, H, W, sxn, sxh, sxw,
                                          STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
        dy_row = nb.to(tl.int64) * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq
        g = tl.load(dy_ptr + dy_row[:, None] + c[None, :] * sdk, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        a = tl.load(x_ptr + x_row[:, None] + c[None, :] * sxc, mask=pix_ok[:, None] & j_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32) * a.to(tl.float32), axis=0)
    tl.atomic_add(g_ptr + c * sgk + rs, acc, mask=j_ok)


@triton.jit
def _weight_epilogue(g_ptr, w_ptr, m_ptr, t_ptr, scale_ptr, in_idx_ptr, out_idx_ptr,
                     dw_ptr, dt_ptr, dscale_ptr,
                     n_in, n_out, swk, swc,
                     RS: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """From G: dw (step estimator), dt = -Σ d·w and dscale[k] = <W_eff[k], G[k]>.

    With ``x = |w| - t``, ``keep = mask·1[x >= 0]``, ``dW_eff = G·scale[k]`` and
    ``d = dW_eff·mask·S'(x)``: ``dw = dW_eff·keep + d·|w|`` (as ``granular.gates.masked_weight``).
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < n_out
    k = tl.load(out_idx_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < n_in * RS
    ci = col // RS
    rs = col % RS
    c = tl.load(in_idx_ptr + ci, mask=col_ok, other=0).to(tl.int64)
    ok = k_ok[:, None] & col_ok[None, :]
    off = k[:, None] * swk + c[None, :] * swc + rs[None, :]
    g = tl.load(g_ptr + off, mask=ok, other=0.0)
    wv = tl.load(w_ptr + off, mask=ok, other=0.0).to(tl.float32)
    mv = tl.load(m_ptr + off, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr).to(tl.float32)
    aw = tl.abs(wv)
    xs = aw - t
    keep = tl.where((xs >= 0) & (mv != 0), mv, 0.0)
    ax = tl.abs(xs)
    step = tl.where(ax <= 1.0, tl.maximum(2.0 - 4.0 * ax, 0.4), 0.0)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        dweff = g * sc[:, None]
        tl.atomic_add(dscale_ptr + k, tl.sum(wv * keep * g, axis=1), mask=k_ok)
    else:
        dweff = g
    d = dweff * mv * step
    dw = dweff * keep + d * aw
    tl.store(dw_ptr + off, dw.to(dw_ptr.dtype.element_ty), mask=ok)
    tl.atomic_add(dt_ptr, -tl.sum(tl.sum(d * wv, axis=1), axis=0))
