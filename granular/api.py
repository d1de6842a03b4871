"""The two verbs around a search: :func:`prepare` (trace -> find_units -> insert_gates) and
:func:`export` (the compact plain-PyTorch model of a gated graph)."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from granular.config import GateConfig
from granular.errors import GranularError
from granular.masks import gate_bank
from granular.meta import GATE_START
from granular.passes.export import export_graph
from granular.passes.pipelines import gate_pipeline
from granular.passes.trace import AUTO_LEAVES, trace

__all__ = ["prepare", "export", "gate_start"]


def prepare(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
            config: GateConfig | None = None, *, leaf_modules: Iterable[type] = (),
            autowrap_functions: Iterable[Callable] = (), auto_leaf: bool = False) -> fx.GraphModule:
    """Trace ``model`` and insert α/β/ω gates: the gated graph that :func:`granular.search` trains.

    Args:
        model: any traceable module (a search space, a timm/torchvision model, your own).
        example_inputs: inputs used for shape propagation (batch 1-2 is enough).
        config: which units to gate (:class:`~granular.config.GateConfig`).
        leaf_modules: module classes to keep as single nodes while tracing.
        autowrap_functions: free functions to record as single nodes.
        auto_leaf: keep each submodule that fails to trace whole, and go on (see
            :func:`granular.passes.trace.trace`); the blamed modules are listed in
            ``gm.meta["granular.auto_leaves"]``.

    Returns:
        The gated GraphModule. ``print(gm.code)`` shows the gates; its gate parameters live
        under ``gm.granular_gates``.

    Raises:
        TraceError: the model cannot be traced; the message names the module and construct.
        GranularError: the model has no prunable unit at any granularity.
    """
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
               auto_leaf=auto_leaf)
    gm = gate_pipeline(gm, config)
    bank = gate_bank(gm)
    gm.meta[GATE_START] = gate_start(model, config)
    _set_gate_start(bank, gm.meta[GATE_START])
    if not (len(bank.op) or len(bank.filter) or len(bank.weight)):
        whole = sorted({row["type"] for row in gm.meta.get(AUTO_LEAVES, [])})
        kept = f" (kept whole because they do not trace: {', '.join(whole)})" if whole else ""
        raise GranularError(f"{type(model).__name__} has no prunable units{kept}: no residual branch joins a sum, "
                            f"and every conv/linear has fixed channels or is the stem/head; check the model with "
                            f"`granular inspect`, or enable mask_stem/mask_head in GateConfig")
    return gm


def gate_start(model: nn.Module, config: GateConfig | None) -> str:
    """``"identity"`` or ``"half"``: the resolved :attr:`GateConfig.start` for ``model``."""
    start = (config or GateConfig()).start
    if start == "auto":
        start = getattr(model, "granular_gate_start", "identity")
    if start not in ("identity", "half"):
        raise GranularError(f"{type(model).__name__}.granular_gate_start is {start!r}: use 'identity' or 'half'")
    return start


@torch.no_grad()
def _set_gate_start(bank, start: str) -> None:
    """Gains of 2 make every α/β gate 1 at a = 0 (``2 σ(0)``): the gated model is the model."""
    gain = 2.0 if start == "identity" else 1.0
    for g in [*bank.op.values(), *bank.filter.values()]:
        g.gain.fill_(gain)


def export(gm: fx.GraphModule) -> fx.GraphModule:
    """The compact, plain-PyTorch GraphModule of a gated graph (eval mode).

    Pruned ops are gone, channels sliced, gates and BatchNorms folded and weight masks
    applied; in eval mode it computes what ``gm`` does, and :func:`granular.count_params`
    is its exact size (``docs/design.md``, invariants 1 and 2).
    """
    return export_graph(gm)
