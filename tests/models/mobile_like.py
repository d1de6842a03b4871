"""Inverted residuals with depthwise convs, a two-branch concat, squeeze-excite and an avg pool
with count_include_pad=True (whose border effects must stop channel removal)."""

import torch
from torch import nn


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 3):
        super().__init__()
        h = c * expand
        self.pw = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.se_reduce = nn.Conv2d(h, 4, 1)
        self.se_expand = nn.Conv2d(4, h, 1)
        self.pwl = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.dw(self.pw(x))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return x + self.pwl(y * s)


class Model(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AvgPool2d(3, 1, 1, count_include_pad=True))
        self.block = InvertedResidual(12)
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(24, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.head(self.block(x))
