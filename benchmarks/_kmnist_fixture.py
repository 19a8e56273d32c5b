"""A KMNIST train split of the official size for benchmarks, written in the official formats.

The real training images cannot be fetched here, so the 60,000 images are the real test images
from ../shared (each used six times) when present, else random pixels. Both the ``.gz`` files
and the extracted copies torchvision reads are written (kmnist_torch.data.resplit), so both
packages load the same root.
"""

from __future__ import annotations

from pathlib import Path

import _shared
import numpy as np

from kmnist_torch.data.formats import read_npz
from kmnist_torch.data.resplit import write_split


def write_train_split(root: Path, n: int = 60000) -> str:
    """Write ``root/KMNIST/raw/train-*`` (and the test split) and say where the pixels came from."""
    real = _shared.real_kmnist_test_npz()
    if real is not None:
        base, base_y = read_npz(real[0], (-1, 28, 28)), read_npz(real[1], (-1,))
        source = "real KMNIST test images from ../shared, tiled to the train split's size"
    else:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
        base_y = (np.arange(10000) % 10).astype(np.uint8)
        source = "random pixels (../shared absent)"
    reps = -(-n // len(base))
    x, y = np.concatenate([base] * reps)[:n], np.concatenate([base_y] * reps)[:n]
    write_split(root, "kmnist", "train", x, y, fmt="mnist", extracted=True)
    write_split(root, "kmnist", "test", base, base_y, fmt="mnist", extracted=True)
    return source
