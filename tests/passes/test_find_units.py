"""find_units: operation units at sums, gated layers, threshold scopes."""

import granular
from granular.meta import LAYER, MEMBER, OP_UNIT, SUM
from granular.passes.find_units import find_units
from granular.passes.trace import trace
from granular.search_spaces import build_search_space
from granular.search_spaces.darts import PRIMITIVES, describe_op

from _models import example, user_model


def _units(gm):
    return {n.meta[OP_UNIT].id: n.meta[OP_UNIT] for n in gm.graph.nodes if OP_UNIT in n.meta}


def test_every_darts_op_is_a_unit_of_its_node_sum():
    model = build_search_space("darts:tiny", 10, 1)
    gm = find_units(trace(model, example()))
    units = _units(gm)
    edges = sum(len(c.edges) for c in model.cells)
    assert len(units) == edges * len(PRIMITIVES)
    sums = [n for n in gm.graph.nodes if SUM in n.meta]
    assert len(sums) == len(model.cells) * 4  # one visible sum per intermediate node
    for unit in units.values():
        d = describe_op(unit.path)
        assert d is not None and unit.path.endswith(d["op"])
    # skip_connect on a stride-1 edge is an Identity node: a unit, not a bare wire
    assert any(u.path.endswith("skip_connect") and len(u.nodes) == 1 for u in units.values())


def test_residual_branch_is_a_unit_and_identity_skip_is_not():
    gm = find_units(trace(user_model("resnet_like"), example()))
    units = _units(gm)
    # four blocks: each residual branch is one unit; identity skips are never units,
    # projection shortcuts (conv+bn) are units of their own
    branch_paths = sorted(u.path for u in units.values())
    assert "layer1.0" in branch_paths and "layer2.0" in branch_paths
    assert "layer2.0.shortcut" in branch_paths
    assert len(units) == 5
    # conv1 of a block belongs to its block's unit, and so do its thresholds
    conv1 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "layer1.0.conv1")
    assert conv1.meta[MEMBER] == units[next(k for k, u in units.items() if u.path == "layer1.0")].id
    assert conv1.meta[LAYER].scope == conv1.meta[MEMBER]


def test_layer_roles_stem_head_and_depthwise():
    gm = find_units(trace(user_model("mobile_like"), example()))
    info = {n.meta[LAYER].module: n.meta[LAYER] for n in gm.graph.nodes if LAYER in n.meta}
    assert not info["stem.0"].weight_mask and info["stem.0"].filter_gate       # stem: β but no ω
    assert not info["head.4"].weight_mask and not info["head.4"].filter_gate   # classifier
    assert info["block.dw.0"].kind == "dwconv" and not info["block.dw.0"].filter_gate
    assert info["block.dw.0"].weight_mask
    assert info["block.pw.0"].filter_gate and info["block.pw.0"].weight_mask


def test_no_units_without_sums():
    gm = find_units(trace(user_model("vgg_like"), example()))
    assert not _units(gm)
    assert sum(1 for n in gm.graph.nodes if LAYER in n.meta) == 5


def test_gate_config_switches_granularities_off():
    cfg = granular.config.GateConfig(op_gates=False, weight_masks=False)
    gm = granular.prepare(user_model("resnet_like"), example(), cfg)
    bank = gm.granular_gates
    assert len(bank.op) == 0 and len(bank.weight) == 0 and len(bank.filter) > 0


def test_layers_with_fixed_channels_inside_a_transformer_are_masked_only_the_classifier_is_not():
    """The head (unmasked by default) is the layer whose values reach the output through no
    other layer. It used to be any layer with fixed output channels, which left a ViT's qkv,
    projection and second MLP layer without weight masks (only fc1 was masked)."""
    import pytest
    timm = pytest.importorskip("timm")
    import torch
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2)
    gm = find_units(trace(model.eval(), torch.randn(1, 3, 32, 32)))
    info = {n.meta[LAYER].module: n.meta[LAYER] for n in gm.graph.nodes if LAYER in n.meta}
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert info[f"blocks.0.{name}"].weight_mask, name
    assert not info["head"].weight_mask and not info["patch_embed.proj"].weight_mask
    assert info["blocks.0.mlp.fc1"].filter_gate and not info["blocks.0.attn.qkv"].filter_gate
