"""PreActResNet-18 as in the manifold mixup reference code (Verma et al., 2019), which the
Kuzushiji paper's PreActResNet-18 rows were trained with.

Kept from the reference, on purpose: a 3x3 stride-1 stem convolution with no BN/ReLU after it;
pre-activation basic blocks whose projection shortcut reads the pre-activated input; no final
BN/ReLU before pooling. Changed: global average pooling instead of ``avg_pool2d(out, 4)``, so
28x28 and 64x64 inputs both work (and the pooling stays deterministic on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mixing import check_mix_layer, mix


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for ``x`` (N x C x H x W)."""
        out = F.relu(self.bn1(x))
        # As in the reference (and He et al.'s pre-activation ResNet), a projection shortcut
        # reads the pre-activated input; an identity shortcut reads the raw one.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images, with manifold mixup built into ``forward``.

    ``mix_layers`` lists where ``forward`` can mix: 0 the input, 1 after stage 1, 2 after
    stage 2, the three places the reference draws from.
    """

    mix_layers: tuple[int, ...] = (0, 1, 2)

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 1,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.in_planes = width
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(width * 2, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(width * 8, num_blocks[3], stride=2)
        self.linear = nn.Linear(width * 8, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(
        self,
        x: torch.Tensor,
        mix_layer: int | None = None,
        lam: float | torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for ``x`` (N x C x H x W). With ``mix_layer`` (0, 1 or 2), the hidden state
        there becomes ``lam * h + (1 - lam) * h[perm]`` before the rest of the network."""
        check_mix_layer(mix_layer, self.mix_layers)
        out = mix(x, lam, perm) if mix_layer == 0 else x
        out = self.layer1(self.conv1(out))
        if mix_layer == 1:
            out = mix(out, lam, perm)
        out = self.layer2(out)
        if mix_layer == 2:
            out = mix(out, lam, perm)
        out = self.layer4(self.layer3(out))
        out = out.mean(dim=(2, 3))  # global average pooling: any input size
        return self.linear(out)


def preact18(num_classes: int, in_chans: int = 1, img_size: int = 28) -> PreActResNet:
    """PreActResNet-18: blocks [2, 2, 2, 2] at 64/128/256/512 channels, 11.2M parameters.

    ``img_size`` is accepted for a uniform factory signature; pooling is global, so any size
    of at least 8 pixels works.
    """
    if img_size < 8:
        raise ValueError(f"preact18 needs images of at least 8x8, got {img_size}")
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, in_chans=in_chans)
