"""The networks trained by the classification task: a one-hidden-layer MLP and ResNet-18."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Flatten, one ReLU hidden layer, linear classifier: 64-128-10 on the 8x8 digits."""

    def __init__(self, in_features: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden_size)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)  # (B, C*H*W)
        return self.classifier(F.relu(self.hidden(x)))  # (B, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity or 1x1 projection shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016, arXiv:1512.03385) in the form usual for 32x32 images.

    The ImageNet stem (7x7 stride-2 convolution and max-pooling) is replaced
    by one 3x3 stride-1 convolution, so the four stages see 32, 16, 8 and 4
    pixel feature maps. 11.2 million parameters for 10 classes.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        stages = []
        channels_in = 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels, 1)))
            channels_in = channels
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))  # (B, 512, H/8, W/8)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 512)
        return self.classifier(x)  # (B, num_classes)


def build_model(name: str, image_shape: tuple[int, int, int], hidden_size: int, num_classes: int) -> nn.Module:
    """Return a freshly initialised network for images of shape (C, H, W)."""
    channels, height, width = image_shape
    if name == "mlp":
        return MLP(channels * height * width, hidden_size, num_classes)
    if name == "resnet18":
        return ResNet18(num_classes, in_channels=channels)
    raise ValueError(f"unknown model {name!r}; expected 'mlp' or 'resnet18'")
