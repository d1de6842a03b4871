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

import ast
import builtins
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import types
from typing import Any, Callable

import torch
from torch import nn

from granular.errors import GranularError

__all__ = ["save", "load", "SAVE_FORMAT_VERSION"]

#: Version of the on-disk layout written by :func:`save`.
SAVE_FORMAT_VERSION = 1

MODEL_FILE = "model.py"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "granular.json"
LEAVES_FILE = "leaves.pt"

_INDENT = "    "
# Names defined at module level in model.py; a graph global may not take them.
_RESERVED_NAMES = frozenset({"torch", "CompactModel", "load", "_CONSTANTS", "_WEIGHTS_FILE"})


# --------------------------------------------------------------------------------------------
# Literals
# --------------------------------------------------------------------------------------------


def _lit(value: Any) -> str:
    """Render a constructor argument as a Python literal."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"float({str(value)!r})"
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)  # "torch.float32"
    if isinstance(value, tuple):
        if len(value) == 1:
            return f"({_lit(value[0])},)"
        return "(" + ", ".join(_lit(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_lit(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} {value!r} as a literal")


def _call(ctor: str, **kwargs: Any) -> str:
    return f"{ctor}(" + ", ".join(f"{k}={_lit(v)}" for k, v in kwargs.items()) + ")"


# --------------------------------------------------------------------------------------------
# Constructor table for standard leaf modules (built from attributes, never from repr)
# --------------------------------------------------------------------------------------------


def _conv(m: nn.Module) -> dict:
    return dict(
        in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
        stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
        bias=m.bias is not None, padding_mode=m.padding_mode,
    )


def _conv_transpose(m: nn.Module) -> dict:
    return dict(
        in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
        stride=m.stride, padding=m.padding, output_padding=m.output_padding, groups=m.groups,
        bias=m.bias is not None, dilation=m.dilation, padding_mode=m.padding_mode,
    )


def _batch_norm(m: nn.Module) -> dict:
    return dict(
        num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats,
    )


def _layer_norm(m: nn.LayerNorm) -> dict:
    kwargs = dict(
        normalized_shape=tuple(m.normalized_shape), eps=m.eps,
        elementwise_affine=m.elementwise_affine,
    )
    if m.elementwise_affine:
        kwargs["bias"] = m.bias is not None
    return kwargs


def _inplace(m: nn.Module) -> dict:
    return dict(inplace=m.inplace)


def _none(m: nn.Module) -> dict:
    return {}


_LEAF_CONSTRUCTORS: dict[type, Callable[[nn.Module], dict]] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv_transpose,
    nn.ConvTranspose2d: _conv_transpose,
    nn.Linear: lambda m: dict(
        in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None
    ),
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: lambda m: dict(
        num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine
    ),
    nn.ReLU: _inplace,
    nn.ReLU6: _inplace,
    nn.SiLU: _inplace,
    nn.Hardswish: _inplace,
    nn.Hardsigmoid: _inplace,
    nn.GELU: lambda m: dict(approximate=m.approximate),
    nn.LeakyReLU: lambda m: dict(negative_slope=m.negative_slope, inplace=m.inplace),
    nn.Sigmoid: _none,
    nn.Tanh: _none,
    nn.Identity: _none,
    nn.Softmax: lambda m: dict(dim=m.dim),
    nn.MaxPool1d: lambda m: dict(
        kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
        return_indices=m.return_indices, ceil_mode=m.ceil_mode,
    ),
    nn.MaxPool2d: lambda m: dict(
        kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
        return_indices=m.return_indices, ceil_mode=m.ceil_mode,
    ),
    nn.AvgPool1d: lambda m: dict(
        kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad,
    ),
    nn.AvgPool2d: lambda m: dict(
        kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad, divisor_override=m.divisor_override,
    ),
    nn.AdaptiveAvgPool1d: lambda m: dict(output_size=m.output_size),
    nn.AdaptiveAvgPool2d: lambda m: dict(output_size=m.output_size),
    nn.AdaptiveMaxPool1d: lambda m: dict(
        output_size=m.output_size, return_indices=m.return_indices
    ),
    nn.AdaptiveMaxPool2d: lambda m: dict(
        output_size=m.output_size, return_indices=m.return_indices
    ),
    nn.Flatten: lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim),
    nn.Dropout: lambda m: dict(p=m.p, inplace=m.inplace),
    nn.Dropout1d: lambda m: dict(p=m.p, inplace=m.inplace),
    nn.Dropout2d: lambda m: dict(p=m.p, inplace=m.inplace),
}


def _qualified_ctor(cls: type) -> str:
    return f"torch.nn.{cls.__name__}"


def _leaf_constructor(path: str, module: nn.Module) -> str:
    cls = type(module)
    make_kwargs = _LEAF_CONSTRUCTORS.get(cls)
    if make_kwargs is None:
        raise GranularError(
            f"cannot save module {path!r} of type {cls.__module__}.{cls.__qualname__}: model.py can rebuild "
            f"torch, timm and torchvision modules only; make this module traceable instead of a leaf"
        )
    if len(module._modules) > 0:
        raise GranularError(
            f"cannot save module {path!r} ({cls.__name__}): it has unexpected child modules "
            f"{sorted(module._modules)}"
        )
    return _call(_qualified_ctor(cls), **make_kwargs(module))


# --------------------------------------------------------------------------------------------
# Globals referenced by the generated forward
# --------------------------------------------------------------------------------------------

_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "_operator"}


def _resolve(module_name: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _import_lines_for_global(name: str, obj: Any) -> list[str]:
    """The statements that bind ``name`` to ``obj`` at module level in model.py."""
    from torch.fx.graph import _custom_builtins  # the builtins FX prefills into every graph

    custom = _custom_builtins.get(name)
    if custom is not None and custom.obj is obj:
        return [custom.import_str]
    if getattr(builtins, name, None) is obj:
        return []
    if isinstance(obj, str):  # a string annotation (``from __future__ import annotations``)
        return [f"{name} = {obj!r}"]
    if name in _RESERVED_NAMES:
        raise GranularError(
            f"cannot save: the graph uses a global named {name!r}, which model.py reserves"
        )
    if isinstance(obj, types.ModuleType):
        mod_name = obj.__name__
        _check_importable_package(name, obj, mod_name)
        return [f"import {mod_name}" if mod_name == name else f"import {mod_name} as {name}"]

    mod_name = getattr(obj, "__module__", None)
    candidates = [getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)]
    if mod_name is not None:
        _check_importable_package(name, obj, mod_name)
        # Prefer the public spelling of C-accelerated stdlib modules (_operator -> operator).
        modules = [mod_name.lstrip("_"), mod_name] if mod_name.startswith("_") else [mod_name]
        for module_candidate in modules:
            for qualname in candidates:
                if not qualname or "<" in qualname:
                    continue
                try:
                    found = _resolve(module_candidate, qualname)
                except Exception:
                    continue
                if found is obj:
                    if "." not in qualname:
                        if qualname == name:
                            return [f"from {module_candidate} import {qualname}"]
                        return [f"from {module_candidate} import {qualname} as {name}"]
                    return [f"import {module_candidate}", f"{name} = {module_candidate}.{qualname}"]
    raise GranularError(
        f"cannot save: the graph uses global {name!r} = {obj!r}, which cannot be written as an "
        f"import (define it at module level in an importable module)"
    )


_ZOO_PACKAGES = ("timm", "torchvision")


def _check_importable_package(name: str, obj: Any, module_name: str) -> None:
    top = module_name.split(".")[0]
    if top == "torch" or top in _STDLIB:
        return
    if top in _ZOO_PACKAGES and callable(obj) and not isinstance(obj, type):
        # a library function kept whole while tracing (timm's / torchvision's FX-wrapped
        # helpers, e.g. position-embedding resampling): the saved model then needs that
        # package installed, but never the original model class nor granular
        return
    if top == "__main__":
        why = "it is defined in __main__"
    elif top == "granular":
        why = "model.py must load without granular installed"
    else:
        why = (f"model.py may import only torch, the standard library and timm/torchvision functions, "
               f"not {top!r}")
    raise GranularError(f"cannot save: the graph uses global {name!r} = {obj!r} from "
                        f"module {module_name!r}; {why}")


def _forward_source(gm: torch.fx.GraphModule) -> tuple[str, list[str], list[str]]:
    """(forward source indented for the class body, import lines, names to torch.fx.wrap)."""
    python_code = gm.graph.python_code(root_module="self")
    src = python_code.src
    lines = src.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("def forward(")), None)
    if start is None:
        raise GranularError("cannot save: the graph's generated code has no forward function")
    wrapped: list[str] = []
    for line in lines[:start]:
        line = line.strip()
        if not line:
            continue
        match = re.fullmatch(r'[\w.]+\("(\w+)"\)', line)
        if match is None:
            raise GranularError(f"cannot save: unexpected line in generated code: {line!r}")
        wrapped.append(match.group(1))
    body_lines = [line.rstrip() for line in lines[start:]]
    while body_lines and not body_lines[-1]:
        body_lines.pop()
    body = "\n".join(body_lines)
    if "self._in_spec" in body or "self._out_spec" in body:
        raise GranularError(
            "cannot save: graphs with pytree input/output specs (concrete_args) are not supported"
        )

    tree = ast.parse(body)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used.update(wrapped)
    imports: list[str] = []
    for name, obj in python_code.globals.items():
        if name not in used:
            continue
        for stmt in _import_lines_for_global(name, obj):
            if stmt not in imports:
                imports.append(stmt)
    indented = "\n".join((_INDENT + line) if line else "" for line in body.split("\n"))
    return indented, imports, wrapped


# --------------------------------------------------------------------------------------------
# model.py generation
# --------------------------------------------------------------------------------------------


def _tensor_constructor(t: torch.Tensor) -> str:
    return f"torch.empty({_lit(tuple(t.shape))}, dtype={t.dtype})"


def _owner_expr(path: str) -> str:
    return "self" if path == "" else f"self.get_submodule({path!r})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_library_leaf(module: nn.Module) -> bool:
    """A module kept whole while tracing whose class comes from torch, timm or torchvision
    (timm's FX-leaf attention blocks, ``nn.Upsample``, ...), without a constructor in
    ``_LEAF_CONSTRUCTORS``: it is saved pickled in ``leaves.pt`` instead."""
    top = type(module).__module__.split(".")[0]
    return top in ("torch",) + _ZOO_PACKAGES


def _collect_structure(gm: torch.fx.GraphModule) -> tuple[list[str], list[str], dict[str, nn.Module]]:
    """__init__ body lines, the qualified names of non-persistent tensor constants, and the
    library leaves to pickle (by path)."""
    call_targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner_path, _, attr = str(node.target).rpartition(".")
            try:
                owner = gm.get_submodule(owner_path)
            except AttributeError as exc:
                raise GranularError(f"cannot save: get_attr target {node.target!r} "
                                    f"does not exist") from exc
            value = getattr(owner, attr, None)
            if not isinstance(value, torch.Tensor):
                raise GranularError(
                    f"cannot save: get_attr target {node.target!r} is a "
                    f"{type(value).__name__}, not a tensor"
                )

    init: list[str] = []
    constants: list[str] = []
    library: dict[str, nn.Module] = {}

    def tensors_of(path: str, module: nn.Module) -> None:
        owner = _owner_expr(path)
        for name, param in module._parameters.items():
            if param is None:
                continue
            init.append(
                f"{owner}.register_parameter({name!r}, torch.nn.Parameter("
                f"{_tensor_constructor(param)}, requires_grad={param.requires_grad}))"
            )
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            persistent = name not in non_persistent
            init.append(
                f"{owner}.register_buffer({name!r}, {_tensor_constructor(buf)}"
                + ("" if persistent else ", persistent=False") + ")"
            )
            if not persistent:
                constants.append(_join(path, name))
        # Plain tensor attributes (e.g. FX's ``_tensor_constant0``) become non-persistent
        # buffers so that they follow ``.to(device)``.
        for name, value in vars(module).items():
            if name.startswith("__") or not isinstance(value, torch.Tensor):
                continue
            if isinstance(value, nn.Parameter):
                raise GranularError(f"cannot save: unregistered parameter {_join(path, name)!r}")
            init.append(
                f"{owner}.register_buffer({name!r}, {_tensor_constructor(value)}, "
                f"persistent=False)"
            )
            constants.append(_join(path, name))

    def visit(path: str, module: nn.Module) -> None:
        tensors_of(path, module)
        for name, child in module._modules.items():
            if child is None:
                continue
            child_path = _join(path, name)
            if child_path in call_targets and type(child) not in _LEAF_CONSTRUCTORS and _is_library_leaf(child):
                init.append(f"{_owner_expr(path)}.add_module({name!r}, _library_leaf({child_path!r}))")
                library[child_path] = child
            elif type(child) in _LEAF_CONSTRUCTORS or child_path in call_targets:
                ctor = _leaf_constructor(child_path, child)
                init.append(f"{_owner_expr(path)}.add_module({name!r}, {ctor})")
                for pname, param in child.named_parameters(recurse=False):
                    if not param.requires_grad:
                        init.append(f"{_owner_expr(child_path)}.get_parameter({pname!r})"
                                    f".requires_grad_(False)")
                _check_leaf_extras(child_path, child)
            else:
                init.append(f"{_owner_expr(path)}.add_module({name!r}, torch.nn.Module())")
                visit(child_path, child)

    visit("", gm)
    return init, constants, library


def _check_leaf_extras(path: str, module: nn.Module) -> None:
    extra = [n for n, v in vars(module).items() if isinstance(v, torch.Tensor)]
    if extra or getattr(module, "_non_persistent_buffers_set", None):
        raise GranularError(
            f"cannot save module {path!r} ({type(module).__name__}): it carries extra tensors "
            f"{sorted(set(extra) | set(module._non_persistent_buffers_set))}"
        )


_LEAVES_HELPER = '''_LEAVES = {}


def _library_leaf(path):
    return _LEAVES[path]'''

_LOAD_FUNCTION = '''
def load(directory: "str | None" = None, map_location: str = "cpu") -> CompactModel:
    """Build CompactModel and load its weights from model.safetensors in ``directory``.

    ``directory`` defaults to the folder that holds this file. Returns the model in eval mode.
    """
    import os
    import safetensors.torch

    if directory is None:
        directory = os.path.dirname(os.path.abspath(__file__))
    if isinstance(map_location, torch.device):
        map_location = str(map_location)
    state = safetensors.torch.load_file(os.path.join(directory, _WEIGHTS_FILE), device=map_location)
    constants = {name: state.pop(name) for name in _CONSTANTS}
    if _LEAVES_FILE is not None:
        _LEAVES.update(torch.load(os.path.join(directory, _LEAVES_FILE), map_location=map_location,
                                  weights_only=False))
    model = CompactModel()
    # assign=True keeps the saved dtypes (and avoids a copy); shapes are still checked.
    model.load_state_dict(state, strict=True, assign=True)
    for qualified, value in constants.items():
        owner, _, name = qualified.rpartition(".")
        model.get_submodule(owner).register_buffer(name, value, persistent=False)
    return model.eval()
'''


def _generate_source(gm: torch.fx.GraphModule) -> tuple[str, list[str], dict[str, nn.Module]]:
    forward, imports, wrapped = _forward_source(gm)
    init, constants, library = _collect_structure(gm)
    header = [
        '"""Compact model written by granular.save.',
        "",
        "Needs only PyTorch and safetensors. Use ``load()`` to build the model and load",
        "model.safetensors from this folder:",
        "",
        "    import importlib.util",
        '    spec = importlib.util.spec_from_file_location("compact_model", "path/to/model.py")',
        "    module = importlib.util.module_from_spec(spec)",
        "    spec.loader.exec_module(module)",
        "    model = module.load()",
        "",
        f"Format version {SAVE_FORMAT_VERSION}; written with torch {torch.__version__}.",
        '"""',
        "",
    ]
    import_lines = ["import torch"] + [line for line in imports if line != "import torch"]
    parts = ["\n".join(header), "\n".join(import_lines), ""]
    if wrapped:
        parts.append("\n".join(f"torch.fx.wrap({name!r})" for name in wrapped) + "\n")
    parts.append(f"_WEIGHTS_FILE = {WEIGHTS_FILE!r}")
    parts.append("# Non-persistent tensors stored in the weights file next to the state dict.")
    parts.append(f"_CONSTANTS = {_lit(tuple(constants))}")
    parts.append("# timm/torchvision modules kept whole while tracing, pickled (they need that package).")
    parts.append(f"_LEAVES_FILE = {(LEAVES_FILE if library else None)!r}")
    parts.append(_LEAVES_HELPER)
    parts.append("\n")
    init_body = "\n".join(_INDENT * 2 + line for line in ["super().__init__()", *init])
    parts.append(
        "class CompactModel(torch.nn.Module):\n"
        f"{_INDENT}def __init__(self):\n{init_body}\n\n{forward}\n"
    )
    parts.append(_LOAD_FUNCTION)
    return "\n".join(parts), constants, library


# --------------------------------------------------------------------------------------------
# File writing
# --------------------------------------------------------------------------------------------


def _atomic_write(target: pathlib.Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_text(target: pathlib.Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(target, write)


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
         *, metadata: dict | None = None) -> pathlib.Path:
    """Write ``model`` (an exported compact GraphModule) to the directory ``path``.

    The directory (and its parents) is created. It receives ``model.py`` (self-contained
    source, loadable without granular), ``model.safetensors`` and ``granular.json``; each file
    is written atomically. Returns the directory as a :class:`pathlib.Path`.

    Raises :class:`~granular.errors.GranularError` if the model holds a module type outside
    the supported standard ``torch.nn`` leaves, or its code uses a global that cannot be
    written as a torch/standard-library import.
    """
    if not isinstance(model, torch.fx.GraphModule):
        raise GranularError(
            f"granular.save expects the torch.fx.GraphModule returned by granular.export, "
            f"got {type(model).__name__}"
        )
    if metadata is not None and not isinstance(metadata, dict):
        raise GranularError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        metadata_json = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise GranularError(f"metadata is not JSON-serialisable: {exc}") from None

    source, constants, library = _generate_source(model)
    tensors = _storable_tensors(model, constants)
    _verify_structure(source, tensors, library)

    unique_params = {id(p): p for p in model.parameters()}.values()
    info = {
        "format_version": SAVE_FORMAT_VERSION,
        "torch_version": torch.__version__,
        "parameters": int(sum(p.numel() for p in unique_params)),
        "nonzero_parameters": int(sum(int(torch.count_nonzero(p.detach()))
                                      for p in unique_params)),
        "metadata": metadata_json,
    }

    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise GranularError(f"cannot save to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    import safetensors.torch

    _atomic_write(directory / WEIGHTS_FILE,
                  lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}))
    if library:
        _atomic_write(directory / LEAVES_FILE, lambda tmp: torch.save(library, tmp))
    _write_text(directory / MODEL_FILE, source)
    _write_text(directory / INFO_FILE, json.dumps(info, indent=2) + "\n")
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
