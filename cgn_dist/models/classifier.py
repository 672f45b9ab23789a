"""The small CNN of the MNIST classifier experiment.

Input 3 x 32 x 32 in [-1, 1]; output log-probabilities over 10 classes (train with NLL).
Spatial sizes: 32 -conv5-> 32 -maxpool(3, s2, p1)-> 16 -conv3-> 16 -conv3 s2-> 8 -conv3-> 8
-avgpool(7)-> 1. The last 3x3 conv keeps 8 x 8 (padding 1): AvgPool(7) needs at least 7 x 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MnistClassifier(nn.Module):
    """BN(3) -> conv5x5(32) -> maxpool -> conv3x3(32) -> conv3x3 s2(64) -> conv3x3(64) -> avgpool(7) -> fc."""

    def __init__(self, in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        # A BatchNorm on the raw input: the network normalises its own input statistics.
        self.input_norm = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool2 = nn.AvgPool2d(7)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(F.relu(self.conv1(self.input_norm(x))))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        h = F.relu(self.conv4(h))
        h = self.pool2(h).flatten(1)
        return F.log_softmax(self.fc(h), dim=1)


def build_classifier(seed: int | None = None, in_channels: int = 3, n_classes: int = 10) -> MnistClassifier:
    """A fresh classifier; with ``seed`` its initial weights depend on the seed alone.

    PyTorch's default layer init draws from the global RNG, so the draw happens inside a forked RNG
    state: the caller's global RNG is left untouched.
    """
    if seed is None:
        return MnistClassifier(in_channels, n_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MnistClassifier(in_channels, n_classes)


__all__ = ["MnistClassifier", "build_classifier"]
