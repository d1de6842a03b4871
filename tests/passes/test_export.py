"""export: exact equivalence (invariant 1), honest accounting (2), plain reload (6)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import granular
from granular.search_spaces import build_search_space
from granular.testing import random_masks_, randomize_norms_

from _models import USER_MODELS, example, user_model

RTOL, ATOL = 1e-4, 1e-5


def _gated(name: str):
    if name.startswith("darts"):
        torch.manual_seed(0)
        model = build_search_space(name, 10, 1)
    else:
        model = user_model(name)
    randomize_norms_(model, seed=1)
    return granular.prepare(model, example(2))


def _check(gm, seed, op=0.3, filt=0.3, weight=0.3):
    random_masks_(gm, op=op, filter=filt, weight=weight, seed=seed)
    gm.eval()
    x = example(5, seed=seed + 100)
    compact = granular.export(gm)
    torch.testing.assert_close(compact(x), gm(x), rtol=RTOL, atol=ATOL)
    count = granular.count_params(gm)
    params = list(compact.parameters())
    assert count.total == sum(p.numel() for p in params)
    assert count.nonzero == sum(int(torch.count_nonzero(p)) for p in params)
    return compact, count


@pytest.mark.parametrize("name", sorted(USER_MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_user_models_random_masks(name, seed):
    gm = _gated(name)
    dense = granular.count_params(gm)
    compact, count = _check(gm, seed)
    assert count.nonzero < dense.nonzero


@pytest.fixture(scope="module")
def darts_small():
    return _gated("darts:small")


@pytest.mark.parametrize("seed", [0])
def test_darts_small_random_masks(darts_small, seed):
    compact, count = _check(darts_small, seed)
    assert count.total < sum(p.numel() for n, p in darts_small.named_parameters()
                             if not n.startswith("granular_gates"))


def test_darts_tiny_heavy_pruning_removes_channels_and_ops():
    gm = _gated("darts:tiny")
    compact, _ = _check(gm, seed=5, op=0.8, filt=0.7, weight=0.5)
    convs = [m for m in compact.modules() if isinstance(m, nn.Conv2d)]
    full = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) < len(full)
    assert sum(c.out_channels for c in convs) < sum(c.out_channels for c in full)
    assert not any("granular" in type(m).__module__ for m in compact.modules())


def test_everything_pruned_still_exports_exactly():
    for name in ("vgg_like", "resnet_like"):
        _check(_gated(name), seed=3, op=1.0, filt=1.0, weight=1.0)


def test_padding_border_constants_keep_channels():
    """mobile_like's avg pool (count_include_pad) and padded convs make a gated-off channel
    non-constant at borders: export must keep such channels rather than fold them wrongly."""
    gm = _gated("mobile_like")
    for seed in range(4):
        _check(gm, seed=seed, op=0.5, filt=0.6, weight=0.2)


def test_exported_model_reloads_without_granular(tmp_path):
    gm = _gated("darts:tiny")
    random_masks_(gm, seed=4)
    gm.eval()
    x = example(3, seed=9)
    granular.save(granular.export(gm), tmp_path / "model")
    torch.save({"x": x, "y": gm(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "granular" or name.startswith("granular."):
                    raise ImportError("granular is not installed here")
        sys.meta_path.insert(0, Block())
        import torch
        spec = importlib.util.spec_from_file_location("shipped", r"{tmp_path / 'model' / 'model.py'}")
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        model = mod.load()
        io = torch.load(r"{tmp_path / 'io.pt'}")
        torch.testing.assert_close(model(io["x"]), io["y"], rtol={RTOL}, atol={ATOL})
        assert "granular" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    loaded = granular.load(tmp_path / "model")
    torch.testing.assert_close(loaded(x), gm(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["mobile_like", "resnet_like", "darts:tiny"])
def test_param_counter_reused_across_mask_changes_stays_exact(name):
    """A pruning round counts many mask sets with one ParamCounter, which reuses the channel
    analysis and per-node constants between counts: every count must still equal a fresh
    one, whether the pruned operations change (op > 0) or only filters and weights do."""
    from granular.accounting import ParamCounter
    gm = _gated(name)
    gm.eval()
    counter = ParamCounter(gm)
    counts = set()
    for seed, op in [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.5), (4, 0.0), (0, 0.0)]:
        random_masks_(gm, op=op, filter=0.4, weight=0.3, seed=seed)
        fresh = granular.count_params(gm)
        assert counter() == fresh
        counts.add(fresh)
    assert len(counts) >= 4  # the masks did change the count
    # one weight or one filter at a time, changed in place: the counter reuses every other fold
    bank = granular.masks.gate_bank(gm)
    changed = 0
    for m in list(bank.weight.values())[::5][:6] + list(bank.filter.values())[::5][:6]:
        if m.mask.sum() < 2:
            continue
        before = counter()
        m.mask.view(-1)[int(m.mask.view(-1).argmax())] = 0.0
        fresh = granular.count_params(gm)
        assert counter() == fresh
        changed += fresh != before
    assert changed >= 2


class _InplaceAfterNorm(nn.Module):
    """A gated filter followed by a norm that gives its pruned channel a nonzero constant, then
    an in-place scale: evaluating that node on the constant must not write into it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1, self.bn2, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.BatchNorm1d(16), nn.Linear(16, 4)
        with torch.no_grad():
            self.bn2.bias.fill_(1.0)

    def forward(self, x):
        y = self.bn2(torch.relu(self.bn1(self.fc1(x))))
        y.mul_(1e10)
        return self.fc2(y)


def test_in_place_op_after_a_norm_exports_exactly_and_counts_stay_exact():
    """``y.mul_(c)`` as a statement: its result is unused, and export used to drop it as dead
    code (the compact model then differed by the factor). And the counter memoises per-node
    constants: evaluating the in-place op on a stored constant used to scale it again on
    every count (1e10 per count: infinite, so unremovable, by the fourth)."""
    from granular.accounting import ParamCounter
    from granular.testing import check_export
    for seed in (0, 1):
        assert check_export(_InplaceAfterNorm().eval(), torch.randn(4, 8), seed=seed).ok
    gm = granular.prepare(_InplaceAfterNorm().eval(), torch.randn(4, 8))
    random_masks_(gm, op=0.0, filter=0.5, weight=0.0, seed=0)
    gm.eval()
    counter = ParamCounter(gm)
    fresh = granular.count_params(gm)
    assert fresh.total < sum(p.numel() for p in _InplaceAfterNorm().parameters())
    assert all(counter() == fresh for _ in range(6))
