"""The MobileNet-like space: block strings, layout, and trace -> gate -> exact export."""

from __future__ import annotations

import textwrap

import pytest
import torch

import granular
from granular.cli import main
from granular.errors import GranularError
from granular.search_spaces import build_search_space, describe_op
from granular.search_spaces.mobilenet import MixedLayer, MobileNetSpace, decode_block_str


def test_block_strings_decode_and_bad_ones_say_what_is_wrong():
    spec = decode_block_str("ir_r2_k3.5.7_s2_e6_c24")
    assert (spec.kind, spec.repeats, spec.kernels, spec.stride, spec.expansion, spec.channels) == \
        ("ir", 2, (3, 5, 7), 2, 6.0, 24)
    assert decode_block_str("ds_r1_k3_s1_c16").kernels == (3,)
    for bad, needle in (("xx_r1_k3_s1_c8", "unknown block type"), ("ir_r1_k4_s1_c8", "odd"),
                        ("ir_r1_k3_s1", "missing c"), ("ir_r1_kx_s1_c8", "cannot read"),
                        ("ds_r1_k3.5_s1_c8", "one kernel")):
        with pytest.raises(GranularError, match=needle):
            decode_block_str(bad)


def test_default_space_has_17_layers_of_three_kernel_candidates():
    with torch.device("meta"):
        net = build_search_space("mobilenet", 1000, 3)
    assert len(net.layers) == 17
    mixed = [m for m in net.layers if isinstance(m, MixedLayer)]
    assert len(mixed) == 16 and all(list(m.ops) == ["ir_k3", "ir_k5", "ir_k7"] for m in mixed)
    assert [m.ops["ir_k7"].dw.kernel_size for m in mixed][0] == (7, 7)
    assert sum(m.residual for m in mixed) == 10    # the layers that keep their shape


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_space_traces_gates_and_exports_exactly(seed):
    torch.manual_seed(seed)
    net = build_search_space("mobilenet:tiny", 10, 1)
    x = torch.randn(4, 1, 8, 8)
    gm = granular.prepare(net, x)
    bank = gm.granular_gates
    assert len(bank.op) == 15     # 5 searched layers x 3 candidates
    hidden = [k for k in bank.filter if k.endswith("expand")]
    assert len(hidden) == 15      # each candidate's hidden width is searched filter by filter
    granular.testing.random_masks_(gm, op=0.4, filter=0.4, weight=0.4, seed=seed)
    gm.eval()
    compact = granular.export(gm)
    with torch.no_grad():
        assert torch.allclose(compact(x), gm(x), atol=1e-5, rtol=1e-5)
    count = granular.count_params(gm)
    assert count.total == sum(p.numel() for p in compact.parameters())
    assert count.nonzero == sum(int(torch.count_nonzero(p)) for p in compact.parameters())


def test_pruning_every_candidate_of_a_residual_layer_removes_the_layer():
    torch.manual_seed(0)
    net = build_search_space("mobilenet:tiny", 10, 1)
    x = torch.randn(2, 1, 8, 8)
    gm = granular.prepare(net, x)
    residual = [i for i, m in enumerate(net.layers) if isinstance(m, MixedLayer) and m.residual]
    assert residual
    i = residual[0]
    for key, gate in gm.granular_gates.op.items():
        if describe_op(key) and describe_op(key)["cell"] == i:
            gate.mask.zero_()
    gm.eval()
    compact = granular.export(gm)
    names = {n for n, _ in compact.named_parameters()}
    assert not any(n.startswith(f"layers.{i}.") for n in names)
    with torch.no_grad():
        assert torch.allclose(compact(x), gm(x), atol=1e-5)


def test_describe_op_names_layer_and_kernel():
    assert describe_op("layers.3.ops.ir_k5.dw") == {"cell": 3, "op": "ir_k5"}
    assert describe_op("layers_12_ops_ir_k7_expand") == {"cell": 12, "op": "ir_k7"}
    assert describe_op("stem.0") is None


def test_search_a_user_registered_space_from_model_py(tmp_path, capsys):
    f = tmp_path / "space.py"
    f.write_text(textwrap.dedent('''
        from granular.search_spaces import register_search_space
        from granular.search_spaces.mobilenet import MobileNetSpace

        @register_search_space("user_mobile_test")
        def user_space(num_classes, in_channels):
            return MobileNetSpace(["ds_r1_k3_s1_c8", "ir_r2_k3.5_s2_e2_c12"], num_classes, in_channels,
                                  stem=8, head=0, stem_stride=1)
    '''))
    out = tmp_path / "run"
    code = main(["search", f"{f}:user_mobile_test", "--target-params", "2K", "--epochs", "2", "--warmup-epochs", "1",
                 "--out", str(out), "--no-progress", "--single-stage", "--prune-every", "1"])
    assert code == 0, capsys.readouterr().err  # one round, the budget's last: it lands
    arch = (out / "arch.json").read_text()
    assert '"op": "ir_k5"' in arch and (out / "model" / "model.py").exists()


def test_mobilenet_space_rejects_an_empty_layout():
    with pytest.raises(GranularError, match="at least one block string"):
        MobileNetSpace([], 10, 3)
