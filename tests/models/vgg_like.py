"""A plain VGG-style CNN, as a user's model.py would define it (no residuals, no sums)."""

from torch import nn


class Model(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
