"""A KMNIST train split of the official size for benchmarks, written in the official formats.

The real training images cannot be fetched here, so the 60,000 images are the real test images
from ../shared (each used six times) when present, else random pixels. Both the ``.gz`` files
and the extracted copies torchvision reads are written, so both packages load the same root.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kmnist_torch.formats import read_idx, write_idx

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real" / "kmnist"


def write_train_split(root: Path, n: int = 60000) -> str:
    """Write ``root/KMNIST/raw/train-*`` (and the test split) and say where the pixels came from."""
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if (SHARED / "t10k-images-idx3-ubyte.gz").is_file():
        base = read_idx(SHARED / "t10k-images-idx3-ubyte.gz", 3)
        base_y = read_idx(SHARED / "t10k-labels-idx1-ubyte.gz", 1)
        source = "real KMNIST test images from ../shared, tiled to the train split's size"
    else:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
        base_y = (np.arange(10000) % 10).astype(np.uint8)
        source = "random pixels (../shared absent)"
    reps = -(-n // len(base))
    x, y = np.concatenate([base] * reps)[:n], np.concatenate([base_y] * reps)[:n]
    for prefix, (imgs, labels) in (("train", (x, y)), ("t10k", (base, base_y))):
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            write_idx(raw / f"{prefix}-{kind}-ubyte.gz", arr)
            write_idx(raw / f"{prefix}-{kind}-ubyte", arr, compress=False)
    return source
