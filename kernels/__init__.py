"""Triton kernels and their pure-PyTorch reference twins (the GPU hot path; see ``docs/kernels.md``).

Nothing here imports triton at import time, and ``import granular`` does not import this
package's kernels: :func:`masked_conv2d` loads ``granular.kernels.ops`` (which registers
``granular::masked_conv2d`` with torch.library) on first use, behind :func:`has_triton`.

- :func:`masked_conv2d`: the fused op where it can run (CUDA tensors, or any tensors under
  ``TRITON_INTERPRET=1``), else its reference twin. Both compute the same function.
- :func:`masked_conv2d_reference`: the twin (``granular/kernels/reference.py``).
- ``granular/kernels/triton_conv.py``: the kernels; ``granular/kernels/ops.py``: registration.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from granular.kernels.reference import is_depthwise, masked_conv2d_reference

__all__ = ["has_triton", "interpreting", "kernels_available", "masked_conv2d", "masked_conv2d_reference",
           "is_depthwise"]

@functools.lru_cache(None)
def has_triton() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with triton, or the interpreter."""
    if not has_triton():
        return False
    return interpreting() or torch.device(device).type == "cuda"


def masked_conv2d(x, w, t, wmask, scale=None, shift=None, *, in_idx, out_idx,
                  stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, use_kernel=None) -> torch.Tensor:
    """The masked, gated conv on active channels (see ``granular.kernels.reference``).

    Args:
        x: ``[N, C, H, W]`` input. w: ``[K, C/groups, R, S]`` weight; groups 1 or depthwise.
        t: scalar ω threshold (``-inf`` applies the stored mask only, as eval mode does).
        wmask: stored 0/1 weight mask, shaped like ``w``.
        scale, shift: optional per-output-channel epilogue (filter gate × op gate, bias).
        in_idx, out_idx: int32/int64 active channel lists.
        use_kernel: force the Triton op (True) or the reference (False); default: where it can run.
    """
    if use_kernel is None:
        use_kernel = kernels_available(x.device)
    args = (x, w, t, wmask, scale, shift, in_idx, out_idx, list(stride), list(padding), list(dilation), groups)
    if use_kernel:
        if not has_triton():
            raise RuntimeError("granular's fused conv needs triton; pip install 'granular[triton]'")
        from granular.kernels.ops import masked_conv2d_op  # registers granular::masked_conv2d on first use

        return masked_conv2d_op(*args)
    return masked_conv2d_reference(*args)
