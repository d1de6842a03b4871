"""Save and load exported compact models.

:func:`save` writes the ``torch.fx.GraphModule`` returned by the export pass to a directory
that can be shipped and loaded with plain PyTorch (plus the ``safetensors`` package), without
granular installed:

``model.py``
    Self-contained Python source. ``class CompactModel(torch.nn.Module)`` builds every
    submodule from its constructor arguments (standard ``torch.nn`` leaf types only), registers
    the parameters and buffers that live outside those leaves, and carries the graph's
    generated ``forward``. A module-level ``load(directory=None, map_location="cpu")`` builds
    the model, loads ``model.safetensors`` (``strict=True``) and returns it in eval mode.
``model.safetensors``
    The state dict, plus any non-persistent tensor constants the graph reads (their names
    are listed in ``model.py``).
``granular.json``
    ``format_version``, ``torch_version``, ``parameters``, ``nonzero_parameters`` and the
    caller's ``metadata``.
``leaves.pt`` (only when needed)
    Modules that were kept whole while tracing and have no constructor here (timm's FX-leaf
    attention blocks, ``nn.Upsample``): pickled, so loading needs timm/torchvision installed
    for those classes, but never the original model class nor granular.

:func:`load` imports ``model.py`` from such a directory and calls its ``load``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import types
from typing import Any

import torch
from torch import nn

from granular._source import (INFO_FILE, LEAVES_FILE, MODEL_FILE, SAVE_FORMAT_VERSION, WEIGHTS_FILE,
                              generate_source)
from granular.errors import GranularError
from granular.files import atomic_write, write_text

__all__ = ["save", "load", "SAVE_FORMAT_VERSION"]


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def _storable_tensors(gm: torch.fx.GraphModule, constants: list[str]) -> dict[str, torch.Tensor]:
    """State dict plus constants as independent, contiguous CPU tensors."""
    items = dict(gm.state_dict(keep_vars=False))
    for qualified in constants:
        owner, _, name = qualified.rpartition(".")
        items[qualified] = getattr(gm.get_submodule(owner), name)
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in items.items():
        if tensor.device.type == "meta":
            raise GranularError(f"cannot save: tensor {key!r} is on the meta device (no data)")
        t = tensor.detach().to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        owns_storage = (
            t.is_contiguous() and t.storage_offset() == 0
            and storage.nbytes() == t.numel() * t.element_size()
        )
        if not owns_storage or (ptr in seen_storages and t.numel() > 0):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        seen_storages.add(ptr)
        out[key] = t
    return out


def _load_source_module(source_file: pathlib.Path, name: str) -> types.ModuleType:
    """Import a Python file as module ``name``; on failure it is not left in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, source_file)
    if spec is None or spec.loader is None:
        raise GranularError(f"cannot import {source_file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _verify_structure(source: str, tensors: dict[str, torch.Tensor], library: dict[str, nn.Module]) -> None:
    """Instantiate the generated CompactModel and check it matches the tensors to be written."""
    namespace: dict[str, Any] = {"__name__": "_granular_save_check", "__file__": "<model.py>"}
    exec(compile(source, "<granular model.py>", "exec"), namespace)  # noqa: S102
    namespace["_LEAVES"].update(library)
    built = namespace["CompactModel"]()
    expected = dict(built.state_dict())
    constants = namespace["_CONSTANTS"]
    for qualified in constants:
        owner, _, name = qualified.rpartition(".")
        expected[qualified] = getattr(built.get_submodule(owner), name)
    missing = sorted(set(tensors) - set(expected))
    unexpected = sorted(set(expected) - set(tensors))
    if missing or unexpected:
        raise GranularError(
            f"cannot save: generated model.py does not match the state dict "
            f"(not created: {missing[:5]}, extra: {unexpected[:5]})"
        )
    for key, tensor in tensors.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise GranularError(
                f"cannot save: generated model.py gives {key!r} shape "
                f"{tuple(expected[key].shape)}, the model has {tuple(tensor.shape)}"
            )


def save(model: torch.fx.GraphModule, path: str | os.PathLike,
         *, metadata: dict | None = None, format: str = "py", example_inputs=None) -> pathlib.Path:
    """Write ``model`` (an exported compact GraphModule) to the directory ``path``.

    The directory (and its parents) is created. It receives ``model.py`` (self-contained
    source, loadable without granular), ``model.safetensors`` and ``granular.json``; each file
    is written atomically. Returns the directory as a :class:`pathlib.Path`.

    ``format="onnx"`` or ``"pt2"`` writes ``model.onnx`` or ``model.pt2`` (and
    ``granular.json``) instead, checked against ``model`` on ``example_inputs`` first
    (:mod:`granular.formats`); any ``nn.Module`` can be saved so.

    Raises :class:`~granular.errors.GranularError` if the model holds a module type outside
    the supported standard ``torch.nn`` leaves, or its code uses a global that cannot be
    written as a torch/standard-library import.
    """
    if format != "py":
        return _save_format(model, path, metadata, format, example_inputs)
    if not isinstance(model, torch.fx.GraphModule):
        raise GranularError(
            f"granular.save expects the torch.fx.GraphModule returned by granular.export, "
            f"got {type(model).__name__}"
        )
    info = _info(model, metadata)
    source, constants, library = generate_source(model)
    tensors = _storable_tensors(model, constants)
    _verify_structure(source, tensors, library)

    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise GranularError(f"cannot save to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    import safetensors.torch

    atomic_write(directory / WEIGHTS_FILE,
                  lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}))
    if library:
        atomic_write(directory / LEAVES_FILE, lambda tmp: torch.save(library, tmp))
    write_text(directory / MODEL_FILE, source)
    write_text(directory / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return directory


def _info(model: nn.Module, metadata: dict | None, **extra) -> dict[str, Any]:
    """``granular.json``: the format, torch version, parameter counts and the caller's metadata."""
    if metadata is not None and not isinstance(metadata, dict):
        raise GranularError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        metadata_json = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise GranularError(f"metadata is not JSON-serialisable: {exc}") from None
    unique_params = {id(p): p for p in model.parameters()}.values()
    return {"format_version": SAVE_FORMAT_VERSION, **extra, "torch_version": torch.__version__,
            "parameters": int(sum(p.numel() for p in unique_params)),
            "nonzero_parameters": int(sum(int(torch.count_nonzero(p.detach())) for p in unique_params)),
            "metadata": metadata_json}


def _save_format(model: nn.Module, path, metadata, fmt: str, example_inputs) -> pathlib.Path:
    from granular.formats import save_format
    info = _info(model, metadata, format=fmt)
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise GranularError(f"cannot save to {directory}: it exists and is not a directory")
    save_format(model, directory, fmt, example_inputs)
    if not (directory / INFO_FILE).exists():  # beside a model.py, its granular.json stays
        write_text(directory / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return directory


_load_counter = 0


def load(path: str | os.PathLike, *, map_location: str = "cpu") -> nn.Module:
    """Load a model written by :func:`save` from the directory ``path``.

    Imports the directory's ``model.py`` and calls its ``load``; the result is a plain
    ``torch.nn.Module`` in eval mode with the weights on ``map_location``.
    """
    global _load_counter
    directory = pathlib.Path(path)
    if not directory.exists():
        raise GranularError(f"no saved model at {directory}: the directory does not exist")
    if not directory.is_dir():
        raise GranularError(f"no saved model at {directory}: it is not a directory")
    missing = [n for n in (MODEL_FILE, WEIGHTS_FILE, INFO_FILE) if not (directory / n).is_file()]
    if missing:
        raise GranularError(f"no saved model at {directory}: missing {', '.join(missing)}")
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
        version = int(info["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise GranularError(f"{directory / INFO_FILE} is malformed: {exc!r}") from None
    if version > SAVE_FORMAT_VERSION:
        raise GranularError(
            f"{directory} was saved with format version {version}; this granular reads "
            f"up to {SAVE_FORMAT_VERSION}, upgrade granular"
        )

    resolved = str(directory.resolve())
    _load_counter += 1
    digest = hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:12]
    module_name = f"_granular_saved_{digest}_{_load_counter}"
    module = _load_source_module(directory / MODEL_FILE, module_name)
    return module.load(resolved, map_location=map_location)
