"""The search drivers, and :func:`search`, which picks one.

    searcher.py    the single-stage driver (Algorithm 1): the state and the loop
    optim.py       its optimisers and losses
    training.py    an epoch: thresholds, training, BatchNorm recalibration, validation
    rounds.py      the pruning round: decide, then apply
    checkpoint.py  checkpoints and the metrics log
    multistage.py  the multi-stage driver (Algorithm 2): phases, stage goals, regrowth
    progress.py    rich progress

:func:`search` dispatches on the config's type, as torchao's ``quantize_`` does: a
:class:`~granular.config.MultiStageConfig` gets the multi-stage driver; a plain
:class:`~granular.config.SearchConfig` gets it when ``multi_stage`` asks for it (``"auto"``:
models of 3 or more resolutions), else the single-stage driver. :func:`register_driver` adds a
driver for another config type.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from granular import distributed
from granular.accounting import ParamCount, count_params
from granular.config import MultiStageConfig, SearchConfig
from granular.driver.multistage import MultiStageSearcher, single_resolution_message, use_multi_stage
from granular.driver.searcher import Searcher, SearchResult, check_kernels
from granular.errors import CheckpointError, TargetError
from granular.files import CHECKPOINT
from granular.masks import reachable_floor
from granular.passes.split_stages import count_resolutions

__all__ = ["search", "make_searcher", "register_driver", "check_target", "check_kernels", "Searcher",
           "MultiStageSearcher", "SearchResult", "use_multi_stage", "single_resolution_message"]

_DRIVERS: dict[type, Callable[[fx.GraphModule, SearchConfig], type]] = {}


def register_driver(config_type: type) -> Callable:
    """Decorator: ``fn(gm, config) -> driver class`` picks the driver for configs of ``config_type``
    (the most derived registered type of a config wins)."""
    def decorator(fn):
        _DRIVERS[config_type] = fn
        return fn
    return decorator


@register_driver(SearchConfig)
def _search_config_driver(gm: fx.GraphModule, config: SearchConfig) -> type:
    return MultiStageSearcher if use_multi_stage(gm, config) else Searcher


@register_driver(MultiStageConfig)
def _multi_stage_config_driver(gm: fx.GraphModule, config: MultiStageConfig) -> type:
    if config.single_resolution == "fallback" and count_resolutions(gm) < 2:
        return Searcher
    return MultiStageSearcher  # which stops, in one line, on a model of one resolution


def make_searcher(gm: fx.GraphModule, data, config: SearchConfig, **kwargs) -> Searcher:
    """The driver for ``config`` (module docstring), built on ``gm`` and ``data``.

    Raises:
        GranularError: multi-stage search was asked for a model of one resolution, without fallback.
    """
    for cls in type(config).__mro__:
        if cls in _DRIVERS:
            return _DRIVERS[cls](gm, config)(gm, data, config, **kwargs)
    raise TypeError(f"no search driver for {type(config).__name__}: pass a SearchConfig")


def check_target(gm: fx.GraphModule, target: int) -> tuple[ParamCount, ParamCount]:
    """Fail early, in one line, when the target is already met or cannot be reached.

    Returns:
        (the current count, the reachable floor).
    """
    from granular._format import fmt_count
    now = count_params(gm)
    if target >= now.nonzero:
        raise TargetError(f"the model already has {fmt_count(now.nonzero)} nonzero parameters, at or below the "
                          f"target {fmt_count(target)}: nothing to prune; choose a target below {fmt_count(now.nonzero)}")
    floor = reachable_floor(gm)
    if target < floor.nonzero:
        raise TargetError(f"target {fmt_count(target)} is below the smallest model this graph can reach "
                          f"({fmt_count(floor.nonzero)} nonzero parameters with every prunable unit removed); "
                          f"choose a target of at least {fmt_count(floor.nonzero)}")
    return now, floor


def search(gm: fx.GraphModule, train_data, target_params: float | int | None = None,
           config: SearchConfig | None = None, *, run_dir: str | os.PathLike | None = None,
           resume: bool = False, progress: bool = True, device: str | torch.device = "cpu") -> SearchResult:
    """Prune a gated graph to ``target_params`` nonzero parameters (Algorithm 1, or 2 in stages).

    Args:
        gm: a gated graph from :func:`granular.prepare`; it is trained in place.
        train_data: a :class:`granular.data.DataBundle`, or anything with the same parts:
            ``train_loader(epoch)`` (that epoch's batches of ``(images, labels)``, the same
            batches each time it is asked, so that ``resume`` repeats them; under torchrun
            also ``train_loader(epoch, rank=, world_size=)``), ``train_set`` (a dataset of
            ``(image, label)``: BatchNorm recalibration draws ``batch_size`` batches from it)
            and ``batch_size``; ``val_loader()`` is optional (without it there is no
            validation accuracy).
        target_params: the nonzero-parameter target (overrides ``config.target_params``).
        config: a :class:`~granular.config.SearchConfig` or
            :class:`~granular.config.MultiStageConfig`; its type picks the driver.
        run_dir: if given, checkpoints and the metrics log are written there.
        resume: continue from ``run_dir``'s checkpoint.
        progress: show rich progress (rank 0 only under torchrun).
        device: where to train. Under ``torchrun`` the search joins the process group (or uses
            the caller's) and runs data-parallel; ``cuda`` means ``cuda:LOCAL_RANK``.

    Returns:
        A :class:`SearchResult` with the exported compact model.

    Raises:
        TargetError: the target is already met, or below what the graph can reach.
        CheckpointError: ``resume`` and the checkpoint is unreadable.
    """
    cfg = config or SearchConfig()
    if target_params is not None:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "target_params": int(target_params)})
    if cfg.target_params <= 0:
        raise TargetError("no target: pass target_params (e.g. 2.2M)")
    device = distributed.init(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    searcher = make_searcher(gm, train_data, cfg, run_dir=run_dir, progress=progress, device=device)
    ck = Path(run_dir) / CHECKPOINT if run_dir else None
    if resume:
        if ck is None or not ck.exists():
            raise CheckpointError(f"nothing to resume: no {CHECKPOINT} in {run_dir}; run without --resume")
        searcher.resume(ck)
    else:
        check_target(gm, cfg.target_params)
    return searcher.run()
