"""Triton kernels and their pure-PyTorch reference twins (the GPU hot path; see KERNELS.md).

Nothing here is imported by ``import granular``: kernels are built lazily, behind
``has_triton()``, by the pass that uses them.
"""
