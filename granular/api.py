"""``granular.prepare``: trace a model and gate it (trace -> find_units -> insert_gates)."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

from granular.config import GateConfig
from granular.passes.find_units import FindUnits
from granular.passes.insert_gates import InsertGates
from granular.passes.trace import trace

__all__ = ["prepare"]


def prepare(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            config: GateConfig | None = None, *, leaf_modules: Iterable[type] = (),
            autowrap_functions: Iterable[Callable] = ()) -> fx.GraphModule:
    """Trace ``model`` and insert α/β/ω gates: the gated graph that :func:`granular.search` trains.

    Args:
        model: any traceable module (a search space, a timm/torchvision model, your own).
        example_inputs: inputs used for shape propagation (batch 1-2 is enough).
        config: which units to gate (:class:`~granular.config.GateConfig`).
        leaf_modules: module classes to keep as single nodes while tracing.
        autowrap_functions: free functions to record as single nodes.

    Returns:
        The gated GraphModule. ``print(gm.code)`` shows the gates; its gate parameters live
        under ``gm.granular_gates``.

    Raises:
        TraceError: the model cannot be traced; the message names the module and construct.
    """
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    pm = PassManager(passes=[FindUnits(config or GateConfig()), InsertGates()], steps=1)
    return pm(gm).graph_module
