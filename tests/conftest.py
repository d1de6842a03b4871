"""Shared test configuration.

Its presence puts ``tests/`` on ``sys.path`` (pytest's default import mode), which is how the
test modules in sub-folders import the shared builders in ``tests/_models.py``.
"""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set before any test imports
# granular.kernels.ops. Without CUDA, the kernels then run on CPU tensors in triton's interpreter
# (docs/kernels.md, "Testing without a GPU"). It changes nothing else: fuse_kernels' default still fuses only on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
