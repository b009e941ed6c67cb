"""MultiLeNet (Sener & Koltun 2018; the PaLoRA paper's MultiMNIST network) sized for small inputs.

Trunk: conv 5x5 (1->10, pad 2) -> [BN] -> maxpool 2 -> ReLU -> conv 5x5 (10->20, pad 2) -> [BN]
-> maxpool 2 -> ReLU -> flatten (20*3*3 = 180 for 12x12 and 14x14 inputs) -> linear 180->50 -> ReLU.
Heads: one per task, linear 50->50 -> ReLU -> linear 50->classes.
No dropout, like the PaLoRA reference's MultiLeNet.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from palora_kernels.nn import RayGroupBatchNorm2d

TRUNK_FEATURES = 50


class MultiLeNet(nn.Module):
    """forward(x: (N, 1, 14, 14)) -> list of T logits (N, classes_t)."""

    def __init__(self, classes: Sequence[int], batchnorm: bool = False, image_size: int = 14):
        super().__init__()
        # no conv bias before a BatchNorm: BN removes it (its gradient is exactly zero)
        self.conv1 = nn.Conv2d(1, 10, 5, padding=2, bias=not batchnorm)
        self.conv2 = nn.Conv2d(10, 20, 5, padding=2, bias=not batchnorm)
        self.bn1 = RayGroupBatchNorm2d(10) if batchnorm else nn.Identity()
        self.bn2 = RayGroupBatchNorm2d(20) if batchnorm else nn.Identity()
        side = image_size // 2 // 2
        self.fc = nn.Linear(20 * side * side, TRUNK_FEATURES)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(TRUNK_FEATURES, TRUNK_FEATURES), nn.ReLU(), nn.Linear(TRUNK_FEATURES, c))
            for c in classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        z = F.relu(self.fc(x.flatten(1)))
        return [head(z) for head in self.heads]
