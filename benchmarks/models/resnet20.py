"""A ResNet-20-style CNN for 1×28×28 inputs (Fashion-MNIST), as a user's ``model.py``.

Three stages of ``blocks`` basic blocks (16, 32, 64 channels; the second and third start
with stride 2 and a 1×1 projection shortcut), global pooling and a linear head: ResNet-20
(He et al., CIFAR) is ``blocks=3``. ``resnet8`` (one block per stage) is the CPU-sized
variant the benchmarks default to. ``width`` scales every stage (the width-scaled baseline).
"""

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, blocks: int = 3, width: float = 1.0):
        super().__init__()
        c = [max(1, round(16 * width)), max(1, round(32 * width)), max(1, round(64 * width))]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU())
        layers, cin = [], c[0]
        for i, cout in enumerate(c):
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> ResNet:
    return ResNet(num_classes, in_channels, blocks=3, width=width)


def resnet8(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> ResNet:
    return ResNet(num_classes, in_channels, blocks=1, width=width)
