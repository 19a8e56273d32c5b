"""What every dataset of the package shares, torchvision's way: :class:`ImageDataset`."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.datasets import VisionDataset


class ImageDataset(VisionDataset):
    """What every dataset of the package shares: uint8 ``data`` (N x H x W) and int64
    ``targets`` tensors, served one item at a time as torchvision serves them."""

    data: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(PIL image of mode "L", int class)`` after the transforms, as torchvision does."""
        img = Image.fromarray(self.data[index].numpy(), mode="L")
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target
