"""A MobileNet-like search space: per layer, inverted-residual candidates of kernel 3, 5 and 7.

The MG-DARTS journal paper's ImageNet experiments search a 17-layer MobileNet-like network:
every layer offers inverted-residual (IR) blocks with 3×3, 5×5 and 7×7 depthwise kernels as
candidate operations, their filter counts are searched directly (no fixed expansion ratio:
each IR's hidden width is gated filter by filter, starting from ``e × C_in``), and weights
are masked. Each layer is the visible sum of its candidates (each candidate an operation
unit), plus the identity when the layer keeps shape, so pruning every candidate of such a
layer removes the layer (depth pruning).

The network is described by a compact block-string form, in the spirit of timm's
EfficientNet builder (``_decode_block_str``). One string per stage::

    ir_r2_k3.5.7_s2_e6_c24     # 2 layers of IR candidates k3/k5/k7, first stride 2,
                               # hidden width up to 6 x input, 24 output channels
    ds_r1_k3_s1_c16            # a fixed depthwise-separable layer (dw k3 + pw), no candidates

Keys: ``r`` repeats, ``k`` candidate kernels (dot-separated), ``s`` stride of the first
layer, ``e`` expansion (IR only), ``c`` output channels. The default is MobileNetV2's
layout: 1 + 2 + 3 + 4 + 3 + 3 + 1 = 17 layers. Users describe their own spaces the same way::

    from granular.search_spaces import register_search_space
    from granular.search_spaces.mobilenet import MobileNetSpace

    @register_search_space("my_mobile")
    def my_mobile(num_classes, in_channels):
        return MobileNetSpace(["ds_r1_k3_s1_c16", "ir_r3_k3.5_s2_e4_c32"], num_classes, in_channels)

(``granular search path/model.py:my_mobile`` finds a space registered by that file.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from granular.errors import GranularError

__all__ = ["BlockSpec", "decode_block_str", "MobileNetSpace", "MixedLayer", "InvertedResidual", "MOBILENET_ARCH",
           "describe_op"]

MOBILENET_ARCH = (
    "ds_r1_k3_s1_c16",
    "ir_r2_k3.5.7_s2_e6_c24",
    "ir_r3_k3.5.7_s2_e6_c32",
    "ir_r4_k3.5.7_s2_e6_c64",
    "ir_r3_k3.5.7_s1_e6_c96",
    "ir_r3_k3.5.7_s2_e6_c160",
    "ir_r1_k3.5.7_s1_e6_c320",
)
"""MobileNetV2's 17-layer layout with three kernel candidates per IR layer (ImageNet)."""

_KEYS = {"r": int, "s": int, "e": float, "c": int}


@dataclass(frozen=True)
class BlockSpec:
    """One stage of the block string: ``repeats`` layers of ``kind`` (``ir`` or ``ds``)."""

    kind: str
    repeats: int
    kernels: tuple[int, ...]
    stride: int
    expansion: float
    channels: int


def decode_block_str(text: str) -> BlockSpec:
    """Parse one stage string such as ``ir_r2_k3.5.7_s2_e6_c24`` (see the module docstring).

    Raises:
        GranularError: naming the bad part and the expected form.
    """
    parts = str(text).strip().split("_")
    kind, fields = parts[0], {}
    form = "expected e.g. 'ir_r2_k3.5.7_s2_e6_c24' or 'ds_r1_k3_s1_c16'"
    if kind not in ("ir", "ds"):
        raise GranularError(f"block string {text!r}: unknown block type {kind!r} (use 'ir' or 'ds'); {form}")
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z])([0-9.]+)", part)
        if m is None or m.group(1) not in (*_KEYS, "k"):
            raise GranularError(f"block string {text!r}: cannot read {part!r}; {form}")
        key, value = m.groups()
        try:
            fields[key] = tuple(int(v) for v in value.split(".")) if key == "k" else _KEYS[key](value)
        except ValueError:
            raise GranularError(f"block string {text!r}: bad number in {part!r}; {form}") from None
    missing = [k for k in ("r", "k", "s", "c") if k not in fields]
    if missing:
        raise GranularError(f"block string {text!r}: missing {', '.join(missing)}; {form}")
    kernels = fields["k"]
    if any(k % 2 == 0 or k < 1 for k in kernels) or fields["r"] < 1 or fields["s"] not in (1, 2) or fields["c"] < 1:
        raise GranularError(f"block string {text!r}: kernels must be odd, repeats and channels positive, "
                            f"stride 1 or 2")
    if kind == "ds" and len(kernels) != 1:
        raise GranularError(f"block string {text!r}: a 'ds' layer has one kernel, not candidates")
    return BlockSpec(kind, fields["r"], kernels, fields["s"], fields.get("e", 6.0 if kind == "ir" else 1.0),
                     fields["c"])


class InvertedResidual(nn.Module):
    """One candidate: 1×1 expand → BN → ReLU6 → k×k depthwise → BN → ReLU6 → 1×1 project → BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, hidden: int):
        super().__init__()
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = self.act1(self.bn1(self.expand(x)))
        x = self.act2(self.bn2(self.dw(x)))
        return self.bn3(self.project(x))


class MixedLayer(nn.Module):
    """A searched layer: the sum of its IR candidates (``ops``), plus the input when the
    layer keeps its shape. Each candidate's output is its own FX node, joining the sum."""

    def __init__(self, c_in: int, c_out: int, kernels: Sequence[int], stride: int, expansion: float):
        super().__init__()
        hidden = max(1, round(c_in * expansion))
        self.ops = nn.ModuleDict({f"ir_k{k}": InvertedResidual(c_in, c_out, k, stride, hidden) for k in kernels})
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = None
        for op in self.ops.values():
            y = op(x)
            out = y if out is None else out + y
        return out + x if self.residual else out


class SeparableLayer(nn.Module):
    """A fixed depthwise-separable layer (MobileNetV2's first): dw k×k → BN → ReLU6 → 1×1 → BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, kernel, stride, kernel // 2, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))


class MobileNetSpace(nn.Module):
    """The MobileNet-like super-net: stem conv → searched layers → 1×1 head conv → pool → linear.

    Args:
        arch: block strings, one per stage (default :data:`MOBILENET_ARCH`, 17 layers).
        num_classes: classifier outputs.
        in_channels: input image channels.
        stem: stem conv channels (3×3, stride ``stem_stride``).
        head: channels of the last 1×1 conv before pooling (0: none).
        stem_stride: 2 for ImageNet-sized inputs; 1 for small images.

    Raises:
        GranularError: on a bad block string or size.
    """

    # trained from scratch by the search: the paper's gates, starting at σ(0) = 0.5
    granular_gate_start = "half"

    def __init__(self, arch: Sequence[str] = MOBILENET_ARCH, num_classes: int = 1000, in_channels: int = 3, *,
                 stem: int = 32, head: int = 1280, stem_stride: int = 2):
        super().__init__()
        if isinstance(arch, str):
            arch = [arch]
        if not arch:
            raise GranularError("a MobileNet space needs at least one block string")
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("stem", stem)):
            if not isinstance(value, int) or value < 1:
                raise GranularError(f"MobileNet space: {key} must be a positive integer, got {value!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU6())
        layers, c = [], stem
        for spec in (decode_block_str(s) for s in arch):
            for i in range(spec.repeats):
                stride = spec.stride if i == 0 else 1
                if spec.kind == "ds":
                    layers.append(SeparableLayer(c, spec.channels, spec.kernels[0], stride))
                else:
                    layers.append(MixedLayer(c, spec.channels, spec.kernels, stride, spec.expansion))
                c = spec.channels
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()) \
            if head else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head or c, num_classes)

    def forward(self, x):
        x = self.head(self.layers(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


_OP_PATH = re.compile(r"layers[._](\d+)[._]ops[._](ir_k\d+)")


def describe_op(module_path: str) -> dict | None:
    """``{"cell": layer, "op": "ir_k5"}`` for a path inside a candidate (dotted or FX name), else None.

    The layer is reported as ``cell`` so that reports group MobileNet layers as they group DARTS cells.
    """
    m = _OP_PATH.search(module_path)
    if m is None:
        return None
    return {"cell": int(m.group(1)), "op": m.group(2)}


# Registration (``granular.search_spaces`` imports this module).
from granular.search_spaces._registry import register_search_space  # noqa: E402

MOBILENET_PRESETS: dict[str, dict] = {
    # ImageNet: the 17-layer layout at full width.
    "imagenet": {},
    # CPU-sized for 8x8 digits: 6 searched layers, narrow, stem at stride 1.
    "tiny": {"arch": ("ds_r1_k3_s1_c8", "ir_r2_k3.5.7_s2_e3_c12", "ir_r2_k3.5.7_s2_e3_c16",
                      "ir_r1_k3.5.7_s1_e3_c24"),
             "stem": 8, "head": 64, "stem_stride": 1},
}


@register_search_space("mobilenet", presets=MOBILENET_PRESETS, default_preset="imagenet", describe_op=describe_op)
def mobilenet(num_classes: int, in_channels: int, *, arch: Sequence[str] = MOBILENET_ARCH, stem: int = 32,
              head: int = 1280, stem_stride: int = 2) -> MobileNetSpace:
    """Build the MobileNet-like super-net (see :class:`MobileNetSpace`)."""
    return MobileNetSpace(arch, num_classes, in_channels, stem=stem, head=head, stem_stride=stem_stride)
