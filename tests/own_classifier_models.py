"""Classifiers of another architecture than ism-edge's own, for the ``--classifier`` tests.

Residual blocks with BatchNorm, global average pooling and a 48×48 input (not a multiple of 16);
``factory`` is what ``--classifier tests.own_classifier_models:factory`` builds.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE = 48


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    """Stem (stride 2) → two residual blocks → global average pooling → linear: [N, 3, 48, 48] → [N, classes]."""

    def __init__(self, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Residual(width), nn.MaxPool2d(2), Residual(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def factory() -> nn.Module:
    """The tests' classifier: 3 classes, width 8."""
    return TinyResNet(classes=3, width=8)
