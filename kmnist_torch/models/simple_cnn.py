"""The official Kuzushiji benchmark CNN (``benchmarks/kuzushiji_mnist_cnn.py`` upstream, itself
the Keras ``mnist_cnn`` example), layer for layer, with Keras' initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import ByteDropout
from .mixing import check_mix_layer, mix


class SimpleCNN(nn.Module):
    """conv 32 3x3 ReLU, conv 64 3x3 ReLU, max pool 2, dropout 0.25, dense 128 ReLU,
    dropout 0.5, dense to the classes. Convolutions are "valid" (no padding), as in Keras.

    ``mix_layers``: 0 the input, 1 after the first convolution, 2 after the pooling.
    ``dropout=False`` leaves both dropout layers out (an exactly repeatable forward).
    """

    mix_layers: tuple[int, ...] = (0, 1, 2)

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, dropout: bool = True
    ) -> None:
        super().__init__()
        if img_size < 6:
            raise ValueError(f"simple_cnn needs images of at least 6x6, got {img_size}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.drop1 = ByteDropout(0.25) if dropout else nn.Identity()
        side = (img_size - 4) // 2
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.drop2 = ByteDropout(0.5) if dropout else nn.Identity()
        self.fc2 = nn.Linear(128, num_classes)
        # Keras defaults (glorot_uniform kernels, zero biases): Adadelta at lr 1.0 was tuned
        # with them, and PyTorch's default init changes the early training curve.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        mix_layer: int | None = None,
        lam: float | torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for ``x`` (N x C x H x W), mixing the hidden state at ``mix_layer`` as
        :class:`~kmnist_torch.models.preact_resnet.PreActResNet` does."""
        check_mix_layer(mix_layer, self.mix_layers)
        out = mix(x, lam, perm) if mix_layer == 0 else x
        out = F.relu(self.conv1(out))
        if mix_layer == 1:
            out = mix(out, lam, perm)
        # relu(max_pool(x)) is max_pool(relu(x)) (relu is monotonic), in a quarter of the
        # elements: the same outputs and gradients, and a faster step.
        out = F.relu(F.max_pool2d(self.conv2(out), 2))
        if mix_layer == 2:
            out = mix(out, lam, perm)
        out = self.drop1(out).flatten(1)
        out = self.drop2(F.relu(self.fc1(out)))
        return self.fc2(out)


def simple_cnn(
    num_classes: int, in_chans: int = 1, img_size: int = 28, dropout: bool = True
) -> SimpleCNN:
    """The Keras benchmark CNN for square ``img_size`` inputs (its dense layer depends on it)."""
    return SimpleCNN(num_classes=num_classes, in_chans=in_chans, img_size=img_size, dropout=dropout)
