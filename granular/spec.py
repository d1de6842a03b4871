"""Resolve a model SPEC: ``path/model.py[:callable]``, ``timm:NAME``, ``torchvision:NAME`` or a
registered search space.

A ``model.py`` may define its model as a function or an ``nn.Module`` subclass. Without
``:callable``, granular looks for, in order: ``model``, ``build_model``, ``create_model``,
``get_model``, ``Model``, ``Net``; then the only ``nn.Module`` subclass defined in the file.
Builders that accept ``num_classes`` / ``in_channels`` / ``image_size`` get the data set's values.

Zoo models (``timm:NAME``, ``torchvision:NAME``) are built with random weights
(``pretrained=False`` / ``weights=None``): nothing is downloaded, so a spec resolves on an
offline machine; ``granular search --weights FILE`` starts from trained ones
(:mod:`granular.weights`). Each has a default example input, the size its family was
designed for, which :func:`default_input` returns for ``granular inspect`` and the coverage
benchmark.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from granular.errors import GranularError
from granular.io import _load_source_module
from granular.search_spaces import build_search_space, get_search_space, list_search_spaces

__all__ = ["build_model", "is_search_space", "spec_name", "resolve_leaves", "ZOOS", "is_zoo_spec",
           "build_zoo_model", "default_input", "list_zoo_models"]

_DEFAULT_NAMES = ("model", "build_model", "create_model", "get_model", "Model", "Net")


def is_search_space(spec: str) -> bool:
    try:
        get_search_space(spec)
        return True
    except GranularError:
        return False


def spec_name(spec: str) -> str:
    """A short, file-name-safe name for a spec (used for default run directories)."""
    if spec.endswith(".py") or ".py:" in spec:
        path, _, fn = spec.partition(".py")
        base = Path(path).name + (fn.replace(":", "-") if fn else "")
    else:
        base = spec.replace(":", "-")
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)


def _load_file(path: Path):
    name = f"granular_user_{abs(hash(str(path.resolve())))}"
    try:
        return _load_source_module(path, name)
    except GranularError:
        raise
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [""])[0]
        raise GranularError(f"importing {path} failed: {type(err).__name__}: {first}") from err


def _find_callable(module, path: Path, name: str | None) -> Callable:
    if name:
        fn = getattr(module, name, None)
        if fn is None and is_search_space(name):   # a search space the file registered
            return get_search_space(name)
        if fn is None or not callable(fn):
            raise GranularError(f"{path} has no callable '{name}': check the name after the colon")
        return fn
    for cand in _DEFAULT_NAMES:
        fn = getattr(module, cand, None)
        if callable(fn):
            return fn
    classes = [v for v in vars(module).values() if inspect.isclass(v) and issubclass(v, nn.Module)
               and v.__module__ == module.__name__]
    if len(classes) == 1:
        return classes[0]
    hint = f" (found {len(classes)} nn.Module classes: {', '.join(c.__name__ for c in classes)})" if classes else ""
    raise GranularError(f"no model found in {path}{hint}: define model() or class Model, "
                        f"or name it as {path}:callable")


def build_model(spec: str, *, num_classes: int, in_channels: int, image_size: int | None = None) -> nn.Module:
    """Build the model a SPEC names.

    Raises:
        GranularError: the spec names nothing buildable (one line, with the fix).
    """
    if ".py" in spec:
        path_s, _, name = spec.partition(".py")
        path = Path(path_s + ".py")
        name = name.lstrip(":") or None
        if not path.is_file():
            raise GranularError(f"model file {path} does not exist: check the path")
        fn = _find_callable(_load_file(path), path, name)
        kwargs = {}
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params:
            kwargs["num_classes"] = num_classes
        if "in_channels" in params:
            kwargs["in_channels"] = in_channels
        if "image_size" in params and image_size is not None:
            kwargs["image_size"] = image_size
        try:
            model = fn(**kwargs)
        except Exception as err:  # noqa: BLE001
            first = (str(err).strip().splitlines() or [""])[0]
            raise GranularError(f"building the model from {spec} failed: {type(err).__name__}: {first}") from err
        if not isinstance(model, nn.Module):
            raise GranularError(f"{spec} returned {type(model).__name__}, not an nn.Module: return the model")
        return model
    if is_zoo_spec(spec):
        return build_zoo_model(spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if is_search_space(spec):
        return build_search_space(spec, num_classes=num_classes, in_channels=in_channels)
    raise GranularError(f"unknown model spec '{spec}': use path/model.py[:callable], timm:NAME, torchvision:NAME "
                        f"or one of {', '.join(list_search_spaces())}")


def resolve_leaves(model: nn.Module, names: list[str]) -> list[type]:
    """Module classes named by ``--leaf NAME`` (a class name used somewhere in ``model``)."""
    types = {type(m).__name__: type(m) for m in model.modules()}
    out = []
    for name in names:
        if name not in types:
            raise GranularError(f"--leaf {name}: no module of class {name} in the model; "
                                f"use a class name that `granular inspect` lists")
        out.append(types[name])
    return out


# ----------------------------------------------------------------------------- the zoos
ZOOS = ("timm", "torchvision")


def is_zoo_spec(spec: str) -> bool:
    """True for ``timm:NAME`` and ``torchvision:NAME``."""
    zoo, sep, name = spec.partition(":")
    return bool(sep) and zoo in ZOOS and bool(name)


def list_zoo_models(zoo: str) -> list[str]:
    """Every model name a zoo offers (torchvision: classification models only)."""
    if zoo == "timm":
        import timm
        return timm.list_models()
    if zoo == "torchvision":
        from torchvision import models
        return models.list_models(module=models)
    raise GranularError(f"unknown zoo '{zoo}': use one of {', '.join(ZOOS)}")


def _close_matches(name: str, names: list[str]) -> str:
    import difflib
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def build_zoo_model(spec: str, *, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                    image_size: Optional[int] = None) -> nn.Module:
    """Build ``timm:NAME`` or ``torchvision:NAME`` with random weights.

    Args:
        spec: the spec.
        num_classes: classifier width (default: the model's own, 1000 for ImageNet models).
        in_channels: input channels. timm models take any; torchvision models take 3 only,
            so a 1-channel data set is an error with the fix.
        image_size: the input side, for models built for one size (timm ViTs).

    Raises:
        GranularError: unknown name (with close matches) or an impossible request.
    """
    zoo, _, name = spec.partition(":")
    names = list_zoo_models(zoo)
    if name not in names:
        raise GranularError(f"{zoo} has no model '{name}'{_close_matches(name, names)}: "
                            f"see {'timm.list_models()' if zoo == 'timm' else 'torchvision.models.list_models()'}")
    kwargs: dict = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if zoo == "timm":
            import timm
            if in_channels is not None:
                kwargs["in_chans"] = in_channels
            if image_size is not None:
                try:  # ViT-like families are built for one input size; the others take none
                    return timm.create_model(name, pretrained=False, img_size=image_size, **kwargs)
                except TypeError:
                    pass
            return timm.create_model(name, pretrained=False, **kwargs)
        from torchvision import models
        if in_channels not in (None, 3):
            raise GranularError(f"torchvision:{name} takes 3-channel images, not {in_channels}: "
                                f"use an RGB data set, or timm:{name} if timm has it (timm adapts in_chans)")
        if name in ("inception_v3", "googlenet"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        return models.get_model(name, weights=None, **kwargs)
    except GranularError:
        raise
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [""])[0]
        raise GranularError(f"building {spec} failed: {type(err).__name__}: {first}") from err


def default_input(spec: str, model: nn.Module, batch: int = 1) -> torch.Tensor:
    """An example input at the model's native size (timm's ``pretrained_cfg``; 224 otherwise,
    299 for torchvision's inception_v3)."""
    zoo, _, name = spec.partition(":")
    size = (3, 224, 224)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    elif zoo == "torchvision" and name == "inception_v3":
        size = (3, 299, 299)
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
