"""Write dataset roots in the exact official layout and file formats, from arrays: for tests,
subsets of the data, re-splits and benchmarks (torchvision's dataset tests fake their data the
same way). Torch-free.

The class maps written here are byte-identical to the official ones (same header, rows and
line endings), so they pass their published checksums.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import catalog
from .formats import write_idx, write_npz


def classmap_bytes(name: str) -> bytes:
    """The official ``*_classmap.csv`` of a dataset, rebuilt from the catalog."""
    info = catalog.get(name)
    rows = ["index,codepoint,char"] + [f"{c.index},{c.codepoint},{c.char}" for c in info.classes]
    return ("\n".join(rows) + "\n").encode("utf-8")


def raw_folder(root: str | os.PathLike, name: str) -> Path:
    """``root/<Folder>/raw``: where a dataset's official files live (torchvision's layout)."""
    return Path(root) / catalog.get(name).folder / "raw"


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
    folder = raw_folder(root, info.name)
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


def random_split(n: int, name: str = "kmnist", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images of the dataset's shape and labels cycling through its classes."""
    info = catalog.get(name)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8)
    labels = (np.arange(n) % info.num_classes).astype(np.uint8)
    return images, labels
