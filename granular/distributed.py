"""Data-parallel search under ``torchrun``: the few torch.distributed helpers the driver uses.

``torchrun --nproc_per_node=N --no-python granular search ...`` (or ``python -m
torch.distributed.run ... -m granular.cli search ...``) starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address) in their environment.
:func:`init` turns that into a process group (NCCL on CUDA, gloo on CPU) and picks the
process's device; without those variables it does nothing and every helper here is a no-op,
so a single process runs exactly the code it ran before.

What the driver (:mod:`granular.driver`) does with these helpers:

* **gradients**: :func:`all_reduce_grads` averages every gradient after ``backward`` (see its
  docstring for why this is an explicit all-reduce and not a ``DistributedDataParallel``
  wrapper);
* **state**: :func:`broadcast_module` copies parameters and buffers from rank 0 at the start,
  after a resume, after each epoch's training (this is also what makes BatchNorm running
  statistics, which every rank updates from its own shard, the same everywhere) and after the
  BatchNorm recalibration, so that every pruning decision reads the same numbers;
* **metrics**: :func:`all_reduce_sum` adds the per-rank loss and accuracy sums;
* **decisions**: :func:`assert_same` checks that every rank took the same one (a round's
  masks, λ, a regrowth's picks) and stops all of them, in one line, if not;
* **files**: only :func:`is_main` (rank 0) writes; the others wait at :func:`barrier`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from granular.errors import GranularError

__all__ = ["init", "cleanup", "is_distributed", "rank", "world_size", "local_rank", "is_main", "barrier",
           "env_world_size", "per_rank_batch", "all_reduce_sum", "all_reduce_mean", "all_reduce_grads",
           "broadcast_module", "broadcast_object", "assert_same"]

_BUCKET = 1 << 24  # elements per flat all-reduce / broadcast (64 MB of float32)


class _State:
    owned = False                                   # whether init() created the process group
    comm_device: Optional[torch.device] = None      # where collectives run (CUDA for NCCL)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when not launched by torchrun)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and prints progress."""
    return rank() == 0


def _resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index is ``cuda:LOCAL_RANK`` under torchrun; anything else is kept."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and env_world_size() > 1 and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", local_rank())
    return dev


def init(device: str | torch.device = "cpu") -> torch.device:
    """Join the process group torchrun's environment describes, and return this process's device.

    Without ``WORLD_SIZE > 1`` in the environment (a plain ``granular search``) this only
    returns ``torch.device(device)``. Under torchrun it maps ``cuda`` to ``cuda:LOCAL_RANK``
    (and makes it the current device) and starts the process group: NCCL for a CUDA
    ``device``, gloo otherwise. A process group that already exists (the caller's own) is used
    as it is, and :func:`cleanup` leaves it.

    Raises:
        GranularError: torchrun started this process, but torch was built without torch.distributed.
    """
    dev = _resolve_device(device)
    launched = env_world_size() > 1
    if dev.type == "cuda" and launched:
        torch.cuda.set_device(dev)
    if launched and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise GranularError("this torch build has no torch.distributed: run granular search without torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        _State.owned = True
    _State.comm_device = None
    return dev


def cleanup() -> None:
    """End the process group if :func:`init` started it (call :func:`barrier` first to wait
    for the other ranks; on an error path, don't)."""
    if _State.owned and dist.is_initialized():
        dist.destroy_process_group()
    _State.owned = False
    _State.comm_device = None


def _comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, the CPU otherwise."""
    if _State.comm_device is None:
        nccl = dist.get_backend() == "nccl"
        _State.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return _State.comm_device


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[_comm_device().index])
    else:
        dist.barrier()


def per_rank_batch(global_batch: int, world: Optional[int] = None) -> int:
    """The per-process batch of a ``global_batch`` split over ``world`` processes.

    Raises:
        GranularError: ``global_batch`` does not divide evenly.
    """
    world = world_size() if world is None else world
    if global_batch % world:
        lower = max(world, global_batch - global_batch % world)
        raise GranularError(f"--batch-size {global_batch} is the global batch and must divide evenly over "
                            f"{world} processes: pass a multiple of {world}, e.g. --batch-size {lower}")
    return global_batch // world


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over the ranks (float64); the values themselves in a single process."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Average a few numbers over the ranks."""
    w = world_size()
    return [v / w for v in all_reduce_sum(values)]


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Tensors grouped by dtype, in order, into flat-buffer buckets of about ``_BUCKET`` elements."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.numel() > _BUCKET:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            yield bucket


def _flat(bucket: list[torch.Tensor]) -> torch.Tensor:
    dev = _comm_device()
    return torch.cat([t.detach().reshape(-1).to(dev) for t in bucket])


def _unflat(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks, in place (no-op in a single process).

    Why an explicit all-reduce after ``backward`` and not ``DistributedDataParallel``:

    * the training graph is a ``torch.fx.GraphModule`` that the search **rebuilds** whenever
      pruning removes an op, and a multi-stage search swaps it (and its auxiliary head) at
      every phase. DDP would have to be re-wrapped each time, and the old wrapper's reducer
      hooks on the very same parameters released first, or gradients are reduced twice;
    * the loss reads parameters **outside** the module's ``forward``: the resource term uses
      α and the threshold term every active t. With ``find_unused_parameters=True`` DDP
      marks a parameter its forward did not reach as ready, then fails when the loss's
      gradient for it arrives ("marked ready twice"); without it, DDP waits forever for
      parameters that get no gradient (the ops pruning skipped, which the optimisers still
      hold so that regrowth needs no new parameters);
    * which parameters have a gradient changes with the phase (warm-up, search, stage) and
      with every pruned op. Here that is settled per step: ranks agree on which gradients
      exist (one small all-reduce of flags), a gradient present on some rank only counts as
      zero elsewhere, and one absent everywhere stays ``None``, so SGD skips exactly the
      parameters a single process would skip (no momentum or weight decay on pruned ops);
    * the search nets are small (MG-DARTS supernets have a few million parameters), so one
      flat all-reduce per step, not overlapped with ``backward``, costs little next to it.

    The averaged gradient is exact: every rank's loss is a mean over an equal share of the
    global batch, plus the λ terms, which are the same on every rank.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dev = _comm_device()
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    live = []
    for p, f in zip(params, flags.tolist()):
        if f == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        live.append(p.grad)
    w = dist.get_world_size()
    for bucket in _buckets(live):
        flat = _flat(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(w)
        _unflat(flat, bucket)


def _tensors(modules: Sequence[nn.Module], params: bool, buffers: bool) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for m in modules:
        if m is None:
            continue
        named = (list(m.named_parameters()) if params else []) + (list(m.named_buffers()) if buffers else [])
        for _, t in named:
            if id(t) not in seen and t.numel():
                seen.add(id(t))
                out.append(t)
    return out


@torch.no_grad()
def broadcast_module(*modules: Optional[nn.Module], params: bool = True, buffers: bool = True) -> None:
    """Copy the parameters and/or buffers of ``modules`` from rank 0 to every rank, in place.

    Tensors shared by several modules are sent once; every rank must pass modules with the
    same tensors in the same order (the same graph built from the same state). A no-op in a
    single process.
    """
    if not is_distributed():
        return
    for bucket in _buckets(_tensors(modules, params, buffers)):
        flat = _flat(bucket)
        dist.broadcast(flat, src=0)
        _unflat(flat, bucket)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def assert_same(obj: Any, what: str) -> None:
    """Check that every rank holds the same ``obj`` (compared with ``==``); if any rank differs,
    every rank raises the same one-line error, so none is left waiting at a collective.

    Raises:
        GranularError: the ranks disagree.
    """
    if not is_distributed():
        return
    ref = broadcast_object(obj)
    bad = torch.tensor([0 if ref == obj else 1], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    if int(bad.item()):
        raise GranularError(f"the {world_size()} processes disagree on {what} ({int(bad.item())} differ from "
                            f"rank 0): a bug, please report it with the command line")
