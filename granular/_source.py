"""The source of an exported model's ``model.py``: :func:`generate_source` turns a compact
``torch.fx.GraphModule`` into self-contained Python (a ``CompactModel`` class with standard
``torch.nn`` constructors, the graph's ``forward`` and a ``load`` function), which
:func:`granular.save` writes next to the weights.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import sys
import types
from typing import Any

import torch
from torch import nn

from granular._ctors import LEAF_CONSTRUCTORS, leaf_constructor, lit
from granular.errors import GranularError

__all__ = ["generate_source", "SAVE_FORMAT_VERSION", "MODEL_FILE", "WEIGHTS_FILE", "INFO_FILE", "LEAVES_FILE"]

MODEL_FILE = "model.py"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "granular.json"
LEAVES_FILE = "leaves.pt"

#: Version of the on-disk layout written by :func:`granular.save`.
SAVE_FORMAT_VERSION = 1

_INDENT = "    "
# Names defined at module level in model.py; a graph global may not take them.
_RESERVED_NAMES = frozenset({"torch", "CompactModel", "load", "_CONSTANTS", "_WEIGHTS_FILE"})

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
    return f"torch.empty({lit(tuple(t.shape))}, dtype={t.dtype})"


def _owner_expr(path: str) -> str:
    return "self" if path == "" else f"self.get_submodule({path!r})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_library_leaf(module: nn.Module) -> bool:
    """A module kept whole while tracing whose class comes from torch, timm or torchvision
    (timm's FX-leaf attention blocks, ``nn.Upsample``, ...), without a constructor in
    ``LEAF_CONSTRUCTORS``: it is saved pickled in ``leaves.pt`` instead."""
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
            if child_path in call_targets and type(child) not in LEAF_CONSTRUCTORS and _is_library_leaf(child):
                init.append(f"{_owner_expr(path)}.add_module({name!r}, _library_leaf({child_path!r}))")
                library[child_path] = child
            elif type(child) in LEAF_CONSTRUCTORS or child_path in call_targets:
                ctor = leaf_constructor(child_path, child)
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


def generate_source(gm: torch.fx.GraphModule) -> tuple[str, list[str], dict[str, nn.Module]]:
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
    parts.append(f"_CONSTANTS = {lit(tuple(constants))}")
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
