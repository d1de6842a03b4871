"""find_heads and head export: attention heads are units, and zero heads leave exactly."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granular
from granular.config import GateConfig
from granular.meta import HEADS
from granular.testing import check_export, random_masks_


class _Attention(nn.Module):
    """timm's ``Attention`` written out: fused qkv, per-head q/k norms, sdpa, proj; ``mask``
    adds a learned per-head bias (as Swin's relative position bias); ``mix`` puts a norm over
    all heads before proj (heads then stay whole); ``separate`` uses one linear per role;
    ``explicit`` writes softmax(q kᵀ) v out, with Swin's per-window mask added through a
    5-d view that counts heads."""

    def __init__(self, dim=24, heads=4, mask=False, mix=False, separate=False, explicit=False):
        super().__init__()
        self.explicit = explicit
        self.register_buffer("window_mask", torch.randn(3, 6, 6))
        self.h, self.d = heads, dim // heads
        self.separate = separate
        if separate:
            self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.d), nn.Identity()
        self.bias = nn.Parameter(torch.randn(1, heads, 6, 6)) if mask else None
        self.norm = nn.LayerNorm(dim) if mix else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.separate:
            q, k, v = (lin(x).view(B, N, self.h, self.d).transpose(1, 2) for lin in (self.q, self.k, self.v))
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.explicit:
            s = (q * 0.5) @ k.transpose(-2, -1)
            if self.bias is not None:
                s = s + self.bias
            s = s.view(-1, 3, self.h, N, N) + self.window_mask.unsqueeze(1).unsqueeze(0)
            o = F.dropout(s.view(-1, self.h, N, N).softmax(dim=-1), 0.0, self.training) @ v
            return self.proj(self.norm(o.transpose(1, 2).reshape(B, N, -1)))
        o = F.scaled_dot_product_attention(q * 1.0, k, v, attn_mask=self.bias)
        return self.proj(self.norm(o.transpose(1, 2).reshape(B, N, C)))


class _Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.attn = _Attention(**kw)
        self.fc = nn.Linear(24, 24)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.fc(x).relu()


class _Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Linear(5, 24)
        self.blocks = nn.Sequential(_Block(**kw), _Block(**kw))
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def _units(gm):
    return [n.meta[HEADS] for n in gm.graph.nodes if HEADS in n.meta and n.op == "call_module"]


def test_heads_are_found_with_their_rows_columns_and_reshapes():
    gm = granular.prepare(_Net().eval(), torch.randn(2, 6, 5))
    units = _units(gm)
    assert [u.key for u in units] == ["blocks_0_attn_heads", "blocks_1_attn_heads"]
    u = units[0]
    assert u.heads == 4 and u.proj == "blocks.0.attn.proj"
    (path, rows), = u.rows
    assert path == "blocks.0.attn.qkv"
    assert rows[1] == tuple(range(6, 12)) + tuple(range(30, 36)) + tuple(range(54, 60))  # q, k, v of head 1
    assert u.cols[1] == tuple(range(6, 12))
    assert sorted(d for _, d, _ in u.resizes) == [2, 3]  # (B, N, 3, H, D) at dim 3; (B, N, H*D) at dim 2
    assert u.scope == "blocks_0"  # the attention branch (norm -> attn) is an op unit; it owns the thresholds
    assert all(isinstance(gm.granular_gates.filter[u.key].beta, nn.Parameter) for u in units)


@pytest.mark.parametrize("kw", [{}, {"mask": True}, {"separate": True}, {"explicit": True, "mask": True}],
                         ids=["fused", "mask", "separate", "explicit"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_heads_export_exactly_and_leave_the_compact_model(kw, seed):
    torch.manual_seed(seed)
    model, x = _Net(**kw).eval(), torch.randn(6 if kw.get("explicit") else 3, 6, 5)  # explicit: 2 x 3 windows
    result = check_export(model, x, seed=seed)  # random masks at every granularity, heads included
    assert result.rel_err < 1e-4 and result.counted == result.exported, result.reason
    gm = granular.prepare(model, x[:3])
    random_masks_(gm, op=0.0, filter=0.0, weight=0.0, seed=seed)
    gates = gm.granular_gates.filter
    gates["blocks_0_attn_heads"].mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    gates["blocks_1_attn_heads"].mask.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    gm.eval()
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=1e-5, atol=1e-6)
    count = granular.count_params(gm)
    assert count.total == sum(p.numel() for p in compact.parameters())
    sub = compact.get_submodule
    proj0, proj1 = sub("blocks.0.attn.proj"), sub("blocks.1.attn.proj")
    assert (proj0.in_features, proj1.in_features) == (12, 6)  # 2 heads kept; 1 (zero-scaled) of none
    if kw.get("separate"):
        assert sub("blocks.0.attn.q").out_features == 12
    else:
        assert sub("blocks.0.attn.qkv").out_features == 36
    from granular.arch import architecture
    assert [h["kept"] for h in architecture(gm)["heads"]] == [2, 1]
    if kw.get("mask"):
        assert "getitem" in compact.code  # the per-head bias is cut to the kept heads
    if kw.get("explicit"):
        assert re.search(r"view\(-1, 3, 2, \w+, \w+\)", compact.code)  # the window view counts the kept heads


def test_the_explicit_form_is_found_and_its_view_and_masks_resized():
    gm = granular.prepare(_Net(explicit=True, mask=True).eval(), torch.randn(6, 6, 5))
    u = _units(gm)[0]
    assert u.heads == 4 and len(u.masks) == 1 and u.masks[0][2] == 1  # the (1, H, N, N) bias; the window mask broadcasts
    assert [(d, per) for _, d, per in u.resizes] == [(3, 1), (2, 1), (1, 1)]  # qkv reshape; the two score views


def test_a_norm_over_all_heads_keeps_them_whole():
    gm = granular.prepare(_Net(mix=True).eval(), torch.randn(2, 6, 5))
    assert _units(gm) == []


def test_head_gates_follow_the_config_and_train():
    model, x = _Net().eval(), torch.randn(2, 6, 5)
    assert _units(granular.prepare(model, x, GateConfig(head_gates=False))) == []
    assert _units(granular.prepare(model, x, GateConfig(filter_gates=False))) == []
    gm = granular.prepare(model, x)
    gm.train()
    gm(x).square().sum().backward()
    gate = gm.granular_gates.filter["blocks_0_attn_heads"]
    assert gate.beta.grad is not None and bool(gate.beta.grad.abs().sum() > 0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vits_prune_heads_exactly(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, img_size=32, patch_size=8, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    for seed in (0, 1):
        assert check_export(model, x, seed=seed).ok
    gm = granular.prepare(model, x[:1])
    assert len(_units(gm)) == 3
    random_masks_(gm, op=0.0, filter=0.5, weight=0.2, seed=4)
    gm.eval()
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=1e-4, atol=1e-5)
    kept = [int(gm.granular_gates.filter[f"blocks_{i}_attn_heads"].mask.sum()) for i in range(3)]
    heads = [compact.get_submodule(f"blocks.{i}.attn.proj").in_features // 64 for i in range(3)]
    assert heads == [max(k, 1) for k in kept] and sum(heads) < 9


def test_timm_swin_prunes_heads_exactly_through_its_window_views_and_bias():
    """Swin's window attention is the explicit form, with a per-head relative position bias
    and, in shifted blocks, a window mask added through views that count heads."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=56, depths=(2, 2),
                              num_heads=(2, 4), embed_dim=16).eval()
    x = torch.randn(2, 3, 56, 56)
    gm = granular.prepare(model, x[:1])
    units = _units(gm)
    assert [u.heads for u in units] == [2, 2, 4, 4] and all(len(u.masks) == 1 for u in units)
    # the qkv reshapes, and the two views of the one shifted block (stage 2's window is its whole map: no shift)
    assert sum(len(u.resizes) for u in units) == 4 + 2
    random_masks_(gm, op=0.0, filter=0.0, weight=0.2, seed=1)
    for u in units:  # every other head at zero
        gm.granular_gates.filter[u.key].mask.copy_((torch.arange(u.heads) % 2 == 0).float())
    gm.eval()
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=1e-4, atol=1e-5)
    assert granular.count_params(gm).total == sum(p.numel() for p in compact.parameters())
    assert [compact.get_submodule(u.proj).in_features // 8 for u in units] == [1, 1, 2, 2]


class _MHABlock(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        y = self.norm(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.fc(x).relu()


class _MHANet(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 32)
        self.blocks = nn.Sequential(_MHABlock(batch_first), _MHABlock(batch_first))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_opened_and_its_heads_prune_exactly(batch_first):
    """nn.MultiheadAttention (a leaf whose in_proj_weight is a bare parameter) is opened into
    linear -> sdpa -> linear sharing its parameters: the same function, heads as units."""
    from granular.passes.trace import trace
    from granular.testing import open_gates_
    torch.manual_seed(0)
    model, x = _MHANet(batch_first).eval(), torch.randn(3, 5, 6)
    assert not any(n.op == "call_module" and "attn" == str(n.target).rsplit(".", 1)[-1]
                   for n in trace(model, x).graph.nodes)  # no MultiheadAttention leaf is left
    gm = granular.prepare(model, x)
    assert [u.key for u in _units(gm)] == ["blocks_0_attn_heads", "blocks_1_attn_heads"]
    open_gates_(gm)
    gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    random_masks_(gm, op=0.0, filter=0.0, weight=0.3, seed=0)
    gm.granular_gates.filter["blocks_0_attn_heads"].mask.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    gm.eval()
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=1e-5, atol=1e-6)
    assert compact.get_submodule("blocks.0.attn.in_proj").out_features == 3 * 16
    assert granular.count_params(gm).total == sum(p.numel() for p in compact.parameters())


def test_multihead_attention_with_a_mask_or_cross_attention_stays_whole():
    from granular.passes.trace import trace

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, y):
            return self.attn(x, y, y, need_weights=False)[0]

    gm = trace(Cross(), (torch.randn(2, 3, 8), torch.randn(2, 4, 8)))
    assert any(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes)


def test_additions_inside_attention_scores_are_not_operations():
    """``q kᵀ + bias`` is a sum whose inputs are no operations: an α gate there, once zero,
    broke export (the per-head bias cut read a pruned input)."""
    plain = granular.prepare(_Net().eval(), torch.randn(6, 6, 5))
    biased = granular.prepare(_Net(explicit=True, mask=True).eval(), torch.randn(6, 6, 5))
    assert len(biased.granular_gates.op) == len(plain.granular_gates.op) == 4  # attention and MLP branches only


def test_a_shared_or_unbatched_multihead_attention_stays_whole():
    from granular.passes.trace import trace

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.attn(y, y, y, need_weights=False)[0]

    gm = trace(Twice(), torch.randn(2, 3, 8))
    assert sum(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes) == 2
    gm = trace(Twice(), torch.randn(3, 8))  # unbatched (L, E)
    assert sum(n.op == "call_module" and n.target == "attn" for n in gm.graph.nodes) == 2


class _TwoAttentions(nn.Module):
    """Two attentions whose linears are direct children of one module: one head key each."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.qkv1, self.proj1 = nn.Linear(16, 48), nn.Linear(16, 16)
        self.qkv2, self.proj2 = nn.Linear(16, 48), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def _attn(self, x, qkv, proj, heads):
        B, N, C = x.shape
        q, k, v = qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        return proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 16))

    def forward(self, x):
        x = self.embed(x)
        x = x + self._attn(x, self.qkv1, self.proj1, 2)
        x = x + self._attn(x, self.qkv2, self.proj2, 4)
        return self.head(x.mean(1))


def test_two_attentions_under_one_module_get_their_own_gates():
    model, x = _TwoAttentions().eval(), torch.randn(2, 6, 5)
    gm = granular.prepare(model, x)
    units = _units(gm)
    assert sorted(u.heads for u in units) == [2, 4] and len({u.key for u in units}) == 2
    result = check_export(model, x, seed=0)
    assert result.rel_err < 1e-4 and result.counted == result.exported, result.reason


class _MixedSoftmax(_Attention):
    """A softmax over the scores of all heads together: removing a head changes the others."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).reshape(B, self.h * N * N).softmax(dim=-1).reshape(B, self.h, N, N)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


def test_a_softmax_across_heads_keeps_them_whole():
    from granular.passes.find_heads import find_heads
    from granular.passes.find_units import find_units
    from granular.passes.trace import trace
    gm = find_heads(find_units(trace(_MixedSoftmax().eval(), torch.randn(2, 6, 24))))
    assert not any(HEADS in n.meta for n in gm.graph.nodes)
