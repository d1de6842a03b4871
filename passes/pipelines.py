"""The pass pipelines the library runs, each a ``PassManager`` run (:mod:`._manager`).

    prepare:         find_units -> find_heads -> insert_gates         (after trace)
    training graph:  skip_pruned_ops -> [stage_graph] -> fuse_kernels -> fold_gates  (what a search trains)

The training graph is rebuilt whenever op masks change; it shares every module and parameter
with the gated graph, so training it trains the gated graph.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch import nn

from granular.config import GateConfig
from granular.passes._manager import run_passes
from granular.passes.find_heads import FindHeads
from granular.passes.find_units import FindUnits
from granular.passes.fold_gates import FoldGates
from granular.passes.fuse_kernels import FuseKernels
from granular.passes.insert_gates import InsertGates
from granular.passes.skip_pruned_ops import SkipPrunedOps
from granular.passes.split_stages import StageGraph

__all__ = ["gate_pipeline", "training_graph", "KERNEL_MODES"]

KERNEL_MODES = {"auto": False, "on": True, "off": False}
"""``SearchConfig.kernels`` -> :class:`FuseKernels`'s ``enabled``. ``"auto"`` keeps the eager
graph: the fused kernels are tested under triton's interpreter only, never compiled on a GPU
(``docs/benchmarks.md``), so nobody gets them without asking (``"on"``). ``auto`` will turn them
on for CUDA once ``pytest -m gpu`` and ``benchmarks/kernels.py`` have passed on one and the
fused step is at least as fast as eager."""


def gate_pipeline(gm: fx.GraphModule, config: Optional[GateConfig] = None) -> fx.GraphModule:
    """The traced graph with its units found and gated (``granular.prepare`` after tracing)."""
    config = config or GateConfig()
    return run_passes(gm, [FindUnits(config), FindHeads(config), InsertGates()])


def training_graph(gm: fx.GraphModule, *, kernels: str = "auto", stage: Optional[int] = None,
                   head: Optional[nn.Module] = None) -> fx.GraphModule:
    """The graph a search trains: ``gm`` without its pruned ops, cut after ``stage`` into
    ``head`` when given (a multi-stage phase), with its gated convs on the fused Triton op
    when ``kernels`` asks for it (``"on"``; ``"auto"`` keeps the eager graph for now), and the
    gates that follow a BatchNorm folded into its affine (exact, one pass over the activation
    fewer per gate)."""
    passes = [SkipPrunedOps()]
    if stage is not None:
        passes.append(StageGraph(stage, head))
    passes += [FuseKernels(enabled=KERNEL_MODES[kernels]), FoldGates()]
    return run_passes(gm, passes)
