"""The driver's seams: dispatch on the config's type, and the pruning round as decide-then-apply."""

import pytest
import torch
from torch import nn

import granular
from granular.config import MultiStageConfig, SearchConfig
from granular.data import load_data
from granular.driver import MultiStageSearcher, Searcher, make_searcher
from granular.errors import GranularError
from granular.masks import mask_buffers
from granular.search_spaces import build_search_space

from _models import user_model


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=48, seed=0, limit=96)


def _darts(data):
    torch.manual_seed(0)
    model = build_search_space("darts:tiny", num_classes=data.num_classes, in_channels=data.in_channels)
    return granular.prepare(model, data.example_input())


def test_the_config_type_picks_the_driver(digits):
    base = {"target_params": 40_000, "epochs": 4, "warmup_epochs": 1, "batch_size": 48}
    assert type(make_searcher(_darts(digits), digits, SearchConfig(**base, multi_stage="off"),
                              progress=False)) is Searcher
    assert type(make_searcher(_darts(digits), digits, MultiStageConfig(**base), progress=False)) is MultiStageSearcher
    assert MultiStageConfig().multi_stage == "on" and isinstance(MultiStageConfig(), SearchConfig)


class _OneResolution(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch(x)
        return self.fc(x.mean((2, 3)))


def test_multi_stage_config_on_one_resolution_stops_or_falls_back(digits):
    gm = granular.prepare(_OneResolution(), digits.example_input())
    with pytest.raises(GranularError, match="multi-stage"):
        make_searcher(gm, digits, MultiStageConfig(target_params=10), progress=False)
    s = make_searcher(gm, digits, MultiStageConfig(target_params=10, single_resolution="fallback"), progress=False)
    assert type(s) is Searcher


@torch.no_grad()
def test_decide_leaves_the_masks_and_apply_commits_what_was_decided(digits):
    gm = granular.prepare(user_model("resnet_like"), digits.example_input())
    s = Searcher(gm, digits, SearchConfig(target_params=1000, epochs=2, warmup_epochs=1), progress=False)
    s.init_thresholds()
    for m in s.bank.filter.values():   # half of every layer's filters below threshold
        m.beta[: m.beta.numel() // 2] = -10.0
    before = {k: v.clone() for k, v in mask_buffers(s.bank).items()}
    d = s.decide_round(s.round_goal(None), lambda: granular.count_params(gm))
    assert d.units and all(torch.equal(before[k], v) for k, v in mask_buffers(s.bank).items())
    info = s.apply_round(d)
    assert info["pruned_units"]["filter"] == sum(1 for u in d.units if u[1] == "filter")
    assert granular.count_params(gm) == d.after and s.state["params"] == d.after.nonzero


def test_warm_up_trains_the_weights_only_and_the_search_all_groups(digits):
    """A warm-up epoch computes no gradient for gates and thresholds (they cannot move:
    λ = 0 and their optimiser does not step); the first search epoch computes them again."""
    gm = granular.prepare(user_model("resnet_like"), digits.example_input())
    s = Searcher(gm, digits, SearchConfig(target_params=1000, epochs=2, warmup_epochs=1), progress=False)
    arch_before = [p.detach().clone() for p in s._arch]
    weights_before = [p.detach().clone() for p in s.weights]
    s.train_epoch(0, warmup=True)
    assert s._arch and all(p.grad is None for p in s._arch)
    assert all(torch.equal(a, p) for a, p in zip(arch_before, s._arch))
    assert any(not torch.equal(a, p) for a, p in zip(weights_before, s.weights))
    s.init_thresholds()
    s.train_epoch(1, warmup=False)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s._arch)
