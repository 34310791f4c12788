"""The early segmentation head (ESH): a tiny conv head that predicts the mask from early U-Net features.

During adaptation the ESH is frozen and the adapted early layers are trained so that its prediction agrees with
the full network's: the ESH "reads" the early features the way the source domain produced them.
Layer names match the paper's ``FeaturesSegmenter`` (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``conv3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import LEVELS


def level_channels(level: int, n_filters: int = 16) -> int:
    """Channels of the U-Net output at ``level`` (0 = after ``init_path`` ... 3 = after ``down3``)."""
    if level not in range(len(LEVELS)):
        raise ValueError(f"ESH level must be 0..{len(LEVELS) - 1}, got {level}")
    return n_filters * 2 ** level


class EarlySegmentationHead(nn.Module):
    """``conv1(C->12) -> bn1 -> ReLU -> conv2(12->8) -> bn2 -> ReLU -> conv3(8->1)``, all 3x3, padding 1.

    ``level`` says which U-Net stage feeds it; its logits are upsampled bilinearly by ``2**level`` to the input
    size. The paper's choice, level 3 (C = 128), has 14,821 parameters.
    """

    def __init__(self, level: int = 3, n_filters: int = 16):
        super().__init__()
        self.level = level
        c = level_channels(level, n_filters)
        self.conv1 = nn.Conv2d(c, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(features)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.conv3(x)
        if self.level:
            x = F.interpolate(x, scale_factor=2 ** self.level, mode="bilinear", align_corners=False)
        return x
