"""Fake data in the exact official formats, for the tests (torchvision's dataset tests fake
their data the same way): random arrays for the MNIST family, PNG trees and tars for KKanji.
Roots are written with the package's own writer, :func:`kmnist_torch.data.resplit.write_split`."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from kmnist_torch import catalog


def png_bytes(image: np.ndarray) -> bytes:
    """A 2-d uint8 array encoded as an 8-bit grayscale PNG, as the KKanji images are."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


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
