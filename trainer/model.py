"""The seed's CNN: two conv+ReLU+maxpool blocks and a linear classifier, sized to the input."""

from __future__ import annotations

import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self, image_side: int, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_side // 4  # two 2x2 poolings
        self.classifier = nn.Linear(2 * width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
