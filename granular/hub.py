"""Models from the zoos: the ``timm:NAME`` and ``torchvision:NAME`` specs.

Models are built with random weights (``pretrained=False`` / ``weights=None``): nothing is
downloaded, so a spec resolves on an offline machine. Each model also has a default example
input, the size its family was designed for, which :func:`default_input` returns for
``granular inspect`` and the coverage benchmark.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from granular.errors import GranularError

__all__ = ["ZOOS", "is_zoo_spec", "build_zoo_model", "default_input", "list_zoo_models"]

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
