"""The standard few-shot embedding, Conv-4 (Vinyals et al. 2016, Snell et al. 2017): four
blocks of a 3x3 convolution with 64 channels, batch norm, ReLU and 2x2 max pooling; the output
flattened. At 28x28 (Omniglot) and 16x16 it gives 64 features, at 32x32 256, at 64x64 1,024."""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = 4
CHANNELS = 64
MIN_SIZE = 2**BLOCKS  # each block halves the side (rounding down): 16 -> 1


def conv_block(in_chans: int, out_chans: int) -> nn.Sequential:
    """conv 3x3 (padding 1), batch norm, ReLU, max pool 2x2."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, 3, padding=1),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def output_side(img_size: int) -> int:
    """The side of the last block's feature map for ``img_size`` x ``img_size`` inputs."""
    side = img_size
    for _ in range(BLOCKS):
        side //= 2
    return side


class Conv4(nn.Module):
    """Conv-4: images (float, N x ``in_chans`` x ``img_size`` x ``img_size``) to features
    (N x :attr:`out_features`).

    Args:
        in_chans: channels of the input images (1 for the Kuzushiji datasets).
        img_size: height and width of the inputs, at least 16.
        channels: channels of every block (64 in the papers).
    """

    def __init__(self, in_chans: int = 1, img_size: int = 32, channels: int = CHANNELS) -> None:
        super().__init__()
        if img_size < MIN_SIZE:
            raise ValueError(
                f"conv4 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {img_size}"
            )
        self.img_size = img_size
        self.encoder = nn.Sequential(
            *(conv_block(in_chans if i == 0 else channels, channels) for i in range(BLOCKS))
        )
        self.out_features = channels * output_side(img_size) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened features of ``x``."""
        return self.encoder(x).flatten(1)


class Classifier(nn.Module):
    """An embedding followed by a linear head: the base classifier of Chen et al. (2019),
    whose embedding is then used with nearest class mean on new classes."""

    def __init__(self, embedding: nn.Module, out_features: int, num_classes: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = nn.Linear(out_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the classes."""
        return self.head(self.embedding(x))
