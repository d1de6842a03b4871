"""Deployment formats of a compact model: ONNX and ``torch.export`` (pt2), each checked.

``granular.save(model, dir)`` writes the readable ``model.py`` + safetensors format
(:mod:`granular.io`); deployment tools take other formats, so ``save(..., format="onnx" |
"pt2", example_inputs=x)`` writes one of these instead:

``model.onnx``
    ``torch.onnx.export`` with a dynamic batch dimension: the dynamo exporter, and the
    TorchScript one where the dynamo exporter fails. Needs the optional ``granular[onnx]``
    extra (onnx, onnxscript, onnxruntime).
``model.pt2``
    A ``torch.export`` ExportedProgram saved with ``torch.export.save``: it loads with
    ``torch.export.load(path).module()`` and needs no pickle of model classes.

Each file is run back (onnxruntime for ONNX, ``torch.export.load`` for pt2) on the example
batch before it is moved into place; an output that differs from the compact model's by more
than ``rtol`` (relative to its largest magnitude) stops with one line naming the error, and
nothing is written.
"""

from __future__ import annotations

import copy
import pathlib
import re
import tempfile
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from granular.errors import ExportError, GranularError
from granular.files import atomic_write
from granular.verify import compare_outputs, flat_outputs

__all__ = ["FORMATS", "save_format"]

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}


def _inputs(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _check(name: str, got: list[torch.Tensor], ref: list[torch.Tensor], rtol: float) -> None:
    reasons, _ = compare_outputs(ref, got, rtol)
    if reasons:
        raise ExportError(f"the {name} export does not compute what the compact model does ({reasons[0]}); "
                          f"not written: please report this with the model")


def _batched(inputs: tuple) -> list[bool]:
    """Which inputs carry the batch: those whose first size is the first input's."""
    n = inputs[0].shape[0] if inputs[0].dim() else None
    return [x.dim() >= 1 and x.shape[0] == n for x in inputs]


def _dims(batched: list[bool], dynamic: bool) -> Optional[tuple]:
    if not dynamic:
        return None
    return tuple({0: torch.export.Dim("batch", min=1)} if b else None for b in batched)


def _pt2(model: nn.Module, inputs: tuple, tmp: str, batched: list[bool], dynamic: bool) -> None:
    program = torch.export.export(model, inputs, dynamic_shapes=_dims(batched, dynamic))
    torch.export.save(program, tmp)


def _run_pt2(path: str, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return flat_outputs(torch.export.load(path).module()(*inputs))


def _onnx(model: nn.Module, inputs: tuple, tmp: str, batched: list[bool], dynamic: bool) -> None:
    names = [f"input_{i}" for i in range(len(inputs))]
    try:
        torch.onnx.export(model, inputs, tmp, dynamo=True, dynamic_shapes=_dims(batched, dynamic), input_names=names,
                          external_data=False)
    except Exception as err:  # noqa: BLE001 - the TorchScript exporter is the documented fallback
        try:
            axes = {n: {0: "batch"} for n, b in zip(names, batched) if b and dynamic}
            torch.onnx.export(model, inputs, tmp, dynamo=False, input_names=names, dynamic_axes=axes or None)
        except Exception:  # noqa: BLE001 - the dynamo exporter's error is the one to report
            raise err  # noqa: B904 - keeps its own cause chain (the op that failed)


def _onnx_ready(model: nn.Module) -> nn.Module:
    """A copy whose attention runs on 4-d q, k, v where the model's has more dimensions (the
    ONNX exporter translates only 4-d attention: :mod:`granular.passes.flatten_attention`)."""
    from granular.passes.flatten_attention import flatten_attention, needs_flattening
    if isinstance(model, fx.GraphModule) and any(needs_flattening(n) for n in model.graph.nodes):
        return flatten_attention(copy.deepcopy(model))
    return model


def _run_onnx(path: str, inputs: tuple) -> list[torch.Tensor]:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise GranularError(f"--format onnx needs the onnx extra ({err.name} is missing): "
                            f"pip install 'granular[onnx]'") from None


def save_format(model: nn.Module, directory: pathlib.Path, fmt: str, example_inputs, rtol: float = 1e-4
                ) -> pathlib.Path:
    """Write ``model`` to ``directory`` in ``fmt`` (``"onnx"`` or ``"pt2"``), checked on
    ``example_inputs`` first; returns the file written."""
    if fmt not in FORMATS:
        raise GranularError(f"unknown format {fmt!r}: use py, onnx or pt2")
    if example_inputs is None:
        raise GranularError(f"saving as {fmt} needs example_inputs (a batch the model takes)")
    if fmt == "onnx":
        _require_onnx()
    model = model.eval().cpu()
    if fmt == "onnx":
        model = _onnx_ready(model)
    inputs = tuple(x.cpu() for x in _inputs(example_inputs))
    batched, dynamic, ref = _batched(inputs), True, None
    if inputs[0].dim() and inputs[0].shape[0] == 1:  # exporters fix a batch of 1 in the program: trace two samples
        doubled = tuple(torch.cat([x, x]) if b else x for x, b in zip(inputs, batched))
        try:
            with torch.no_grad():
                ref = flat_outputs(model(*doubled))
            inputs = doubled
        except Exception:  # noqa: BLE001 - a model that takes one sample only: its batch stays fixed
            dynamic = False
    if ref is None:
        with torch.no_grad():
            ref = flat_outputs(model(*inputs))
    write, run = (_onnx, _run_onnx) if fmt == "onnx" else (_pt2, _run_pt2)
    target = directory / FORMATS[fmt]
    with tempfile.TemporaryDirectory() as d:
        probe = str(pathlib.Path(d) / FORMATS[fmt])
        try:
            write(model, inputs, probe, batched, dynamic)
        except Exception as err:  # noqa: BLE001 - reported in one line: the innermost cause's first line
            while err.__cause__ is not None:  # the exporters wrap the failing op's error in their own
                err = err.__cause__
            first = re.sub(r"\x1b\[[0-9;]*m", "", (str(err).strip().splitlines() or [type(err).__name__])[0])[:200]
            raise ExportError(f"the {fmt} exporter failed on this model ({type(err).__name__}: {first})") from None
        _check(fmt, run(probe, inputs), ref, rtol)
        if dynamic and inputs[0].shape[0] > 1:  # the batch dimension is dynamic: one sample must run too
            one = tuple(x[:1] if b else x for x, b in zip(inputs, batched))
            with torch.no_grad():
                _check(f"{fmt} (batch 1)", run(probe, one), flat_outputs(model(*one)), rtol)
        directory.mkdir(parents=True, exist_ok=True)
        data = pathlib.Path(probe).read_bytes()
    atomic_write(target, lambda tmp: pathlib.Path(tmp).write_bytes(data))
    return target
