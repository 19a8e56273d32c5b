"""KMNIST and K49 in the torchvision mould: download, verify and cache the official files, then
expose ``data``/``targets`` tensors, the real characters as ``classes``, and transforms."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import VisionDataset

from . import catalog, formats
from ._io import HashRecord, atomic_write, hash_file
from .catalog import DatasetInfo
from .sources import DataFilesError, ensure_files, resolve_root, target_for

__all__ = ["K49", "KMNIST", "DataFilesError", "ImageDataset", "create_dataset", "list_datasets"]


def _writable(arr: np.ndarray) -> np.ndarray:
    return arr if arr.flags.writeable else arr.copy()


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


class _ArrayDataset(ImageDataset):
    """Shared base of the datasets published as whole arrays (KMNIST, K49): a subclass only
    names its catalog entry."""

    info: DatasetInfo

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        format: str = "npz",
        verify: bool = True,
    ) -> None:
        # Not called directly: KMNIST and K49 give the user-facing signatures.
        super().__init__(
            str(resolve_root(root)), transform=transform, target_transform=target_transform
        )
        if format not in self.info.formats:
            raise ValueError(
                f"{type(self).__name__}: format must be one of {self.info.formats}, got {format!r}"
            )
        self.train = train
        self.split = "train" if train else "test"
        self.format = format
        self.verify = verify
        if not verify:
            warnings.warn(
                f"{type(self).__name__}: verify=False, checksums are not checked (format "
                "checks still are)",
                stacklevel=2,
            )
        images_file, labels_file = self.info.splits[self.split][format]
        folder = Path(self.raw_folder)
        targets = [target_for(images_file, folder), target_for(labels_file, folder)]
        extras = [target_for(self.info.classmap, folder)] if self.info.classmap else []
        ensure_files(targets, download, verify, name=type(self).__name__, extras=extras)
        images, labels = self._decode(targets[0].dest, targets[1].dest)
        self.data = torch.from_numpy(_writable(images))
        self.targets = torch.from_numpy(labels.astype(np.int64))
        cls = self.info.classes
        self.classes = [c.char for c in cls]
        self.codepoints = [c.codepoint for c in cls]
        self.romaji = [c.romaji for c in cls]
        self.class_to_idx = {c.char: c.index for c in cls}

    # torchvision compatibility: same folder layout as torchvision.datasets.KMNIST.
    @property
    def raw_folder(self) -> str:
        """``root/<Folder>/raw``, where torchvision keeps the same files."""
        return os.path.join(self.root, self.info.folder, "raw")

    def _decode(self, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
        shape = self.info.image_shape
        if self.format == "mnist":
            images = _read_idx_cached(images_path, 3, shape)
            labels = _read_idx_cached(labels_path, 1, None)
        else:
            images = formats.read_npz(images_path, (-1, *shape))
            labels = formats.read_npz(labels_path, (-1,))
        if len(images) != len(labels):
            raise formats.FormatError(
                f"{images_path} holds {len(images)} images but {labels_path} holds "
                f"{len(labels)} labels; they must match: delete both and download again."
            )
        if labels.size and int(labels.max()) >= self.info.num_classes:
            raise formats.FormatError(
                f"{labels_path}: expected labels below {self.info.num_classes}, found "
                f"{int(labels.max())}."
            )
        expected = self.info.split_sizes[self.split]
        if self.verify and len(images) != expected:
            raise formats.FormatError(
                f"{images_path}: expected {expected} images in the {self.split} split, "
                f"found {len(images)}."
            )
        return images, labels

    def extra_repr(self) -> str:
        counts = torch.bincount(self.targets, minlength=self.info.num_classes)
        return "\n".join([
            f"Split: {self.split.capitalize()}",
            f"Format: {self.format}",
            f"Classes: {self.info.num_classes} ({''.join(self.classes)})",
            f"Images per class: {int(counts.min())} to {int(counts.max())}",
            f"Licence: {catalog.LICENSE}",
        ])  # fmt: skip


def _read_idx_cached(gz_path: Path, ndim: int, shape: tuple[int, int] | None) -> np.ndarray:
    """Decode an idx.gz, using (and keeping) the extracted copy torchvision also reads.

    The extracted copy is read only when the record says it was written from this very gz
    (same md5, neither file touched since); otherwise the gz is decoded and the copy rewritten.
    """
    full_shape = None if shape is None else (-1, *shape)
    plain = gz_path.with_suffix("")  # train-images-idx3-ubyte, as torchvision extracts it
    record = HashRecord(gz_path.parent)
    gz_md5 = record.hashes(gz_path)[0]  # remembered after the first load
    entry = record.entries.get(plain.name)
    if plain.is_file() and entry and entry.get("from_md5") == gz_md5:
        st = plain.stat()
        if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return formats.read_idx(plain, ndim, full_shape)
    raw = formats.read_gzip(gz_path)
    arr = formats.parse_idx(raw, gz_path, ndim, full_shape)
    try:
        atomic_write(plain, raw, fsync=False)
        md5, sha = hash_file(plain)
        record.remember(plain, md5, sha, from_md5=gz_md5)
    except OSError:  # read-only root: keep working from the gz
        pass
    return arr


class KMNIST(_ArrayDataset):
    """Kuzushiji-MNIST: 10 hiragana, 60,000 train and 10,000 test images of 28x28 grayscale.

    A drop-in for ``torchvision.datasets.KMNIST``: the same signature, attributes, items and
    folder (``root/KMNIST/raw/``), so either package reuses the other's download. The files are
    checked against their published md5/sha256 (hashed once, then remembered by size and
    mtime) and decoded with format checks; ``classes`` are the real characters.

    Args:
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        train: the training split (True) or the test split (False).
        transform: applied to each PIL image (mode ``"L"``) in ``__getitem__``.
        target_transform: applied to each int class index in ``__getitem__``.
        download: fetch missing, damaged or stale files from the mirrors
            (``$KMNIST_TORCH_MIRRORS``, then the official host).
        format: ``"mnist"`` (the idx.gz release) or ``"npz"`` (the NumPy release).
        verify: check checksums; False accepts re-encodings and subsets (format checks
            still apply).

    Attributes:
        data (torch.Tensor): uint8, N x 28 x 28.
        targets (torch.Tensor): int64, N.
        classes (list[str]): the characters, in class-index order; ``codepoints``
            (``"U+304A"``), ``romaji`` and ``class_to_idx`` alongside.
    """

    info = catalog.KMNIST

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        format: str = "mnist",
        verify: bool = True,
    ) -> None:
        super().__init__(root, train, transform, target_transform, download, format, verify)


class K49(_ArrayDataset):
    """Kuzushiji-49: 48 hiragana and one iteration mark, 232,365 train and 38,547 test images
    of 28x28 grayscale, imbalanced (417 to 6,000 training images a class: report balanced
    accuracy). Files live in ``root/K49/raw/``; only the npz release exists.

    Args:
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        train: the training split (True) or the test split (False).
        transform: applied to each PIL image (mode ``"L"``) in ``__getitem__``.
        target_transform: applied to each int class index in ``__getitem__``.
        download: fetch missing, damaged or stale files from the mirrors.
        verify: check checksums; False accepts re-encodings and subsets.

    Attributes:
        data (torch.Tensor): uint8, N x 28 x 28.
        targets (torch.Tensor): int64, N.
        classes (list[str]): the 49 characters; ``codepoints``, ``romaji`` and
            ``class_to_idx`` alongside.
    """

    info = catalog.K49

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        verify: bool = True,
    ) -> None:
        super().__init__(root, train, transform, target_transform, download, "npz", verify)


# ------------------------------------------------------------------------------ the registry


def list_datasets() -> list[str]:
    """The names :func:`create_dataset` accepts: every dataset of the catalog, plus MNIST."""
    return ["mnist", *catalog.DATASETS]


def create_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    **kwargs: Any,
) -> ImageDataset:
    """Build a dataset by name, as ``timm.create_model`` builds a model.

    Args:
        name: ``"kmnist"``, ``"k49"``, ``"kkanji"`` or ``"mnist"`` (see :func:`list_datasets`;
            case, ``-`` and ``_`` do not matter, and the full titles work too).
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        train: the training split (True) or the test split (False). KKanji takes ``split=``
            (``"train"``, ``"test"`` or ``"all"``) instead; when ``split`` is not given it
            follows ``train``.
        **kwargs: passed on to the class (``download``, ``verify``, ``transform``,
            ``format``, KKanji's ``test_fraction``/``seed``/``min_per_class``/``shots`` ...).

    Returns:
        The dataset, with ``data``, ``targets`` and ``classes``.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "mnist":
        from torchvision.datasets import MNIST

        kwargs.pop("verify", None)  # torchvision checks MNIST's md5s itself
        return MNIST(str(resolve_root(root)), train=train, **kwargs)
    info = catalog.get(name)  # KeyError naming the datasets there are
    if info.name == "kkanji":
        from .kkanji import KKanji

        kwargs.setdefault("split", "train" if train else "test")
        return KKanji(root, **kwargs)
    cls = {"kmnist": KMNIST, "k49": K49}[info.name]
    return cls(root, train=train, **kwargs)
