"""Kernel equality (docs/design.md, invariant 5): the Triton masked conv against its reference twin.

Without CUDA the kernels run in triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay tiny: every program instance costs about 0.5 ms.
"""

import pytest
import torch
import torch.nn.functional as F

from granular.gates import WeightMask
from granular.kernels import has_triton, masked_conv2d, masked_conv2d_reference

pytestmark = pytest.mark.skipif(not has_triton(), reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (kernel size, stride, padding, dilation, depthwise)
GEOMETRIES = {
    "3x3": (3, 1, 1, 1, False),
    "3x3-stride2": (3, 2, 1, 1, False),
    "3x3-dilation2": (3, 1, 2, 2, False),
    "5x5": (5, 1, 2, 1, False),
    "1x1": (1, 1, 0, 1, False),
    "1x1-stride2": (1, 2, 0, 1, False),
    "dw3x3": (3, 1, 1, 1, True),
    "dw3x3-stride2": (3, 2, 1, 1, True),
    "dw3x3-dilation2": (3, 1, 2, 2, True),
    "dw5x5": (5, 1, 2, 1, True),
    "dw5x5-dilation2-stride2": (5, 2, 4, 2, True),
}


def _case(geometry, dtype=torch.float32, keep_in=0.6, keep_out=0.6, epilogue=True, seed=0):
    k, stride, pad, dil, dw = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = 2, 6, 7, 7
    cout = c if dw else 5
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(cout, 1 if dw else c, k, k, generator=g)
    wmask = (torch.rand(wt.shape, generator=g) > 0.3).float()
    t = torch.tensor(0.4)   # some weights fall below the live threshold, some near it (estimator band)
    scale = torch.rand(cout, generator=g) + 0.1 if epilogue else None
    shift = torch.randn(cout, generator=g) if epilogue else None
    out_idx = torch.randperm(cout, generator=g)[:round(keep_out * cout)].sort().values.int()
    in_idx = torch.randperm(c, generator=g)[:round(keep_in * c)].sort().values.int()
    dy = torch.randn(n, cout, (h + 2 * pad - dil * (k - 1) - 1) // stride + 1,
                     (w + 2 * pad - dil * (k - 1) - 1) // stride + 1, generator=g)
    tensors = dict(x=x, w=wt, t=t, scale=scale, shift=shift)
    tensors = {name: (v.to(DEVICE, dtype if name in ("x", "w") else torch.float32).requires_grad_()
                      if v is not None else None) for name, v in tensors.items()}
    conv = dict(in_idx=in_idx.to(DEVICE), out_idx=out_idx.to(DEVICE), stride=(stride, stride),
                padding=(pad, pad), dilation=(dil, dil), groups=c if dw else 1)
    return tensors, wmask.to(DEVICE, dtype), dy.to(DEVICE, dtype), conv


def _forward_backward(fn, tensors, wmask, dy, conv, upcast=False):
    ins = {k: (v.detach().double() if upcast and v is not None and k in ("x", "w") else
               v.detach() if v is not None else None) for k, v in tensors.items()}
    for v in ins.values():
        if v is not None:
            v.requires_grad_()
    m = wmask.double() if upcast else wmask
    y = fn(ins["x"], ins["w"], ins["t"], m, ins["scale"], ins["shift"], **conv)
    (y * (dy.double() if upcast else dy)).sum().backward()
    grads = {k: v.grad for k, v in ins.items() if v is not None}
    return y.detach(), grads


def _kernel(*args, **kw):
    return masked_conv2d(*args, use_kernel=True, **kw)


def _reference(x, w, t, wmask, scale, shift, **kw):
    return masked_conv2d_reference(x, w, t, wmask, scale, shift, kw["in_idx"].long(), kw["out_idx"].long(),
                                   kw["stride"], kw["padding"], kw["dilation"], kw["groups"])


def _assert_close(a, b, dtype, what):
    scale = b.abs().max().item() + 1e-6
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert (a.double() - b.double()).abs().max().item() <= tol * scale + 1e-6, what


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_kernel_matches_reference_forward_and_backward(geometry):
    tensors, wmask, dy, conv = _case(geometry)
    y_k, g_k = _forward_backward(_kernel, tensors, wmask, dy, conv)
    y_r, g_r = _forward_backward(_reference, tensors, wmask, dy, conv)
    _assert_close(y_k, y_r, torch.float32, "forward")
    for name in g_r:
        _assert_close(g_k[name], g_r[name], torch.float32, f"d{name}")
    # skipped output channels are exactly zero, and so is every gradient on a skipped weight
    skipped = sorted(set(range(y_k.shape[1])) - set(conv["out_idx"].tolist()))
    assert skipped, "each case prunes some output channels"
    assert y_k[:, skipped].abs().max().item() == 0
    assert g_k["w"][skipped].abs().max().item() == 0


@pytest.mark.parametrize("geometry", ["3x3", "dw3x3-stride2"])
@pytest.mark.parametrize("keep", [(0.0, 0.6), (0.6, 0.0), (1.0, 1.0)], ids=["no-inputs", "no-outputs", "dense"])
def test_fully_pruned_and_dense_channel_lists(geometry, keep):
    tensors, wmask, dy, conv = _case(geometry, keep_in=keep[0], keep_out=keep[1], seed=1)
    y_k, g_k = _forward_backward(_kernel, tensors, wmask, dy, conv)
    y_r, g_r = _forward_backward(_reference, tensors, wmask, dy, conv)
    _assert_close(y_k, y_r, torch.float32, "forward")
    for name in g_r:
        _assert_close(g_k[name], g_r[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("geometry", ["3x3-stride2", "dw5x5"])
def test_fp16_matches_a_float64_reference(geometry):
    tensors, wmask, dy, conv = _case(geometry, dtype=torch.float16, seed=2)
    y_k, g_k = _forward_backward(_kernel, tensors, wmask, dy, conv)
    y_r, g_r = _forward_backward(_reference, tensors, wmask, dy, conv, upcast=True)
    assert y_k.dtype == torch.float16 and g_k["x"].dtype == torch.float16
    _assert_close(y_k, y_r, torch.float16, "forward")
    for name in ("x", "w", "scale", "shift"):
        _assert_close(g_k[name], g_r[name], torch.float16, f"d{name}")


@pytest.mark.parametrize("geometry", ["3x3-stride2", "dw3x3"])
def test_reference_is_the_eager_gated_conv_on_live_channels(geometry):
    """The oracle itself: on inputs that are zero on skipped channels, it is the eager
    composite ``conv2d(x, WeightMask(w)) * scale + shift`` with skipped outputs zeroed, and its
    parameter gradients are the eager ones wherever the stored masks let any through."""
    tensors, wmask, dy, conv = _case(geometry, seed=3)
    dw = conv["groups"] > 1
    x = tensors["x"].detach().clone()
    dead_in = sorted(set(range(x.shape[1])) - set((conv["out_idx"] if dw else conv["in_idx"]).tolist()))
    x[:, dead_in] = 0
    tensors["x"] = x.requires_grad_()
    y_r, g_r = _forward_backward(_reference, tensors, wmask, dy, conv)

    ins = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    gate = WeightMask(ins["w"].shape).to(DEVICE)
    gate.mask.copy_(wmask)
    z = F.conv2d(ins["x"], gate(ins["w"], ins["t"]), None, conv["stride"], conv["padding"], conv["dilation"],
                 conv["groups"])
    y = z * ins["scale"].view(1, -1, 1, 1) + ins["shift"].view(1, -1, 1, 1)
    live = torch.zeros(y.shape[1], device=DEVICE)
    live[conv["out_idx"].long()] = 1
    y = y * live.view(1, -1, 1, 1)
    (y * dy).sum().backward()
    _assert_close(y_r, y.detach(), torch.float32, "forward")
    for name in ("w", "t", "scale", "shift"):
        _assert_close(g_r[name], ins[name].grad, torch.float32, f"d{name}")


def test_op_is_registered_with_a_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import granular.kernels.ops  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        x = torch.empty(2, 6, 9, 9)
        w = torch.empty(5, 6, 3, 3)
        idx = torch.arange(3, dtype=torch.int32)
        y = torch.ops.granular.masked_conv2d(x, w, torch.empty(()), torch.empty(5, 6, 3, 3), None, None, idx, idx,
                                             [2, 2], [1, 1], [1, 1], 1)
    assert tuple(y.shape) == (2, 5, 5, 5)


@pytest.fixture
def no_tf32():
    """fp32 convs and dots in full precision on both sides, restored afterwards."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_compiled_kernel_matches_reference_on_gpu_shapes(geometry, no_tf32):
    """On a GPU the compiled kernels (not the interpreter) against the reference at sizes that
    span several tiles; TF32 is off (the kernels follow cudnn.allow_tf32) so fp32 tolerances hold."""
    k, stride, pad, dil, dw = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 8, 96, 20, 20
    x = torch.randn(n, c, h, w, generator=g).cuda().requires_grad_()
    wt = torch.randn(c if dw else 80, 1 if dw else c, k, k, generator=g).cuda().requires_grad_()
    wmask = (torch.rand(wt.shape, generator=g) > 0.3).float().cuda()
    t = torch.tensor(0.4, device="cuda", requires_grad=True)
    out_idx = torch.nonzero(torch.rand(wt.shape[0], generator=g) < 0.5).flatten().int().cuda()
    in_idx = torch.nonzero(torch.rand(c, generator=g) < 0.5).flatten().int().cuda()
    conv = dict(in_idx=in_idx, out_idx=out_idx, stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil),
                groups=c if dw else 1)
    dy = None
    outs = []
    for fn in (_kernel, _reference):
        for v in (x, wt, t):
            v.grad = None
        y = fn(x, wt, t, wmask, None, None, **conv)
        dy = torch.randn_like(y) if dy is None else dy
        (y * dy).sum().backward()
        outs.append((y.detach(), x.grad.clone(), wt.grad.clone(), t.grad.clone()))
    for a, b in zip(*outs):
        _assert_close(a, b, torch.float32, "gpu")
