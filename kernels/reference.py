"""``masked_conv2d_reference``: the pure-PyTorch twin of the fused masked, gated conv.

It defines what the Triton kernels compute, forward and backward, and is both the CPU path
and the test oracle (``docs/design.md``, invariant 5). Semantics, for ``K`` output channels::

    W_eff = w * wmask * S(|w| - t)                        # ω mask, step-estimator gradient
    y[:, k] = scale[k] * conv(x[:, in_idx], W_eff[k, in_idx]) + shift[k]   for k in out_idx
    y[:, k] = 0                                                            otherwise

``in_idx`` and ``out_idx`` are the *hard* active channel lists (stored masks; see
``granular.kernels.active``). Skipping the rest is exact wherever the skipped input
channels are exactly zero and the skipped output channels are multiplied by zero later,
and the gradients of every parameter stay exact: a skipped weight gets gradient zero, which
is what its stored zero mask gives it anyway (``docs/kernels.md``, "Gate gradients without saved outputs" and "What the op computes").

Depthwise convs (``groups == C_in == C_out``) use ``out_idx`` for both sides.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from granular.gates import masked_weight

__all__ = ["masked_conv2d_reference", "is_depthwise"]


def is_depthwise(x: torch.Tensor, w: torch.Tensor, groups: int) -> bool:
    """True for a depthwise conv (one input channel per group, as many outputs as inputs)."""
    return groups > 1 and groups == x.shape[1] == w.shape[0] and w.shape[1] == 1


def masked_conv2d_reference(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, wmask: torch.Tensor,
                            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                            in_idx: torch.Tensor, out_idx: torch.Tensor,
                            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                            groups: int) -> torch.Tensor:
    """Masked, gated conv2d on the active channels only (see the module docstring)."""
    weff = masked_weight(w, t, wmask)
    depthwise = is_depthwise(x, w, groups)
    if groups != 1 and not depthwise:
        raise ValueError(f"masked_conv2d supports groups=1 and depthwise convs, not groups={groups}")
    ws = weff.index_select(0, out_idx)
    if depthwise:
        xs = x.index_select(1, out_idx)
        g = max(len(out_idx), 1)
    else:
        xs = x.index_select(1, in_idx)
        ws = ws.index_select(1, in_idx)
        g = 1
    if xs.shape[1] == 0 or ws.shape[0] == 0:  # conv2d rejects empty channel dims
        n, _, h, wd = x.shape
        kh, kw = w.shape[2:]
        p = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        q = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        z = x.new_zeros(n, len(out_idx), p, q) + (ws.sum() + xs.sum()) * 0  # keeps the autograd link
    else:
        z = F.conv2d(xs, ws, None, tuple(stride), tuple(padding), tuple(dilation), g)
    if scale is not None:
        z = z * scale.index_select(0, out_idx).view(1, -1, 1, 1).to(z.dtype)
    if shift is not None:
        z = z + shift.index_select(0, out_idx).view(1, -1, 1, 1).to(z.dtype)
    y = z.new_zeros(z.shape[0], w.shape[0], z.shape[2], z.shape[3])
    return y.index_copy(1, out_idx.long(), z)
