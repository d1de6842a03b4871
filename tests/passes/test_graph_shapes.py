"""Channel dependency groups on small graphs, one test per graph shape.

Each test prunes chosen filters (or random units), exports, and checks the two things that
matter: the compact model computes what the gated one did (eval mode), and the channels
that can be removed were removed while those that cannot were kept.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granular
from granular.testing import check_export, randomize_norms_


def _prune(gm, key, channels):
    """Set the stored filter mask of ``key`` to zero at ``channels``."""
    with torch.no_grad():
        gm.granular_gates.filter[key].mask[channels] = 0.0


def _compact(model, x, prune):
    model = randomize_norms_(model.eval())
    gm = granular.prepare(model, x)
    prune(gm)
    gm.eval()
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=1e-5, atol=1e-5)
    return gm, compact


def _count(gm, compact):
    from granular.accounting import count_module
    assert granular.count_params(gm) == count_module(compact)


def _conv_bn(cin, cout, k=3, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.a, self.b = _conv_bn(8, 6), _conv_bn(8, 4)
        self.fuse = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_removes_channels_of_either_input_at_their_offsets():
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(Concat(), x, lambda gm: (_prune(gm, "a_0", [1, 4]), _prune(gm, "b_0", [0])))
    _count(gm, compact)
    assert compact.get_submodule("a.0").out_channels == 4 and compact.get_submodule("b.0").out_channels == 3
    assert compact.fuse.in_channels == 7


class Split(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.stem = _conv_bn(3, 8)
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        if self.how == "split":
            a, b = torch.split(x, [3, 5], dim=1)
        else:
            a, b = x[:, :3], x[:, 3:]
        return self.left(a) + self.right(b)


@pytest.mark.parametrize("how", ["split", "slice"])
def test_split_and_slicing_rewrite_sizes_and_offsets(how):
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(Split(how), x, lambda gm: _prune(gm, "stem_0", [0, 2, 6]))
    _count(gm, compact)
    assert compact.get_submodule("stem.0").out_channels == 5
    assert (compact.left.in_channels, compact.right.in_channels) == (1, 4)


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        return self.head(a * torch.sigmoid(b))


def test_chunk_couples_the_halves_it_multiplies():
    x = torch.randn(2, 3, 8, 8)
    # the product couples position 1 of the first half with position 1 of the second (channel 5)
    gm, compact = _compact(Chunk(), x, lambda gm: _prune(gm, "stem_0", [1, 5]))
    _count(gm, compact)
    assert compact.get_submodule("stem.0").out_channels == 6 and compact.head.in_channels == 3


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.body = nn.Sequential(_conv_bn(8, 12), nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def test_residual_branch_is_an_op_unit_and_its_inner_channels_are_prunable():
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(Residual(), x)
    assert list(gm.granular_gates.op) == ["body"]
    gm, compact = _compact(Residual(), x, lambda gm: _prune(gm, "body_0_0", [0, 3, 7]))
    _count(gm, compact)
    assert compact.get_submodule("body.0.0").out_channels == 9


def test_pruned_residual_op_leaves_the_identity():
    x = torch.randn(2, 3, 8, 8)

    def prune(gm):
        with torch.no_grad():
            gm.granular_gates.op["body"].mask.zero_()

    gm, compact = _compact(Residual(), x, prune)
    _count(gm, compact)
    assert not hasattr(compact, "body")


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = _conv_bn(3, 8, 1)
        self.dw = _conv_bn(8, 8, 3, groups=8)
        self.pw2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.pw2(self.dw(self.pw1(x)))


def test_depthwise_conv_passes_pruned_channels_through():
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(Depthwise(), x, lambda gm: _prune(gm, "pw1_0", [2, 5]))
    _count(gm, compact)
    assert compact.get_submodule("dw.0").groups == compact.get_submodule("dw.0").in_channels == 6


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = _conv_bn(3, 8, 1)
        self.g = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.pw2 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.pw2(torch.relu(self.g(self.pw1(x))))


def test_group_conv_removes_a_slot_only_from_every_group():
    x = torch.randn(2, 3, 8, 8)
    # slot 1 is channel 1 in group 0 and channel 5 in group 1: together they go; channel 2
    # stays, because its partner 6 is kept
    gm, compact = _compact(Grouped(), x, lambda gm: _prune(gm, "pw1_0", [1, 5, 2]))
    _count(gm, compact)
    assert compact.g.groups == 2 and compact.g.in_channels == 6 and compact.get_submodule("pw1.0").out_channels == 6


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _conv_bn(3, 8)
        self.reduce, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.out(x * s)


def test_squeeze_excite_couples_the_gated_channels():
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(SqueezeExcite(), x, lambda gm: (_prune(gm, "conv_0", [3]), _prune(gm, "expand", [3])))
    _count(gm, compact)
    assert compact.get_submodule("conv.0").out_channels == 7 and compact.expand.out_channels == 7 and compact.reduce.in_channels == 7


class FlattenLinear(nn.Module):
    def __init__(self, how="flatten"):
        super().__init__()
        self.how = how
        self.conv = _conv_bn(3, 4)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.conv(x), 2)
        y = torch.flatten(y, 1) if self.how == "flatten" else y.view(y.size(0), -1)  # run-time batch size
        return self.fc(y)


@pytest.mark.parametrize("how", ["flatten", "view"])
def test_flatten_into_linear_removes_a_block_of_columns(how):
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(FlattenLinear(how), x, lambda gm: _prune(gm, "conv_0", [1]))
    _count(gm, compact)
    assert compact.fc.in_features == 12


class ChannelsLastMlp(nn.Module):
    """A ConvNeXt block: depthwise conv, permute, LayerNorm, MLP on the last dim, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_channels_last_mlp_prunes_hidden_channels_and_keeps_normalised_ones():
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(ChannelsLastMlp(), x, lambda gm: _prune(gm, "fc1", [0, 9, 31]))
    _count(gm, compact)
    assert compact.fc1.out_features == 29 and compact.fc2.in_features == 29
    assert compact.norm.normalized_shape == (8,)  # LayerNorm statistics need every channel


class Attention(nn.Module):
    """A ViT block on tokens: attention and MLP branches, both residual."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


def test_attention_block_prunes_mlp_hidden_channels_and_both_branches_are_units():
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(Attention(), x)
    assert len(gm.granular_gates.op) == 2
    gm, compact = _compact(Attention(), x, lambda gm: _prune(gm, "fc1", [2, 3]))
    _count(gm, compact)
    assert compact.fc1.out_features == 14 and compact.qkv.out_features == 24


@pytest.mark.parametrize("model", [Concat, lambda: Split("split"), Chunk, Residual, Depthwise, Grouped,
                                   SqueezeExcite, FlattenLinear, ChannelsLastMlp, Attention])
def test_random_masks_at_all_granularities_export_exactly(model):
    res = check_export(model(), torch.randn(2, 3, 8, 8), seed=3)
    assert res.ok, res.reason


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 4, 1)
        self.a = _conv_bn(4, 8, 1)
        self.b = _conv_bn(8, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.a(self.stem(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.c(self.b(x))


def test_channel_shuffle_is_exact_and_keeps_its_channels():
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(Shuffle(), x)
    assert "a_0" not in gm.granular_gates.filter  # channels that cannot be followed are never removed
    gm, compact = _compact(Shuffle(), x, lambda gm: _prune(gm, "b_0", [1]))
    _count(gm, compact)
    assert compact.get_submodule("a.0").out_channels == 8 and compact.c.in_channels == 5


class SharedConv(nn.Module):
    """One conv called twice (weights shared between call sites, as CoaT's position encodings)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.mid = _conv_bn(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.shared(x)
        x = self.mid(x)
        return self.head(x + self.shared(x))


def test_module_called_twice_is_kept_whole():
    res = check_export(SharedConv(), torch.randn(2, 3, 8, 8), op=0.0, seed=1)
    assert res.ok, res.reason
    gm = granular.prepare(SharedConv(), torch.randn(2, 3, 8, 8))
    assert "shared" not in gm.granular_gates.weight


class SelectChannel(nn.Module):
    """Integer indexing on the channel axis, with an equal integer on another dim."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        z = self.fc(x.permute(0, 2, 3, 1))   # (B, H, W, 6): channels last
        return self.head(z[:, 1, :, 1])      # row 1, channel 1


def test_integer_index_on_the_channel_axis_is_rewritten_at_its_own_position():
    x = torch.randn(2, 3, 8, 8)
    gm, compact = _compact(SelectChannel(), x, lambda gm: _prune(gm, "fc", [0]))
    _count(gm, compact)
    assert compact.fc.out_features == 1  # only channel 1 is read: the others go, gated or not


class Outlooker(nn.Module):
    """VOLO's outlook attention on channels-last tokens (unfold, attention reshapes into heads,
    fold) and its token-labelling head, ``head(cls) + 0.5 * aux(tokens).max(1)[0]``."""

    def __init__(self, dim=8, heads=2, k=3):
        super().__init__()
        self.heads, self.k = heads, k
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.v, self.attn = nn.Linear(dim, dim, bias=False), nn.Linear(dim, k ** 4 * heads)
        self.proj = nn.Linear(dim, dim)
        self.unfold = nn.Unfold(kernel_size=k, padding=1)
        self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, dim)
        self.head, self.aux = nn.Linear(dim, 5), nn.Linear(dim, 5)

    def outlook(self, x):
        b, h, w, c = x.shape
        kk = self.k * self.k
        v = self.unfold(self.v(x).permute(0, 3, 1, 2)).reshape(b, self.heads, c // self.heads, kk, h * w)
        v = v.permute(0, 1, 4, 3, 2)
        a = self.attn(x).reshape(b, h * w, self.heads, kk, kk).permute(0, 2, 1, 3, 4)
        y = (a.softmax(dim=-1) @ v).permute(0, 1, 4, 3, 2).reshape(b, c * kk, h * w)
        y = F.fold(y, output_size=(h, w), kernel_size=self.k, padding=1)
        return self.proj(y.permute(0, 2, 3, 1))

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        x = x + self.outlook(self.norm(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        tokens = x.flatten(1, 2)
        return self.head(tokens[:, 0]) + 0.5 * self.aux(tokens[:, 1:]).max(1)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlook_attention_and_token_labelling_head_export_exactly(seed):
    res = check_export(Outlooker(), torch.randn(2, 3, 8, 8), seed=seed)
    assert res.ok, res.reason


def test_channels_read_by_a_max_over_tokens_are_kept():
    """``aux(t).max(1)`` returns (values, indices): its input's channels reach the output
    through a node the channel analysis does not follow, so they are fixed (the aux head
    is a head), not dropped as if nothing read them."""
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(Outlooker(), x)
    assert "aux" not in gm.granular_gates.filter
    gm, compact = _compact(Outlooker(), x, lambda gm: _prune(gm, "fc1", [1, 2]))
    _count(gm, compact)
    assert compact.aux.out_features == 5 and compact.fc1.out_features == 10


class ChannelCountScale(nn.Module):
    """One tensor's channel count (``y.shape[1]``) scales another branch."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.a, self.b = _conv_bn(8, 6), _conv_bn(8, 4)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.a(x)
        return self.head(y) + self.b(x) * y.shape[1] ** -0.5


def test_a_channel_count_used_as_a_value_keeps_those_channels():
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(ChannelCountScale(), x)
    assert "a_0" not in gm.granular_gates.filter  # removing one would change y.shape[1]
    res = check_export(ChannelCountScale(), x, seed=0)
    assert res.ok, res.reason


class ChannelCountAssert(nn.Module):
    """A channel count checked by an assert, and one returned as an output."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.a, self.b = _conv_bn(8, 6), _conv_bn(8, 6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y, z = self.a(x), self.b(x)
        torch._assert(y.shape[1] == 6, "six channels")
        return self.head(y + z), z.size(1)


def test_a_channel_count_checked_or_returned_keeps_those_channels():
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(ChannelCountAssert(), x)
    assert "a_0" not in gm.granular_gates.filter and "b_0" not in gm.granular_gates.filter
    assert "stem_0" in gm.granular_gates.filter


class UnbatchedPool(nn.Module):
    """A 2-d pool on a (B, C, L) tensor reads it as one (C, H, W) image: it pools over C."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8, 1), nn.Conv1d(4, 6, 1)
        self.head = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        y = F.avg_pool2d(torch.relu(self.a(x)), (3, 1), stride=1, padding=(1, 0))
        return self.head(torch.relu(self.b(y[:, :4])))  # channel 3 of y averages a's 2, 3 and 4


def test_a_pool_that_reads_the_channel_axis_as_space_keeps_the_channels():
    x = torch.randn(2, 3, 8)
    gm = granular.prepare(UnbatchedPool(), x)
    assert "a" not in gm.granular_gates.filter and "b" in gm.granular_gates.filter
    for seed in range(3):  # (a tiny model: some masks leave it no smaller, so check exactness only)
        res = check_export(UnbatchedPool(), x, seed=seed)
        assert res.rel_err <= 1e-4 and res.counted == res.exported, f"seed {seed}: {res.reason}"


class PositionEmbedding(nn.Module):
    """NesT-style: the whole trunk before ``+ pos_embed`` is one branch of that sum."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid = _conv_bn(3, 8), _conv_bn(8, 8)
        self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.fc1, self.fc2 = nn.Conv2d(8, 12, 1), nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.mid(self.stem(x)) + self.pos
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean((2, 3)))


def test_pruning_the_branch_beside_a_parameter_exports_exactly_with_the_same_inputs():
    x = torch.randn(1, 3, 4, 4)  # batch 1: x and pos_embed have one shape, so their add is a sum
    model = randomize_norms_(PositionEmbedding().eval())
    gm = granular.prepare(model, x)
    trunk = [k for k in gm.granular_gates.op if "fc" not in k]
    assert trunk, list(gm.granular_gates.op)
    with torch.no_grad():
        for k in trunk:
            gm.granular_gates.op[k].mask.fill_(0.0)
    gm.eval()
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=1e-5, atol=1e-5)  # constant, but it still takes x
    _count(gm, compact)


class SpatialSizes(nn.Module):
    """``b, c, h, w = y.shape`` with only b, h and w used: y's channels stay prunable."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.a = _conv_bn(8, 6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(self.stem(x))
        b, c, h, w = y.shape
        return self.head(y).reshape(b, 4, h * w)


def test_sizes_other_than_the_channel_count_leave_channels_prunable():
    x = torch.randn(2, 3, 8, 8)
    gm = granular.prepare(SpatialSizes(), x)
    assert "a_0" in gm.granular_gates.filter
    res = check_export(SpatialSizes(), x, seed=0)
    assert res.ok, res.reason
