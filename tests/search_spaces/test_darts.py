"""Tests for the search-space registry and the DARTS super-net."""

from __future__ import annotations

import functools
import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import granular.search_spaces as ss
from granular.errors import GranularError
from granular.search_spaces import (
    build_search_space,
    get_search_space,
    list_search_spaces,
    register_search_space,
)
from granular.search_spaces.darts import (
    PRIMITIVES,
    DartsSearchNet,
    FactorizedReduce,
    describe_op,
)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def _meta_params(spec: str, num_classes: int = 10, in_channels: int = 3) -> int:
    with torch.device("meta"):
        return _n_params(build_search_space(spec, num_classes, in_channels))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # With another process busy on the 2-core box, OpenMP's spin-waiting at 2 threads made
    # these many-small-op forwards ~100x slower (0.15 s -> 30 s); one thread avoids it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny() -> DartsSearchNet:
    torch.manual_seed(0)
    return build_search_space("darts:tiny", 10, 1).eval()


@pytest.fixture(scope="module")
def tiny_traced(tiny) -> fx.GraphModule:
    return fx.symbolic_trace(tiny)


# --- registry -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["darts", "darts:tiny", "darts:small", "darts:large"])
def test_registry_resolves(spec):
    assert spec in list_search_spaces()
    assert callable(get_search_space(spec))


@pytest.mark.parametrize("spec,cells,C", [("darts", 8, 24), ("darts:tiny", 3, 8),
                                          ("darts:small", 8, 24), ("darts:large", 14, 44)])
def test_presets_sizes(spec, cells, C):
    with torch.device("meta"):
        net = build_search_space(spec, 10, 3)
    assert (len(net.cells), net.C, net.nodes) == (cells, C, 4)
    assert _n_params(net) == _meta_params(spec)


@pytest.mark.parametrize("spec", ["resnet", "darts:huge", "darts:", "darts:tiny:x", ""])
def test_unknown_spec_raises_one_line(spec):
    with pytest.raises(GranularError) as info:
        get_search_space(spec)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(spec) in msg and "darts:tiny" in msg


def test_overrides():
    with torch.device("meta"):
        net = build_search_space("darts:tiny", 10, 1, cells=3, C=4, nodes=2, stem_multiplier=2)
    assert len(net.cells) == 3 and net.C == 4
    assert net.stem.conv.out_channels == 8
    assert list(net.cells[0].edges) == ["e0_2", "e1_2", "e0_3", "e1_3", "e2_3"]
    with pytest.raises(GranularError, match="bad overrides"):
        build_search_space("darts:tiny", 10, 1, widht=3)
    with pytest.raises(GranularError, match="cells"):
        build_search_space("darts:tiny", 10, 1, cells=0)


def test_register_warns_on_overwrite(monkeypatch):
    monkeypatch.setattr(ss._registry, "_SEARCH_SPACES", dict(ss._registry._SEARCH_SPACES))

    def toy(num_classes, in_channels, width=2):
        return nn.Linear(in_channels * width, num_classes)

    register_search_space("toy", presets={"w4": {"width": 4}})(toy)
    assert "toy:w4" in list_search_spaces()
    assert build_search_space("toy:w4", 3, 2).in_features == 8
    assert build_search_space("toy", 3, 2).in_features == 4
    with pytest.warns(UserWarning, match="overwriting"):
        register_search_space("toy")(toy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_search_space("toy2")(toy)


# --- structure ------------------------------------------------------------------------------

def test_every_edge_has_all_ops(tiny):
    for cell in tiny.cells:
        n_edges = sum(2 + j for j in range(cell.nodes))
        assert len(cell.edges) == n_edges
        for key, edge in cell.edges.items():
            assert key == f"e{edge.src}_{edge.dst}"
            assert tuple(edge.ops) == PRIMITIVES
            skip = edge.ops["skip_connect"]
            if cell.reduction and edge.src < 2:
                assert isinstance(skip, FactorizedReduce)
            else:
                assert isinstance(skip, nn.Identity)


@pytest.mark.parametrize("cells", [5, 8, 14])
def test_reduction_cells_double_channels(cells):
    with torch.device("meta"):
        net = build_search_space("darts", 10, 3, cells=cells, C=4)
    red = [i for i, c in enumerate(net.cells) if c.reduction]
    assert red == [cells // 3, 2 * cells // 3]
    widths = [c.C for c in net.cells]
    for i, cell in enumerate(net.cells):
        assert isinstance(cell.reduction, bool)
        expected = 4 * 2 ** sum(r <= i for r in red)
        assert widths[i] == expected
        prev_red = i > 0 and net.cells[i - 1].reduction
        assert isinstance(cell.preprocess0, FactorizedReduce) == prev_red
    assert net.classifier.in_features == 4 * widths[-1]


def test_no_bias_and_non_affine_bn_in_cells(tiny):
    for name, mod in tiny.cells.named_modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.bias is None, name
        if isinstance(mod, nn.BatchNorm2d):
            assert not mod.affine, name
    assert tiny.stem.bn.affine


# --- tracing --------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels,hw", [(1, 8), (3, 32), (3, 28), (1, 9)])
def test_traced_matches_eager(in_channels, hw):
    torch.manual_seed(0)
    net = build_search_space("darts:tiny", 10, in_channels)
    gm = fx.symbolic_trace(net)
    x = torch.randn(2, in_channels, hw, hw)
    for train in (False, True):
        net.train(train)
        gm.train(train)
        out = net(x)
        assert out.shape == (2, 10)
        torch.testing.assert_close(gm(x), out)


def test_sums_are_visible(tiny, tiny_traced):
    expected = 0
    for cell in tiny.cells:
        for j in range(cell.nodes):
            n_ops = sum(len(cell.edges[f"e{src}_{j + 2}"].ops) for src in range(2 + j))
            expected += n_ops - 1
    adds = [n for n in tiny_traced.graph.nodes
            if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == expected == 3 * 94
    banned = {torch.stack, torch.sum, sum}
    assert not any(n.target in banned for n in tiny_traced.graph.nodes)


def test_every_op_is_a_call_module_node(tiny, tiny_traced):
    targets = {n.target for n in tiny_traced.graph.nodes if n.op == "call_module"}
    for i, cell in enumerate(tiny.cells):
        for key, edge in cell.edges.items():
            path = f"cells.{i}.edges.{key}.ops.skip_connect"
            if isinstance(edge.ops["skip_connect"], nn.Identity):
                assert path in targets
            for op in PRIMITIVES:
                assert any(t.startswith(f"cells.{i}.edges.{key}.ops.{op}") for t in targets)


# --- size -----------------------------------------------------------------------------------

def test_param_counts():
    # Measured values (10 classes, 3 input channels), not estimates.
    assert _meta_params("darts:small") == 3_998_194
    assert _meta_params("darts:small", in_channels=1) == 3_996_898
    # DARTS' own search network (C=16, 8 cells) reports 1.930618M parameters.
    with torch.device("meta"):
        assert _n_params(build_search_space("darts", 10, 3, C=16, cells=8)) == 1_930_618
    assert _meta_params("darts:tiny") < _meta_params("darts:small") < _meta_params("darts:large")


# --- describe_op ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "cells.3.edges.e1_4.ops.sep_conv_3x3",
    "cells.3.edges.e1_4.ops.sep_conv_3x3.pw1",
    "model.cells.3.edges.e1_4.ops.sep_conv_3x3.bn2",
    "cells_3_edges_e1_4_ops_sep_conv_3x3_dw1",
])
def test_describe_op_parses(name):
    assert describe_op(name) == {"cell": 3, "edge": "e1_4", "src": 1, "dst": 4,
                                 "op": "sep_conv_3x3"}


def test_describe_op_all_ops_and_misses(tiny):
    for name, _ in tiny.named_modules():
        if name.count(".") == 5 and ".ops." in name:
            d = describe_op(name)
            assert d is not None and name == (
                f"cells.{d['cell']}.edges.{d['edge']}.ops.{d['op']}")
    for name in ["stem.conv", "cells.0.preprocess0.conv", "cells.0.edges.e0_2",
                 "cells.0.edges.e0_2.ops.none", "subcells.0.edges.e0_2.ops.sep_conv_3x3",
                 "cells.0.edges.e0_2.ops.sep_conv_3x3x",
                 "classifier"]:
        assert describe_op(name) is None
