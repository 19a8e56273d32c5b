"""Write dataset roots in the exact official layout and file formats, from arrays: re-splits
and subsets of the data (and the fake roots of the tests and benchmarks). Torch-free.

The class maps written here are byte-identical to the official ones (same header, rows and
line endings), so they pass their published checksums.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import catalog
from ..errors import DataFilesError
from .arrays import raw_folder
from .formats import read_idx, write_idx, write_npz


def classmap_bytes(name: str) -> bytes:
    """The official ``*_classmap.csv`` of a dataset, rebuilt from the catalog."""
    info = catalog.get(name)
    rows = ["index,codepoint,char"] + [f"{c.index},{c.codepoint},{c.char}" for c in info.classes]
    return ("\n".join(rows) + "\n").encode("utf-8")


def write_split(
    root: str | os.PathLike,
    name: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    fmt: str | None = None,
    extracted: bool = False,
) -> Path:
    """Write one split of ``name`` (``"kmnist"``, ``"k49"``) under ``root`` as the official
    files are named and encoded, plus the class map; returns the folder written.

    ``fmt`` is ``"mnist"`` (idx.gz) or ``"npz"`` (default: the dataset's first format).
    ``extracted=True`` also writes the uncompressed idx files torchvision extracts."""
    info = catalog.get(name)
    fmt = fmt or info.formats[0]
    if split not in info.splits or fmt not in info.splits[split]:
        raise ValueError(f"{info.name} has no {split!r} split in format {fmt!r}")
    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.uint8)
    if images.shape[1:] != info.image_shape or len(images) != len(labels):
        raise ValueError(
            f"expected N x {info.image_shape[0]} x {info.image_shape[1]} images and N labels, "
            f"got {images.shape} and {labels.shape}"
        )
    folder = raw_folder(Path(root), info)
    folder.mkdir(parents=True, exist_ok=True)
    images_file, labels_file = info.splits[split][fmt]
    for remote, arr in ((images_file, images), (labels_file, labels)):
        path = folder / remote.name
        if fmt == "npz":
            write_npz(path, arr)
        else:
            write_idx(path, arr)
            if extracted:
                write_idx(path.with_suffix(""), arr, compress=False)
    if info.classmap is not None:
        (folder / info.classmap.name).write_bytes(classmap_bytes(info.name))
    return folder


# The real-image re-split: the real KMNIST test split cut into these many training and test
# images (python -m kmnist_torch.reproduce --resplit).
RESPLIT_TRAIN, RESPLIT_TEST = 8000, 2000


def write_resplit(root: str | os.PathLike, source: str | os.PathLike, seed: int = 0) -> dict:
    """Write ``root/KMNIST/raw/`` (official names and formats) with the real KMNIST test split
    in ``source`` shuffled by ``seed`` and cut 8,000 train / 2,000 test.

    Args:
        root: the data root to write.
        source: a folder with the real ``t10k-images-idx3-ubyte.gz`` and
            ``t10k-labels-idx1-ubyte.gz``.
        seed: the shuffle before the cut.

    Returns:
        The split sizes, ``{"train": 8000, "test": 2000}``.
    """
    images_gz = Path(source) / "t10k-images-idx3-ubyte.gz"
    if not images_gz.is_file():
        raise DataFilesError(
            f"{images_gz} is absent: --resplit needs a folder holding the real KMNIST test "
            "split (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
        )
    x = read_idx(images_gz, 3)
    y = read_idx(Path(source) / "t10k-labels-idx1-ubyte.gz", 1)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:RESPLIT_TRAIN], order[RESPLIT_TRAIN : RESPLIT_TRAIN + RESPLIT_TEST]
    write_split(root, "kmnist", "train", x[train], y[train], fmt="mnist")
    write_split(root, "kmnist", "test", x[test], y[test], fmt="mnist")
    return {"train": len(train), "test": len(test)}
