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
from .arrays import raw_folder
from .formats import read_idx, write_idx, write_npz
from .sources import DataFilesError


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


def random_split(n: int, name: str = "kmnist", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images of the dataset's shape and labels cycling through its classes."""
    info = catalog.get(name)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8)
    labels = (np.arange(n) % info.num_classes).astype(np.uint8)
    return images, labels


def kkanji_files(
    n_classes: int, per_class: int | list[int], seed: int = 0, first: int = 0x4E00
) -> list[tuple[str, str, bytes]]:
    """Synthetic Kuzushiji-Kanji images as ``(class folder, file name, PNG bytes)``: 64x64
    8-bit grayscale PNGs (a random stroke pattern each) named like the official ones
    (``U+XXXX``, 16 hex digits + ``.png``), for classes from codepoint ``first`` on."""
    from .formats import png_bytes

    rng = np.random.default_rng(seed)
    counts = [per_class] * n_classes if isinstance(per_class, int) else list(per_class)
    out = []
    for k, n in enumerate(counts):
        folder = f"U+{first + k:04X}"
        for _ in range(n):
            img = np.zeros((64, 64), np.uint8)
            y, x = rng.integers(4, 60, 2)
            img[max(0, y - 12) : y + 12, max(0, x - 2) : x + 2] = rng.integers(128, 256)
            img[max(0, y - 2) : y + 2, max(0, x - 12) : x + 12] = rng.integers(128, 256)
            name = f"{int(rng.integers(0, 2**63)):016x}.png"
            out.append((folder, name, png_bytes(img)))
    return out


def write_kkanji_tree(folder: str | os.PathLike, files: list[tuple[str, str, bytes]]) -> Path:
    """Write ``files`` as the extracted tree ``folder/kkanji2/U+XXXX/<name>.png``."""
    tree = Path(folder) / "kkanji2"
    for cls, name, data in files:
        (tree / cls).mkdir(parents=True, exist_ok=True)
        (tree / cls / name).write_bytes(data)
    return tree


def kkanji_tar(
    files: list[tuple[str, str, bytes]], extra: tuple = (), mtime: int = 1_546_300_800
) -> bytes:
    """A tar in the official layout (``kkanji2/U+XXXX/<name>.png``, GNU format, folders first)
    holding ``files``, plus ``extra`` members given as ``(name, bytes or None, TarInfo
    attributes)`` (to build hostile archives in tests)."""
    import io
    import tarfile

    def add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **attrs) -> None:
        info = tarfile.TarInfo(name)
        info.mtime = mtime
        for k, v in attrs.items():
            setattr(info, k, v)
        if data is None:
            tf.addfile(info)
        else:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        add(tf, "kkanji2", type=tarfile.DIRTYPE, mode=0o755)
        done = set()
        for folder, name, data in files:
            if folder not in done:
                add(tf, f"kkanji2/{folder}", type=tarfile.DIRTYPE, mode=0o755)
                done.add(folder)
            add(tf, f"kkanji2/{folder}/{name}", data, mode=0o644)
        for name, data, attrs in extra:
            add(tf, name, data, **attrs)
    return buf.getvalue()


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
