"""Gate modules: the α (operation), β (filter) and ω (weight) discretisation functions.

For a scaled granularity parameter g and a learned threshold t, MG-DARTS (``docs/method.md``) uses
``M(g) = S(|g| - t) * g`` where S is a hard unit step whose gradient is the long-tailed
estimator of Dynamic Sparse Training (Liu et al., ICLR 2020)::

    dS/dx ~= 2 - 4|x|  if |x| <= 0.4;   0.4  if 0.4 < |x| <= 1;   0 otherwise

Each gate also multiplies by a stored 0/1 mask (a buffer) that pruning rounds refresh.

Training mode computes ``stored * S(|g| - t) * g``: the live threshold acts on every
forward pass, so thresholds get gradients. Eval mode computes ``stored * g``: it is the
architecture committed at the last pruning round, the one ``export`` produces and
``count_params`` counts. Between rounds the two can differ by the units whose live mask has
dropped but which the next round has not yet removed.

Gates are modules so that they know the training mode and show as ``call_module`` nodes in
``print(gm.code)``. Thresholds are shared by all gates of one op (one ``t_β`` and one ``t_ω``
per op), so they live in a :class:`Scope` and reach the gates as ``get_attr`` inputs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "long_tailed_step", "step_grad", "gate_value", "masked_weight", "gate_reference", "weight_mask_reference", "OpGate", "FilterGate", "WeightMask", "Scope", "GateBank",
    "GATE_ROOT",
]

GATE_ROOT = "granular_gates"  # attribute of the GraphModule that holds every gate


def step_grad(x: torch.Tensor) -> torch.Tensor:
    """The long-tailed estimator's derivative of the unit step at ``x``."""
    return _step_grad_(x.clone())


def _step_grad_(x: torch.Tensor) -> torch.Tensor:
    """:func:`step_grad` computed in ``x``'s own storage (``x`` must be a fresh buffer): the
    fused gates' backward, with one allocation. 2 - 4|x| falls below 0.4 exactly where
    |x| > 0.4, so one clamp gives both inner pieces; outside |x| <= 1 it is 0."""
    ax = x.abs_()
    outside = ax > 1.0
    return ax.mul_(-4.0).add_(2.0).clamp_min_(0.4).masked_fill_(outside, 0.0)


class _LongTailedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        # x == 0 counts as kept: the "min" threshold rule puts the smallest unit exactly there.
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * step_grad(x)


def long_tailed_step(x: torch.Tensor) -> torch.Tensor:
    """Unit step ``1[x >= 0]`` with the long-tailed gradient estimator."""
    return _LongTailedStep.apply(x)


class _SigmoidGate(torch.autograd.Function):
    """``gain * stored * S(σ(a) - t) * σ(a)`` as one autograd node (σ(a) > 0, so |σ(a)| = σ(a)).

    Fused because a super-net has thousands of gates on small tensors, where the autograd
    bookkeeping of the five elementwise ops would cost more than the arithmetic. The
    constant ``gain`` (see :func:`gate_value`) folds into the stored mask here, so it costs
    no autograd node of its own.
    """

    @staticmethod
    def forward(ctx, a, t, mask, gain=None):
        s = torch.sigmoid(a)
        x = s - t
        keep = x >= 0
        if gain is not None:
            mask = mask * gain
        ctx.save_for_backward(s, x, keep, mask)
        return torch.where(keep, s * mask, 0.0)

    @staticmethod
    def backward(ctx, grad):
        s, x, keep, mask = ctx.saved_tensors
        gm = grad * mask
        ds = _step_grad_(x.clone()).mul_(s)           # d/dx of S, times σ(a)
        grad_t = -torch.dot(gm.reshape(-1), ds.reshape(-1)).reshape(()) if ctx.needs_input_grad[1] else None
        grad_a = torch.ops.aten.sigmoid_backward(ds.add_(keep).mul_(gm), s)   # · σ(a)(1 - σ(a))
        return grad_a, grad_t, None, None


class _MaskedWeight(torch.autograd.Function):
    """``stored * S(|w| - t) * w`` as one autograd node (see :class:`_SigmoidGate`).

    It runs on every masked weight at every step, so it is written for memory traffic: the
    forward saves only the keep-mask beside its inputs, and the backward builds the estimator
    in one buffer, in place (2.3x faster than the plain formula on an 11M-weight tensor, on
    two CPU cores)."""

    @staticmethod
    def forward(ctx, w, t, mask, scale=None):
        if scale is not None:   # the threshold's scale, folded in here: no autograd node of its own
            t = t * scale
        keep = torch.where(w.abs() >= t, mask, 0.0)   # |w| >= t exactly when |w| - t >= 0
        ctx.save_for_backward(w, t, mask, keep, scale)
        return w * keep

    @staticmethod
    def backward(ctx, grad):
        w, t, mask, keep, scale = ctx.saved_tensors
        aw = w.abs()
        d = _step_grad_(aw - t).mul_(mask).mul_(grad)     # grad · mask · S'(|w| - t)
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = -torch.dot(d.reshape(-1), w.reshape(-1)).reshape(())
            if scale is not None:
                grad_t = grad_t * scale
        grad_w = d.mul_(aw).addcmul_(grad, keep) if ctx.needs_input_grad[0] else None
        return grad_w, grad_t, None, None


def gate_value(a: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, training: bool,
               gain: torch.Tensor | None = None):
    """The scaled gate ``gain · M(σ(a))``: thresholded in training, stored mask only in eval.
    The gates use it, and so does the fused kernel module (:mod:`granular.kernels.module`).

    ``gain`` is a constant (a buffer): 1 keeps the paper's gate, which starts at σ(0) = 0.5;
    2 makes the gate start as the identity of the model it wraps, so a trained model keeps
    its function when it is prepared. Thresholds always compare σ(a), not the product."""
    if training:
        return _SigmoidGate.apply(a, t, mask, gain)
    g = torch.sigmoid(a) * mask
    return g if gain is None else g * gain


def masked_weight(w: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``stored * S(|w| - t·scale) * w`` with the long-tailed gradient, as one autograd node:
    the training-mode ω mask, which the kernels' reference twin also applies. ``scale`` is a
    constant (no gradient)."""
    return _MaskedWeight.apply(w, t, mask, scale)


def gate_reference(a: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unfused ``mask * S(|σ(a)| - t) * σ(a)``, the formula as written (tests compare to it)."""
    g = torch.sigmoid(a)
    return long_tailed_step(g.abs() - t) * g * mask


def weight_mask_reference(w: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unfused ``mask * S(|w| - t) * w``."""
    return long_tailed_step(w.abs() - t) * w * mask


class OpGate(nn.Module):
    """α gate: scales one operation's output by ``M(σ(α))`` before it joins its sum."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))
        self.register_buffer("mask", torch.ones(()))
        self.register_buffer("gain", torch.ones(()))

    def value(self, t_alpha: torch.Tensor) -> torch.Tensor:
        return gate_value(self.alpha, t_alpha, self.mask, self.training, self.gain)

    def eval_value(self) -> torch.Tensor:
        """The committed gate value (what eval mode multiplies by), without gradient."""
        return (torch.sigmoid(self.alpha) * self.mask * self.gain).detach()

    def forward(self, x: torch.Tensor, t_alpha: torch.Tensor) -> torch.Tensor:
        return x * self.value(t_alpha)


class FilterGate(nn.Module):
    """β gate: scales each output channel of a layer by ``M(σ(β_c))``, after its BN.

    ``channels_last``: the channels are the last dim (a linear layer on tokens, or a
    ConvNeXt MLP), not dim 1."""

    def __init__(self, channels: int, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("mask", torch.ones(channels))
        self.register_buffer("gain", torch.ones(()))

    def value(self, t_beta: torch.Tensor) -> torch.Tensor:
        return gate_value(self.beta, t_beta, self.mask, self.training, self.gain)

    def eval_value(self) -> torch.Tensor:
        """The committed gate values (what eval mode multiplies by), without gradient."""
        return (torch.sigmoid(self.beta) * self.mask * self.gain).detach()

    def forward(self, x: torch.Tensor, t_beta: torch.Tensor) -> torch.Tensor:
        g = self.value(t_beta)
        if self.channels_last:
            return x * g
        return x * g.view((1, -1) + (1,) * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"{self.beta.numel()}, channels_last={self.channels_last}"


class WeightMask(nn.Module):
    """ω mask: ``M(ω) = S(|ω| - t_ω · scale) * ω`` applied to a layer's weight before the layer.

    ``scale`` (a buffer set with the thresholds: the model's mean kept ``|ω|`` by default, or
    the layer's with ``weight_scale="layer"``) puts ``t_ω`` on a normalised scale: ``t_ω = 0.3``
    prunes the weights under 0.3 of that mean, whatever the raw magnitudes. Without it λ could
    not move a raw ``t_ω`` far enough to prune (the weight granularity stayed inert)."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape))
        self.register_buffer("scale", torch.ones(()))

    def value(self, weight: torch.Tensor, t_omega: torch.Tensor) -> torch.Tensor:
        """The 0/1 keep-mask of ``weight`` (no gradient path; for accounting and rounds)."""
        if self.training:
            return (weight.abs() >= t_omega * self.scale).to(weight.dtype) * self.mask
        return self.mask

    def forward(self, weight: torch.Tensor, t_omega: torch.Tensor) -> torch.Tensor:
        if self.training:
            return masked_weight(weight, t_omega, self.mask, self.scale)
        return weight * self.mask


class Scope(nn.Module):
    """The thresholds of one threshold owner: an operation unit, or a layer outside any.

    ``t_alpha`` exists for operation units, ``t_beta``/``t_omega`` for owners of gated layers.
    """

    def __init__(self, *, op: bool, filters: bool, weights: bool):
        super().__init__()
        for name, present in (("t_alpha", op), ("t_beta", filters), ("t_omega", weights)):
            if present:
                setattr(self, name, nn.Parameter(torch.zeros(())))


class GateBank(nn.Module):
    """Container for every gate and threshold of a gated graph (``gm.granular_gates``)."""

    def __init__(self):
        super().__init__()
        self.scopes = nn.ModuleDict()
        self.op = nn.ModuleDict()
        self.filter = nn.ModuleDict()
        self.weight = nn.ModuleDict()
