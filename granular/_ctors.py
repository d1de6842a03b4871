"""Constructor source for the standard ``torch.nn`` leaves of an exported model: each module is
rebuilt from its attributes (never from ``repr``), as :mod:`granular._source` writes it into
``model.py``."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from granular.errors import GranularError

__all__ = ["lit", "call", "leaf_constructor", "qualified_ctor", "LEAF_CONSTRUCTORS"]

# --------------------------------------------------------------------------------------------
# Literals
# --------------------------------------------------------------------------------------------


def lit(value: Any) -> str:
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
            return f"({lit(value[0])},)"
        return "(" + ", ".join(lit(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(lit(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} {value!r} as a literal")


def call(ctor: str, **kwargs: Any) -> str:
    return f"{ctor}(" + ", ".join(f"{k}={lit(v)}" for k, v in kwargs.items()) + ")"


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


LEAF_CONSTRUCTORS: dict[type, Callable[[nn.Module], dict]] = {
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


def qualified_ctor(cls: type) -> str:
    return f"torch.nn.{cls.__name__}"


def leaf_constructor(path: str, module: nn.Module) -> str:
    cls = type(module)
    make_kwargs = LEAF_CONSTRUCTORS.get(cls)
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
    return call(qualified_ctor(cls), **make_kwargs(module))
