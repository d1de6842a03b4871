"""split_stages: resolution stages of a gated graph (the first step of multi-stage search)."""

import pytest
import timm
import torch
from torch import nn

import granular
from granular.meta import MEMBER, OP_UNIT
from granular.passes.split_stages import STAGE, assign_stages, count_resolutions, split_stages
from granular.search_spaces import build_search_space
from granular.testing import random_masks_


def _gated(name):
    if name == "darts":
        model, x = build_search_space("darts:tiny", num_classes=10, in_channels=1), torch.randn(2, 1, 28, 28)
    else:
        model, x = timm.create_model("resnet10t", num_classes=10), torch.randn(2, 3, 64, 64)
    gm = granular.prepare(model.eval(), x)
    random_masks_(gm, seed=2)
    return gm.eval(), x


@pytest.mark.parametrize("name", ["darts", "resnet"])
def test_stages_cover_every_node_once_and_compose_to_the_gated_graph(name):
    gm, x = _gated(name)
    split = split_stages(gm, max_stages=3)
    stages = [m for n, m in split.named_children() if n.startswith("submod_")]
    assert len(stages) == 3
    compute = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")}
    seen = [n.name for s in stages for n in s.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert sorted(seen) == sorted(compute)  # each node in exactly one stage
    torch.testing.assert_close(split(x), gm(x), rtol=0, atol=0)


def test_operation_units_are_not_cut_and_reduction_ops_start_the_next_stage():
    gm, _ = _gated("darts")
    stage = assign_stages(gm, max_stages=3)
    tails = {n.meta[OP_UNIT].id: stage[n] for n in gm.graph.nodes if OP_UNIT in n.meta}
    for n in gm.graph.nodes:
        if n.meta.get(MEMBER) in tails and n.op != "get_attr":
            assert stage[n] == tails[n.meta[MEMBER]], n.name
    per_stage = [sum(1 for s in tails.values() if s == k) for k in range(3)]
    assert per_stage == [98, 98, 98]  # darts:tiny: one cell (14 edges x 7 ops) per resolution


def test_single_resolution_model_has_one_stage():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    gm = granular.prepare(model, torch.randn(1, 3, 8, 8))
    assert count_resolutions(gm) == 1
    assert set(assign_stages(gm).values()) == {0}
    assert all(STAGE in n.meta for n in gm.graph.nodes)
