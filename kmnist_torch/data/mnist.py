"""MNIST, KMNIST and K49 as members of torchvision's MNIST family (each is an instance of
``torchvision.datasets.MNIST``; KMNIST of ``torchvision.datasets.KMNIST`` too): download, verify
and cache the official files, then expose ``data``/``targets`` tensors, the real characters as
``classes``, and transforms."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision import datasets as tv_datasets
from torchvision.datasets import VisionDataset

from .. import catalog
from ..catalog import DatasetInfo
from ..download.sources import ensure_files, resolve_root, target_for
from . import arrays
from .base import ImageDataset

__all__ = ["K49", "KMNIST", "MNIST"]


def _writable(arr: np.ndarray) -> np.ndarray:
    return arr if arr.flags.writeable else arr.copy()


class _MNISTFamily(ImageDataset):
    """Shared base of the datasets published as whole arrays (MNIST, KMNIST, K49): a subclass
    names its catalog entry and the torchvision class it stands in for.

    Every public attribute of ``torchvision.datasets.MNIST`` is there and behaves as it does
    there (``resources``, ``mirrors``, ``raw_folder``, ``processed_folder``, ``download()``,
    ``class_to_idx``, the deprecated ``train_data``/``train_labels``/``test_data``/
    ``test_labels``), with two differences: ``classes`` are the characters, and the files are
    verified (:mod:`kmnist_torch.data.arrays` says in which forms a root may hold them)."""

    info: DatasetInfo
    legacy = False  # whether torchvision ever wrote processed/*.pt files for this dataset

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
        # Not called directly: MNIST, KMNIST and K49 give the user-facing signatures.
        root = resolve_root(root)
        VisionDataset.__init__(
            self, str(root), transform=transform, target_transform=target_transform
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
                stacklevel=3,
            )
        self.data, self.targets = self._load_data(download)
        cls = self.info.classes
        self.classes = [c.char for c in cls]  # class_to_idx follows, as in torchvision
        self.codepoints = [c.codepoint for c in cls]
        self.romaji = [c.romaji for c in cls]

    # torchvision's layout: root/<Folder>/raw and root/<Folder>/processed.
    @property
    def raw_folder(self) -> str:
        """``root/<Folder>/raw``, where torchvision keeps the same files."""
        return str(arrays.raw_folder(Path(self.root), self.info))

    @property
    def processed_folder(self) -> str:
        """``root/<Folder>/processed``, where older torchvision releases wrote ``training.pt``."""
        return str(arrays.processed_folder(Path(self.root), self.info))

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Character -> class index."""
        return {c: i for i, c in enumerate(self.classes)}

    def _check_exists(self) -> bool:
        folder = Path(self.raw_folder)
        pair = self.info.splits[self.split][self.format]
        return all(arrays.present(f, folder) for f in pair)

    def _load_data(self, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = arrays.load(self.info, Path(self.root), self.split, self.format, download,
                             self.verify, type(self).__name__, legacy=self.legacy)  # fmt: skip
        self.source, self.verified = loaded.source, loaded.verified
        self.derived = loaded.derived  # "derived from ..." for a root with a manifest
        images = torch.from_numpy(_writable(loaded.images))
        return images, torch.from_numpy(loaded.labels.astype(np.int64))

    def download(self) -> None:
        """Download (and verify) every official file of this format, both splits and the
        class map, into :attr:`raw_folder`, as torchvision's ``download()`` fetches its
        resources; files already there and correct are kept, any other file of them is
        replaced (an explicit download, as ``python -m kmnist_torch download`` is). A derived
        root (a re-split or subset, with a manifest) is refused: nothing is downloaded into it."""
        folder = Path(self.raw_folder)
        remotes = [f for pairs in self.info.splits.values() for f in pairs[self.format]]
        if self.info.classmap is not None:
            remotes.append(self.info.classmap)
        targets = [target_for(f, folder, self.info.bases) for f in remotes]
        ensure_files(targets, True, self.verify, name=type(self).__name__, replace=True)

    def extra_repr(self) -> str:
        counts = torch.bincount(self.targets, minlength=self.info.num_classes)
        checked = "verified against published checksums"
        if self.derived:
            checked = f"{self.derived}, verified against its manifest"
        if not self.verified:
            checked = "size and format checked, content not verified"
        return "\n".join([
            f"Split: {self.split.capitalize()}",
            f"Format: {self.format} (read from {self.source}; {checked})",
            f"Classes: {self.info.num_classes} ({''.join(self.classes)})",
            f"Images per class: {int(counts.min())} to {int(counts.max())}",
            f"Licence: {self.info.license}",
        ])  # fmt: skip


def _torchvision_attributes(info: DatasetInfo, fmt: str) -> dict[str, Any]:
    """torchvision's class attributes, from the catalog: ``mirrors`` (the publisher's folders;
    ``$KMNIST_TORCH_MIRRORS`` comes first when we download) and ``resources`` ((file name,
    md5) of every official file of the format)."""
    folder = info.splits["train"][fmt][0].path.rsplit("/", 1)[0]
    return {
        "mirrors": [base + folder + "/" for base in info.bases],
        "resources": [(f.name, f.md5) for pairs in info.splits.values() for f in pairs[fmt]],
    }


class KMNIST(_MNISTFamily, tv_datasets.KMNIST):
    """Kuzushiji-MNIST: 10 hiragana, 60,000 train and 10,000 test images of 28x28 grayscale.

    A drop-in for ``torchvision.datasets.KMNIST``, and an instance of it (so of ``MNIST``):
    the same signature, attributes, items and folder (``root/KMNIST/raw/``), so either package
    reuses the other's download, and ``wrap_dataset_for_transforms_v2`` works. The files may be
    the official idx.gz or npz files, the extracted idx files alone, or torchvision's legacy
    ``processed/*.pt``. The files are
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
    legacy = True  # older torchvision releases wrote processed/training.pt and test.pt
    locals().update(_torchvision_attributes(catalog.KMNIST, "mnist"))

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


class K49(_MNISTFamily, tv_datasets.MNIST):
    """Kuzushiji-49: 48 hiragana and one iteration mark, 232,365 train and 38,547 test images
    of 28x28 grayscale, imbalanced (417 to 6,000 training images a class: report balanced
    accuracy). Files live in ``root/K49/raw/``; only the npz release exists. A 28x28 MNIST-style
    dataset, so an instance of ``torchvision.datasets.MNIST`` as KMNIST is.

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
    locals().update(_torchvision_attributes(catalog.K49, "npz"))

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


class MNIST(_MNISTFamily, tv_datasets.MNIST):
    """MNIST, the handwritten digits the Kuzushiji table compares with: 60,000 train and
    10,000 test images of 28x28 in ``root/MNIST/raw/``, from torchvision's two sources (after
    ``$KMNIST_TORCH_MIRRORS``, as ``<base>/mnist/<file>``), md5-verified. ``classes`` are the
    digits ``"0"`` to ``"9"``.

    Args:
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        train: the training split (True) or the test split (False).
        transform: applied to each PIL image (mode ``"L"``) in ``__getitem__``.
        target_transform: applied to each int class index in ``__getitem__``.
        download: fetch missing or damaged files.
        verify: check checksums; False accepts re-encodings and subsets.
    """

    info = catalog.MNIST
    legacy = True
    locals().update(_torchvision_attributes(catalog.MNIST, "mnist"))

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        verify: bool = True,
    ) -> None:
        super().__init__(root, train, transform, target_transform, download, "mnist", verify)
