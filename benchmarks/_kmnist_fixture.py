"""A KMNIST train split of the official size for benchmarks, written in the official formats.

The real training images cannot be fetched here, so the 60,000 images are the real test images
from ../shared (each used six times) when present, else random pixels. Both the ``.gz`` files
and the extracted copies torchvision reads are written (kmnist_torch.fixtures), so both
packages load the same root.
"""

from __future__ import annotations

from pathlib import Path

import _shared
import numpy as np

from kmnist_torch.fixtures import random_split, write_split
from kmnist_torch.formats import read_npz


def write_train_split(root: Path, n: int = 60000) -> str:
    """Write ``root/KMNIST/raw/train-*`` (and the test split) and say where the pixels came from."""
    real = _shared.real_kmnist_test_npz()
    if real is not None:
        base, base_y = read_npz(real[0], (-1, 28, 28)), read_npz(real[1], (-1,))
        source = "real KMNIST test images from ../shared, tiled to the train split's size"
    else:
        base, base_y = random_split(10000, "kmnist", seed=0)
        source = "random pixels (../shared absent)"
    reps = -(-n // len(base))
    x, y = np.concatenate([base] * reps)[:n], np.concatenate([base_y] * reps)[:n]
    write_split(root, "kmnist", "train", x, y, fmt="mnist", extracted=True)
    write_split(root, "kmnist", "test", base, base_y, fmt="mnist", extracted=True)
    return source
