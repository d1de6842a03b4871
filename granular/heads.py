"""Auxiliary heads for multi-stage search (``docs/method.md``, Algorithm 2, step 2).

While stage s trains, the stages after it do not exist, so the classifier cannot be reached:
an auxiliary head on the stage's last feature map stands in for it. The head is

    ReLU → AdaptiveAvgPool2d(p) → 1×1 conv to w1 + BN + ReLU → p×p conv to w2 + BN + ReLU → Linear

with ``p = 8`` for the first head and ``4`` for the second (the paper's sizes on 32×32 inputs,
clipped to the feature map), and ``(w1, w2) = (128, 256)`` scaled down by one factor so the
head comes to about ``fraction`` (10%) of its stage: the paper's ablation found much smaller
heads hurt, and on our small presets the full 128/256 head would outweigh the stage itself.
Heads belong to the search graph only; export never sees them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["AuxHead", "aux_head_for"]

WIDTHS = (128, 256)
MIN_WIDTH = 4


class AuxHead(nn.Sequential):
    """The auxiliary classifier described in the module docstring."""

    def __init__(self, in_channels: int, num_classes: int, pool: int, widths: tuple[int, int] = WIDTHS):
        w1, w2 = widths
        super().__init__(
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool),
            nn.Conv2d(in_channels, w1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
            nn.Conv2d(w1, w2, pool, bias=False), nn.BatchNorm2d(w2), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(w2, num_classes),
        )
        self.pool, self.widths = pool, (w1, w2)

    @staticmethod
    def count(in_channels: int, num_classes: int, pool: int, widths: tuple[int, int]) -> int:
        """Parameters of a head of this shape, without building it."""
        w1, w2 = widths
        return in_channels * w1 + 2 * w1 + w1 * w2 * pool * pool + 2 * w2 + w2 * num_classes + num_classes


def aux_head_for(in_channels: int, spatial: tuple[int, int], num_classes: int, index: int,
                 stage_params: int, fraction: float = 0.1) -> AuxHead:
    """The head for stage ``index`` (0-based): pool ``8 >> index`` clipped to the map, widths
    the paper's scaled by the largest factor ≤ 1 that keeps it within ``fraction`` of
    ``stage_params`` (never below :data:`MIN_WIDTH`)."""
    pool = max(1, min(8 >> index, *spatial))

    def widths(k: float) -> tuple[int, int]:
        return max(MIN_WIDTH, round(WIDTHS[0] * k)), max(MIN_WIDTH, round(WIDTHS[1] * k))

    budget = fraction * stage_params
    lo, hi = 0.0, 1.0
    if AuxHead.count(in_channels, num_classes, pool, widths(hi)) <= budget:
        lo = hi
    else:
        for _ in range(40):  # the count grows with k: bisect the largest k within budget
            mid = (lo + hi) / 2
            if AuxHead.count(in_channels, num_classes, pool, widths(mid)) <= budget:
                lo = mid
            else:
                hi = mid
    return AuxHead(in_channels, num_classes, pool, widths(lo))
