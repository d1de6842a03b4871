"""The DARTS search network: a relaxed super-net whose every candidate op is a module.

This is the "search network" of DARTS (Liu, Simonyan, Yang, *DARTS: Differentiable
Architecture Search*, ICLR 2019, arXiv:1806.09055), in the form MG-DARTS (multi-granularity
architecture search, IEEE TNNLS; ``docs/method.md``)
searches over: cells of ``nodes`` intermediate nodes, every node fed by an edge from every
earlier state, every edge carrying all seven candidate operations.

Deliberate differences from the DARTS reference code, all in service of the FX passes that
later insert operation, filter and weight gates:

* **No architecture parameters.** DARTS' ``MixedOp`` weights its ops by ``softmax(alpha)``.
  Here there are no alphas at all: the gates (sigmoid, one per op) are inserted by a compiler
  pass after tracing, so the super-net is a plain ``nn.Module``.
* **The sums are visible.** A node's value is a flat chain of Python ``+`` over the outputs of
  every op of every incoming edge (never ``torch.stack``, ``sum()`` or a reduction), so that
  each op output is a separate operand of an ``operator.add`` node in the
  ``torch.fx.symbolic_trace`` graph, where a gate can be spliced in.
* **skip_connect is a module.** With stride 1 it is ``nn.Identity()`` (not a bare
  ``lambda x: x``), so it shows up as its own ``call_module`` node and can be gated and pruned
  like any other op. With stride 2 it is :class:`FactorizedReduce`, as in DARTS.
* **No ``none`` op.** MG-DARTS prunes ops by gating them, so the zero op is not a candidate.
* **FactorizedReduce pads instead of relying on even sizes.** Its second branch reads
  ``F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))``; this equals DARTS on even sizes and keeps the two
  branches the same size on odd ones (e.g. 28 -> 14 -> 7 -> 4).
* **Readable names.** Ops live at ``cells.<i>.edges.e<src>_<dst>.ops.<op_name>`` (state
  indices: 0 and 1 are the cell inputs, node ``j`` is state ``j + 2``), and layers inside
  ops have names (``dw1``, ``pw1``, ``bn1``, ...). :func:`describe_op` parses such names.

As in DARTS search, BatchNorms inside cells have ``affine=False``; the stem BatchNorm is
affine. Reduction cells sit at ``cells // 3`` and ``2 * cells // 3`` and double the width.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from granular.errors import GranularError

__all__ = [
    "PRIMITIVES",
    "ReLUConvBN",
    "SepConv",
    "DilConv",
    "FactorizedReduce",
    "MixedEdge",
    "SearchCell",
    "DartsSearchNet",
    "make_op",
    "describe_op",
    "reduction_indices",
    "DARTS_PRESETS",
    "darts",
]

PRIMITIVES: tuple[str, ...] = (
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "avg_pool_3x3",
    "max_pool_3x3",
)
"""The candidate operations on every edge, in the order they are built and summed."""


class ReLUConvBN(nn.Sequential):
    """ReLU, a ``k x k`` conv and a BatchNorm (DARTS' cell preprocessing).

    Args:
        C_in: Input channels.
        C_out: Output channels.
        kernel_size: Conv kernel size.
        stride: Conv stride.
        padding: Conv padding.
        affine: Whether the BatchNorm has a learnable scale and shift.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, affine: bool = False) -> None:
        super().__init__(OrderedDict(
            relu=nn.ReLU(inplace=False),
            conv=nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
            bn=nn.BatchNorm2d(C_out, affine=affine),
        ))


class SepConv(nn.Sequential):
    """DARTS separable conv: two (ReLU, depthwise, pointwise, BN) blocks.

    Only the first depthwise conv is strided.

    Args:
        C_in: Input channels.
        C_out: Output channels.
        kernel_size: Depthwise kernel size.
        stride: Stride of the first depthwise conv.
        padding: Padding of both depthwise convs.
        affine: Whether the BatchNorms are affine.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = False) -> None:
        super().__init__(OrderedDict(
            relu1=nn.ReLU(inplace=False),
            dw1=nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            pw1=nn.Conv2d(C_in, C_in, 1, bias=False),
            bn1=nn.BatchNorm2d(C_in, affine=affine),
            relu2=nn.ReLU(inplace=False),
            dw2=nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            pw2=nn.Conv2d(C_in, C_out, 1, bias=False),
            bn2=nn.BatchNorm2d(C_out, affine=affine),
        ))


class DilConv(nn.Sequential):
    """DARTS dilated separable conv: ReLU, dilated depthwise, pointwise, BN.

    Args:
        C_in: Input channels.
        C_out: Output channels.
        kernel_size: Depthwise kernel size.
        stride: Depthwise stride.
        padding: Depthwise padding.
        dilation: Depthwise dilation.
        affine: Whether the BatchNorm is affine.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, affine: bool = False) -> None:
        super().__init__(OrderedDict(
            relu=nn.ReLU(inplace=False),
            dw=nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation,
                         groups=C_in, bias=False),
            pw=nn.Conv2d(C_in, C_out, 1, bias=False),
            bn=nn.BatchNorm2d(C_out, affine=affine),
        ))


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset 1x1 stride-2 convs, concatenated.

    ``conv_1`` reads ``x``; ``conv_2`` reads ``x`` shifted by one pixel, zero-padded at the
    bottom and right so that both branches have size ``ceil(H / 2)`` for odd ``H`` too.

    Args:
        C_in: Input channels.
        C_out: Output channels; must be even (each conv gives ``C_out // 2``).
        affine: Whether the BatchNorm is affine.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = False) -> None:
        super().__init__()
        assert C_out % 2 == 0, f"FactorizedReduce needs an even C_out, got {C_out}"
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        out = torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)
        return self.bn(out)


def make_op(name: str, C: int, stride: int) -> nn.Module:
    """Build one candidate op of the DARTS space.

    Args:
        name: One of :data:`PRIMITIVES`.
        C: Input and output channels.
        stride: 1, or 2 on the input edges of a reduction cell.

    Returns:
        The op module (BatchNorms non-affine, convs without bias).

    Raises:
        ValueError: If ``name`` is not a DARTS primitive.
    """
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(C, C)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2)
    if name == "avg_pool_3x3":
        return nn.Sequential(OrderedDict(
            pool=nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
            bn=nn.BatchNorm2d(C, affine=False),
        ))
    if name == "max_pool_3x3":
        return nn.Sequential(OrderedDict(
            pool=nn.MaxPool2d(3, stride=stride, padding=1),
            bn=nn.BatchNorm2d(C, affine=False),
        ))
    raise ValueError(f"unknown DARTS op {name!r}; known: {', '.join(PRIMITIVES)}")


class MixedEdge(nn.Module):
    """One edge of a cell: a container of all candidate ops, with no forward of its own.

    The cell calls each op directly, so that each op output is its own FX node.

    Args:
        src: Source state index (0, 1: cell inputs; ``k >= 2``: node ``k - 2``).
        dst: Destination state index (``>= 2``).
        C: Channels.
        stride: Stride of the edge's ops.
        primitives: Op names to build.
    """

    def __init__(self, src: int, dst: int, C: int, stride: int,
                 primitives: tuple[str, ...] = PRIMITIVES) -> None:
        super().__init__()
        self.src, self.dst, self.stride = src, dst, stride
        self.ops = nn.ModuleDict({name: make_op(name, C, stride) for name in primitives})

    def extra_repr(self) -> str:
        return f"src={self.src}, dst={self.dst}, stride={self.stride}"


class SearchCell(nn.Module):
    """A DARTS search cell: ``nodes`` nodes, each the visible sum of all ops on its edges.

    Args:
        nodes: Number of intermediate nodes.
        C_prev_prev: Channels of input ``s0`` (output of the cell two back).
        C_prev: Channels of input ``s1`` (output of the previous cell).
        C: Channels inside the cell.
        reduction: Whether this cell halves the resolution.
        reduction_prev: Whether the previous cell halved it (then ``s0`` is reduced here).

    Attributes:
        reduction: As given; a plain ``bool``.
        reduction_prev: As given.
        nodes: As given.
        C: As given.
        edges: ``nn.ModuleDict`` keyed ``e{src}_{dst}``.
    """

    def __init__(self, nodes: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        self.nodes = nodes
        self.C = C
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges = {}
        for j in range(nodes):
            for src in range(2 + j):
                stride = 2 if reduction and src < 2 else 1
                edges[f"e{src}_{j + 2}"] = MixedEdge(src, j + 2, C, stride)
        self.edges = nn.ModuleDict(edges)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for j in range(self.nodes):
            outs = []
            for src in range(2 + j):
                edge = self.edges[f"e{src}_{j + 2}"]
                for op in edge.ops.values():
                    outs.append(op(states[src]))
            s = outs[0]
            for o in outs[1:]:
                s = s + o
            states.append(s)
        return torch.cat(states[2:], dim=1)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction}, reduction_prev={self.reduction_prev}"


def reduction_indices(cells: int) -> tuple[int, ...]:
    """Indices of the reduction cells in a network of ``cells`` cells (DARTS rule).

    Args:
        cells: Number of cells.

    Returns:
        The sorted distinct indices among ``cells // 3`` and ``2 * cells // 3``.
    """
    return tuple(sorted({cells // 3, 2 * cells // 3}))


class DartsSearchNet(nn.Module):
    """The DARTS search network, without architecture parameters.

    Stem (conv 3x3 + BN), ``cells`` search cells, global average pool, linear classifier.

    Args:
        num_classes: Classifier outputs.
        in_channels: Input image channels.
        C: Initial cell width (DARTS' ``C``).
        cells: Number of cells (DARTS' ``layers``).
        nodes: Intermediate nodes per cell.
        stem_multiplier: The stem outputs ``stem_multiplier * C`` channels.

    Raises:
        GranularError: If a size is not a positive integer.
    """

    # trained from scratch by the search: the paper's gates, starting at σ(0) = 0.5
    granular_gate_start = "half"

    def __init__(self, num_classes: int, in_channels: int = 3, C: int = 24, cells: int = 8,
                 nodes: int = 4, stem_multiplier: int = 3) -> None:
        super().__init__()
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("C", C),
                           ("cells", cells), ("nodes", nodes),
                           ("stem_multiplier", stem_multiplier)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GranularError(f"DARTS search space: {key} must be a positive integer, "
                                    f"got {value!r}")
        self.num_classes, self.C, self.num_cells, self.nodes = num_classes, C, cells, nodes
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(C_curr),
        ))
        self.reduction_indices = reduction_indices(cells)
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        reduction_prev = False
        cell_list = []
        for i in range(cells):
            reduction = i in self.reduction_indices
            if reduction:
                C_curr *= 2
            cell_list.append(SearchCell(nodes, C_prev_prev, C_prev, C_curr, reduction,
                                        reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, nodes * C_curr
        self.cells = nn.ModuleList(cell_list)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        out = self.global_pooling(s1)
        return self.classifier(torch.flatten(out, 1))


_OP_PATH = re.compile(
    r"(?:^|[._])cells[._](\d+)[._]edges[._]e(\d+)_(\d+)[._]ops[._]("
    + "|".join(PRIMITIVES) + r")(?![A-Za-z0-9])"
)


def describe_op(module_path: str) -> dict | None:
    """Parse a qualified module name of a DARTS op (or anything inside one).

    Accepts dotted module paths (``cells.3.edges.e1_4.ops.sep_conv_3x3.pw1``), paths with a
    prefix (``model.cells.3...``) and FX node names, where dots became underscores
    (``cells_3_edges_e1_4_ops_sep_conv_3x3_pw1``).

    Args:
        module_path: The name to parse.

    Returns:
        ``{"cell": 3, "edge": "e1_4", "src": 1, "dst": 4, "op": "sep_conv_3x3"}``, or ``None``
        if the name does not lie inside a candidate op.
    """
    m = _OP_PATH.search(module_path)
    if m is None:
        return None
    cell, src, dst, op = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    return {"cell": cell, "edge": f"e{src}_{dst}", "src": src, "dst": dst, "op": op}


# Registration (``granular.search_spaces`` imports this module).
from granular.search_spaces._registry import register_search_space  # noqa: E402

DARTS_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"cells": 3, "C": 8},  # CPU-sized: a real search on 8x8 digits in minutes
    "small": {"cells": 8, "C": 24},
    "large": {"cells": 14, "C": 44},
}
"""Preset sizes: ``small`` and ``large`` are the MG-DARTS CIFAR-10 settings."""


@register_search_space("darts", presets=DARTS_PRESETS, default_preset="small", describe_op=describe_op,
                       op_order=PRIMITIVES, reduction_cells=reduction_indices)
def darts(num_classes: int, in_channels: int, *, cells: int = 8, C: int = 24, nodes: int = 4,
          stem_multiplier: int = 3) -> DartsSearchNet:
    """Build a DARTS search network (see :class:`DartsSearchNet`)."""
    return DartsSearchNet(num_classes, in_channels, C=C, cells=cells, nodes=nodes,
                          stem_multiplier=stem_multiplier)

