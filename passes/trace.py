"""Trace a model to an FX graph and propagate shapes.

The tracer honours timm's FX registries (``timm.layers.register_notrace_module`` /
``register_notrace_function``) plus granular's own (:func:`register_leaf_module`) and the
caller's ``leaf_modules``. Leaf modules appear as single ``call_module`` nodes and are never
pruned inside. After tracing, :class:`torch.fx.passes.shape_prop.ShapeProp` writes
``tensor_meta`` on every node; the channel analyses read shapes from there.

A failure names the module being traced and the construct that broke, with the fix
(``leaf_modules=`` or :func:`register_leaf_module`).
"""

from __future__ import annotations

import contextlib

import inspect
import logging
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from granular.errors import TraceError
from granular.passes._manager import run_passes
from granular.passes.decompose import DecomposeNormAct, decompose_attention
from granular.passes.inplace import ThreadInplaceOps

__all__ = ["trace", "register_leaf_module", "register_leaf_function", "GranularTracer", "AUTO_LEAVES"]

log = logging.getLogger(__name__)

_LEAF_MODULES: set[type] = set()
_LEAF_FUNCTIONS: set[Callable] = set()


def register_leaf_module(cls: type) -> type:
    """Register an ``nn.Module`` class as an FX leaf (traced as one opaque node)."""
    _LEAF_MODULES.add(cls)
    return cls


def register_leaf_function(fn: Callable) -> Callable:
    """Register a free function to be recorded as one node instead of traced through."""
    _LEAF_FUNCTIONS.add(fn)
    return fn


def _timm_registries() -> tuple[set, set]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm is a dependency, but tracing must not hinge on its internals
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


class GranularTracer(fx.Tracer):
    """``fx.Tracer`` with leaf modules from timm, granular and the caller."""

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = ()):
        timm_modules, timm_functions = _timm_registries()
        self.leaf_types = tuple(set(leaf_modules) | _LEAF_MODULES | timm_modules)
        super().__init__(autowrap_functions=tuple(set(autowrap_functions) | _LEAF_FUNCTIONS | timm_functions))
        self.current_path = ""
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer = self.current_path
        self.current_path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:  # the innermost module is the one to blame
                self.failed_path = self.current_path
            raise
        finally:
            self.current_path = outer


def _describe_failure(err: Exception, tracer: GranularTracer, model: nn.Module) -> TraceError:
    path = tracer.failed_path or ""
    nodes = list(tracer.graph.nodes) if hasattr(tracer, "graph") else []
    after = f", after node '{nodes[-1].name}'" if nodes else ""
    where = f"module '{path}' ({type(model.get_submodule(path)).__name__})" if path else (
        f"the forward of {type(model).__name__}")
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "control flow" in msg or "iterated" in msg or "len(" in msg:
        construct = "Python control flow on a traced tensor (if/while/bool/len/iteration)"
    else:
        construct = f"{type(err).__name__}: {msg}"
    cls = type(model.get_submodule(path)) if path else type(model)
    hint = (f"pass leaf_modules=[{cls.__name__}] (CLI: --leaf {cls.__name__}) so it is kept whole" if path else
            "the model's own forward cannot be kept whole: make that code traceable, or wrap it in a module "
            "and pass that module as a leaf")
    return TraceError(f"cannot trace {where}{after}: {construct}; {hint}",
                      module_path=path, module_type=cls, construct=construct)


AUTO_LEAVES = "granular.auto_leaves"


def _defaults_beyond(model: nn.Module, given: int) -> dict[str, Any] | None:
    """Forward arguments the example inputs do not supply, at their defaults (``mask=None``,
    ``return_features=False``): traced as constants, so ``if mask is not None`` is no proxy."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {p.name: p.default for p in params[given:] if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return out or None


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
          leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
          auto_leaf: bool = False) -> fx.GraphModule:
    """Trace ``model`` and run shape propagation on ``example_inputs``.

    Args:
        model: the module to trace; it is not modified.
        example_inputs: a tensor or tuple of tensors, as passed to ``model``.
        leaf_modules: extra module classes to keep as single nodes.
        autowrap_functions: extra free functions to record as single nodes.
        auto_leaf: on a failure inside a submodule, keep that module's class whole and try
            again (what the error message tells a user to do). The classes added, with the
            module and construct to blame, are listed in ``gm.meta["granular.auto_leaves"]``.
            Channels through an auto leaf are fixed, never guessed.

    Returns:
        A GraphModule whose nodes carry ``tensor_meta``.

    Raises:
        TraceError: the model cannot be traced or does not run on the inputs; the message
            names the module and the construct.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with _caches_restored(model):
        gm = _trace(model, example_inputs, leaf_modules, autowrap_functions, auto_leaf)
    gm = run_passes(gm, [DecomposeNormAct(), ThreadInplaceOps()])
    propagate_shapes(gm, example_inputs)
    if any(n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.MultiheadAttention
           for n in gm.graph.nodes):
        decompose_attention(gm)  # reads tensor_meta; its new nodes then need theirs
        propagate_shapes(gm, example_inputs)
    return gm


@contextlib.contextmanager
def _caches_restored(model: nn.Module):
    """Put back every dict attribute of every module after tracing. Some forwards cache
    tensors in a dict (timm's EfficientFormer caches its attention biases in eval mode); while
    tracing they would cache proxies of this trace's graph, and the next trace of the same
    model would read nodes of a graph that is not its own."""
    saved = [(d, dict(d)) for m in model.modules() for d in vars(m).values()
             if type(d) is dict and d is not m._modules and d is not m._parameters and d is not m._buffers]
    try:
        yield
    finally:
        for d, before in saved:
            d.clear()
            d.update(before)


def _trace(model, example_inputs, leaf_modules, autowrap_functions, auto_leaf) -> fx.GraphModule:
    leaves = list(leaf_modules)
    blamed: list[dict] = []
    while True:
        tracer = GranularTracer(leaves, autowrap_functions)
        try:
            graph = tracer.trace(model, concrete_args=_defaults_beyond(model, len(example_inputs)))
            break
        except Exception as err:  # noqa: BLE001 - every tracing failure becomes one line
            failure = _describe_failure(err, tracer, model)
        if not (auto_leaf and failure.module_path and failure.module_type not in leaves):
            raise failure
        leaves.append(failure.module_type)
        blamed.append({"module": failure.module_path, "type": failure.module_type.__name__,
                       "construct": failure.construct})
        log.info("trace: keeping %s whole (%s)", failure.module_type.__name__, failure.construct)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[AUTO_LEAVES] = blamed
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Write ``tensor_meta`` on every node, in eval mode and without gradients, so that
    BatchNorm running statistics are left as they were."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as err:  # noqa: BLE001
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(f"the traced model fails on inputs of shape {shapes}: {first}; "
                         f"check that the data set matches the model's input") from err
    finally:
        gm.train(was_training)
