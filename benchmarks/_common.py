"""Shared helpers for the benchmark scripts: timing side by side, in one process."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["interleaved_times", "header", "PeakTensorMemory", "ResultLog"]


def interleaved_samples(fns: dict[str, Callable[[], None]], *, warmup: int = 2,
                        repeats: int = 7) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``repeats`` each, measured in alternation so that
    all see the same machine state (turbo, caches, other load); sample ``i`` of every function
    comes from the same round, so per-round ratios pair them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return samples


def interleaved_times(fns: dict[str, Callable[[], None]], *, warmup: int = 2, repeats: int = 7) -> dict[str, float]:
    """Median seconds per call of each function (:func:`interleaved_samples`)."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, warmup=warmup, repeats=repeats).items()}


class ResultLog:
    """``OUT/results.jsonl``, one run per line, written as each run ends so a killed benchmark
    loses at most the run in flight. With ``resume`` the runs already there are kept and
    :meth:`get` returns them by key; without it the old file is removed.

    Args:
        root: the benchmark's output folder (created).
        key: the fields of a result that name its run, e.g. ``("case", "seed")``.
        resume: keep the runs already logged.
    """

    def __init__(self, root: Path, key: tuple[str, ...], resume: bool):
        root.mkdir(parents=True, exist_ok=True)
        self.path, self.key = root / "results.jsonl", key
        self.done: dict[tuple, dict] = {}
        if resume and self.path.exists():
            for line in self.path.read_text().splitlines():
                r = json.loads(line)
                self.done[tuple(r[k] for k in key)] = r
        elif self.path.exists():
            self.path.unlink()

    def get(self, *key) -> dict | None:
        """The logged result of run ``key``, or None when it has not run."""
        return self.done.get(tuple(key))

    def add(self, result: dict) -> dict:
        """Append ``result`` (flushed before returning) and return it."""
        with self.path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        self.done[tuple(result[k] for k in self.key)] = result
        return result


def header(title: str) -> None:
    print(f"# {title}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")


class PeakTensorMemory:
    """Peak bytes of live tensor storage during a block, on CPU.

    CPU tensors have no caching allocator to ask (``torch.cuda.max_memory_allocated`` has no
    CPU twin), and torch's ``MemTracker`` re-scans every tracked tensor on each op, which
    is too slow for a super-net. This counts, with a ``TorchDispatchMode``, every storage an
    op creates inside the block (forward, backward and optimiser kernels alike) until the
    storage itself is freed (a weak reference on it; saved activations stay counted until
    backward releases them), on top of ``baseline``: the storages alive at entry (parameters,
    gradients, optimiser state, the batch), which are passed in and never counted twice.
    """

    def __init__(self, tensors):
        self._known = {}
        for t in tensors:
            st = t.untyped_storage()
            self._known[st.data_ptr()] = st.nbytes()
        self.baseline = sum(self._known.values())
        self.live = self.peak = self.baseline

    def _free(self, ptr: int, n: int) -> None:
        if self._known.pop(ptr, None) is not None:
            self.live -= n

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        ptr, n = st.data_ptr(), st.nbytes()
                        if n and ptr not in tracker._known:
                            tracker._known[ptr] = n
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, tracker._free, ptr, n)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
