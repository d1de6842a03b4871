"""Gate semantics: the long-tailed estimator and the fused gates against the formula."""

import pytest
import torch

from granular.gates import (OpGate, WeightMask, gate_value, gate_reference, long_tailed_step, step_grad,
                            weight_mask_reference)


def test_step_forward_is_a_hard_step_that_keeps_zero():
    x = torch.tensor([-1.0, -1e-6, 0.0, 1e-6, 2.0])
    assert long_tailed_step(x).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("x,expected", [(0.0, 2.0), (0.1, 1.6), (-0.25, 1.0), (0.4, 0.4), (-0.4, 0.4),
                                        (0.41, 0.4), (0.9, 0.4), (-1.0, 0.4), (1.01, 0.0), (-3.0, 0.0)])
def test_estimator_backward_matches_the_formula(x, expected):
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    long_tailed_step(t).backward()
    assert t.grad.item() == pytest.approx(expected, abs=1e-12)
    assert step_grad(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-12)


def _grads(fn, a, t, mask, upstream):
    a = a.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    y = fn(a, t, mask)
    ga, gt = torch.autograd.grad((y * upstream).sum(), (a, t))
    return y, ga, gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_filter_gate_matches_formula(seed):
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(64, generator=g, dtype=torch.float64)
    t = torch.tensor(0.45, dtype=torch.float64)
    mask = (torch.rand(64, generator=g) > 0.2).double()
    up = torch.randn(64, generator=g, dtype=torch.float64)

    y1, ga1, gt1 = _grads(lambda a, t, m: gate_value(a, t, m, training=True), beta, t, mask, up)
    y2, ga2, gt2 = _grads(gate_reference, beta, t, mask, up)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(ga1, ga2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt1, gt2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("training", [True, False])
def test_gain_scales_the_gate_and_its_gradients(training):
    """The identity start's gain of 2 multiplies the gate, forward and backward, in both modes."""
    g = torch.Generator().manual_seed(3)
    beta = torch.randn(32, generator=g, dtype=torch.float64)
    t = torch.tensor(0.45, dtype=torch.float64)
    mask = (torch.rand(32, generator=g) > 0.2).double()
    up = torch.randn(32, generator=g, dtype=torch.float64)
    gain = torch.tensor(2.0, dtype=torch.float64)
    ref = gate_reference if training else (lambda a, t, m: torch.sigmoid(a) * m)

    def value_and_grads(fn):
        a, tt = beta.clone().requires_grad_(True), t.clone().requires_grad_(True)
        y = fn(a, tt, mask)
        ga, gt = torch.autograd.grad((y * up).sum(), (a, tt), allow_unused=True)
        return y.detach(), ga, gt

    y1, ga1, gt1 = value_and_grads(lambda a, tt, m: gate_value(a, tt, m, training, gain))
    y2, ga2, gt2 = value_and_grads(lambda a, tt, m: 2 * ref(a, tt, m))
    torch.testing.assert_close(y1, y2, rtol=1e-15, atol=0)
    torch.testing.assert_close(ga1, ga2, rtol=1e-12, atol=1e-14)
    if training:
        torch.testing.assert_close(gt1, gt2, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(y1, ref(beta, t, mask))  # the gain did act


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1.0), (0, 0.37), (1, 2.5)])
def test_fused_weight_mask_matches_formula(seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 0.3
    t = torch.tensor(0.2, dtype=torch.float64)
    mask = (torch.rand(w.shape, generator=g) > 0.3).double()
    up = torch.randn(w.shape, generator=g, dtype=torch.float64)
    wm = WeightMask(w.shape).double().train()
    wm.mask.copy_(mask)
    wm.scale.fill_(scale)  # the threshold compares |w| with t_ω · scale, and its gradient carries the scale
    y1, gw1, gt1 = _grads(lambda a, t, m: wm(a, t), w, t, mask, up)
    y2, gw2, gt2 = _grads(lambda a, t, m: weight_mask_reference(a, t * scale, m), w, t, mask, up)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(gw1, gw2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt1, gt2, rtol=1e-12, atol=1e-14)


def test_op_gate_eval_uses_stored_mask_and_training_uses_threshold():
    gate = OpGate()
    t = torch.tensor(0.7)  # above σ(0) = 0.5: the live mask is 0
    x = torch.ones(3)
    gate.train()
    assert gate(x, t).abs().sum() == 0
    gate.eval()
    torch.testing.assert_close(gate(x, t), x * 0.5)
    gate.mask.zero_()
    assert gate(x, t).abs().sum() == 0
