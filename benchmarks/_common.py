"""Shared helpers for the benchmark scripts: timing side by side, in one process."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["interleaved_times", "header"]


def interleaved_times(fns: dict[str, Callable[[], None]], *, warmup: int = 2, repeats: int = 7) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation so that both see
    the same machine state (turbo, caches, other load)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def header(title: str) -> None:
    print(f"# {title}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
