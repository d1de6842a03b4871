"""``GatedConv2d``: the module ``fuse_kernels`` puts where a gated conv pattern was.

It owns no parameters or buffers: every tensor (weight, thresholds, gate parameters, stored
masks) arrives as a graph input from the gated graph's own ``get_attr`` nodes, so the fused
graph trains the same parameters and its state dict is unchanged. The module holds the
conv geometry and the structure of the masks that decide which channels are *hard* zero:

- ``out_masks``: stored masks of gates downstream of the conv (after its BatchNorm, or in
  the epilogue). A 0 there multiplies the channel by exactly 0 in train and eval mode, and
  blocks its gradient, so the conv need not compute it.
- ``in_zero``: an AND of ORs of stored masks upstream of the input (``relu(Σ_i gate_i)``):
  input channel ``c`` is exactly zero when every addend has some mask 0 at ``c``.

Active channel lists are rebuilt only when a mask changes (each tensor's in-place version
counter says so), so the forward pass has no host sync between pruning rounds.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from granular.gates import gate_value

__all__ = ["GatedConv2d"]


class GatedConv2d(nn.Module):
    """Masked conv with optional epilogue gates, on hard-active channels only.

    Args:
        stride, padding, dilation, groups: the conv's geometry (groups 1 or depthwise).
        epilogue: gate kinds fused into the epilogue, in order (``"filter"``, ``"op"``).
        use_kernel: force the Triton op (True) or the reference (False); default: Triton where
            it can run (``granular.kernels.kernels_available``).
    """

    def __init__(self, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                 epilogue: Sequence[str] = (), use_kernel: Optional[bool] = None):
        super().__init__()
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups
        self.epilogue = tuple(epilogue)
        self.use_kernel = use_kernel
        self._index_cache: dict = {}   # mask versions -> (in_idx, out_idx); a cache, not state

    def extra_repr(self) -> str:
        return (f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"epilogue={self.epilogue}")

    def active_channels(self, x: torch.Tensor, w: torch.Tensor, wmask: torch.Tensor, has_shift: bool,
                        out_masks: Sequence[torch.Tensor], in_zero: Sequence[Sequence[torch.Tensor]]):
        """``(in_idx, out_idx)``: int32 lists of the channels that can be non-zero."""
        tensors = [wmask, *out_masks, *(m for clause in in_zero for m in clause)]
        key = (has_shift, tuple((id(m), m.data_ptr(), m._version) for m in tensors))
        hit = self._index_cache.get("key") == key
        if hit:
            return self._index_cache["value"]
        k, c = w.shape[0], x.shape[1]
        live_w = wmask != 0
        out_ok = torch.ones(k, dtype=torch.bool, device=w.device)
        for m in out_masks:
            out_ok &= (m != 0).expand(k)
        in_zero_c = torch.zeros(c, dtype=torch.bool, device=w.device) if not in_zero else \
            torch.ones(c, dtype=torch.bool, device=w.device)
        for clause in in_zero:
            z = torch.zeros(c, dtype=torch.bool, device=w.device)
            for m in clause:
                z |= (m == 0).expand(c)
            in_zero_c &= z
        if w.shape[1] == 1 and self.groups > 1:   # depthwise: one list for both sides
            row_live = live_w.flatten(1).any(1)
            if not has_shift:
                out_ok &= row_live & ~in_zero_c
            in_ok = out_ok
        else:
            in_ok = ~in_zero_c & (live_w & out_ok.view(-1, 1, 1, 1)).any(dim=(0, 2, 3))
            if not has_shift:
                out_ok &= (live_w & in_ok.view(1, -1, 1, 1)).flatten(1).any(1)
        value = (in_ok.nonzero().flatten().to(torch.int32), out_ok.nonzero().flatten().to(torch.int32))
        self._index_cache = {"key": key, "value": value}
        return value

    def forward(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], t_omega: Optional[torch.Tensor],
                wmask: Optional[torch.Tensor], gates: Sequence[Sequence[torch.Tensor]] = (),
                out_masks: Sequence[torch.Tensor] = (), in_zero: Sequence[Sequence[torch.Tensor]] = ()) -> torch.Tensor:
        """``gates``: ``(param, threshold, stored mask, gain)`` per epilogue gate, in ``self.epilogue``
        order; ``t_omega`` is already on the weight's scale (``t_ω · WeightMask.scale``)."""
        from granular.kernels import masked_conv2d

        if wmask is None:
            wmask = torch.ones_like(w)
        if t_omega is None or not self.training:   # eval: the stored mask alone, as WeightMask does
            t = torch.full((), float("-inf"), device=w.device, dtype=torch.float32)
        else:
            t = t_omega
        scale = None
        for param, thr, mask, gain in gates:
            g = gate_value(param, thr, mask, self.training, gain)
            scale = g if scale is None else scale * g
        if scale is not None and scale.dim() == 0:
            scale = scale.expand(w.shape[0])
        shift = None
        if bias is not None:
            shift = bias * scale if scale is not None else bias
        gate_masks = [g[2] for g in gates]
        in_idx, out_idx = self.active_channels(x, w, wmask, shift is not None, [*gate_masks, *out_masks], in_zero)
        return masked_conv2d(x, w, t, wmask, scale, shift, in_idx=in_idx, out_idx=out_idx, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, groups=self.groups,
                             use_kernel=self.use_kernel)
