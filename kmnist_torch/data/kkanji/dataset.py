"""The :class:`KKanji` dataset: the tree, its decoded cache and a split, as tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ... import catalog
from ...download.sources import resolve_root
from ..base import ImageDataset
from .archive import read_record
from .audit import facts
from .cache import images as load_images
from .cache import open_source
from .layout import SIDE, codepoint_name, expected
from .resize import check_size, downsample
from .split import SPLIT_RULE, check_split_args, make_split


class KKanji(ImageDataset):
    """Kuzushiji-Kanji: 3,832 kanji classes, 140,424 images of 64x64 grayscale, imbalanced
    (1,768 to 1 images per class), with a deterministic stratified train/test split.

    Files live in ``root/KKanji/``: ``kkanji.tar`` (optional once extracted), ``kkanji2/``
    (the extracted PNGs) and ``cache/`` (the decoded images, memory-mapped). In each class
    ``floor(n * test_fraction)`` images, chosen by a keyed hash of ``seed``, codepoint and file
    name, are the test part, except that each group of identical images stays on one side (a
    group spanning classes, and every blank image, in training): see :mod:`.split` and the
    audit (``python -m kmnist_torch audit kkanji``).

    Args:
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        split: ``"train"``, ``"test"`` or ``"all"`` (both parts).
        transform: applied to each PIL image (mode ``"L"``) in ``__getitem__``.
        target_transform: applied to each int class index in ``__getitem__``.
        download: fetch ``kkanji.tar`` from the mirrors when neither it nor the tree is there.
        test_fraction: share of each class that goes to the test part, in [0, 1).
        seed: seed of the split (not of training).
        min_per_class: drop classes with fewer images and renumber the rest.
        shots: keep at most this many training images per class (test unchanged).
        verify: require the complete tree and the recorded tar; False accepts a subset of the
            tree and a changed tar, with a :class:`KKanjiWarning`.
        image_size: 64 (as published), 32 or 16: each image brought to that side by exact 2x2
            means (:func:`.resize.downsample`). The split, the classes and the audit are those
            of the 64x64 images, whatever the size.

    Attributes:
        data (torch.Tensor): uint8, N x image_size x image_size.
        targets (torch.Tensor): int64, N.
        classes (list[str]): the kanji, ordered by numeric codepoint; ``codepoints`` and
            ``class_to_idx`` alongside.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
        test_fraction: float = 0.2,
        seed: int = 0,
        min_per_class: int = 1,
        shots: int | None = None,
        verify: bool = True,
        image_size: int = SIDE,
    ) -> None:
        super().__init__(
            str(resolve_root(root)), transform=transform, target_transform=target_transform
        )
        if split not in ("train", "test", "all"):
            raise ValueError(f"KKanji: split must be 'train', 'test' or 'all', got {split!r}")
        check_split_args(test_fraction, seed, min_per_class, shots)
        self.image_size = check_size(image_size)
        self.split = split
        self.test_fraction = test_fraction
        self.seed = seed
        self.min_per_class = min_per_class
        self.shots = shots
        self.verify = verify
        folder = Path(self.folder)
        listing = open_source(folder, download, verify)
        images = load_images(folder, listing)
        self._facts = facts(folder, listing, images)
        parts = make_split(listing, test_fraction, seed, min_per_class, shots, self._facts)
        self._listing, self._parts = listing, parts
        if split == "all":
            index = np.union1d(parts.train, parts.test)
        else:
            index = parts.train if split == "train" else parts.test
        # Every image, in order: use the memory map as it is rather than copying 575 MB; smaller
        # images are made a chunk at a time, from the 64x64 ones the split was decided on.
        whole = len(index) == listing.total
        self.data = torch.from_numpy(downsample(images, image_size, None if whole else index))
        self.targets = torch.from_numpy(parts.labels[index])
        self.codepoints = [codepoint_name(listing.codepoints[p]) for p in parts.classes]
        self.classes = [chr(listing.codepoints[p]) for p in parts.classes]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        n_classes, n_images = expected()
        self.complete = (len(listing.codepoints), listing.total) == (n_classes, n_images)
        rec = read_record(folder)
        self.tar_sha256: str | None = rec["sha256"] if rec else None

    @property
    def folder(self) -> str:
        """``root/KKanji``, where the tar, the extracted tree and the cache live."""
        return os.path.join(self.root, catalog.KKANJI.folder)

    def split_indices(self) -> dict[str, list[str]]:
        """The image files of each part (``"train"``, ``"test"``) for this dataset's arguments,
        as paths inside the tar (``kkanji2/U+XXXX/<name>.png``), sorted."""
        paths = self._listing.relpaths()
        return {
            "train": [paths[i] for i in self._parts.train],
            "test": [paths[i] for i in self._parts.test],
        }

    def extra_repr(self) -> str:
        counts = torch.bincount(self.targets, minlength=len(self.classes))
        lo, hi = (int(counts.min()), int(counts.max())) if len(counts) else (0, 0)
        n_classes, n_images = expected()
        checked = (
            f"complete ({n_classes} classes, {n_images} images)"
            if self.complete
            else f"a subset ({len(self._listing.codepoints)} classes, {self._listing.total} images)"
        )
        if self._listing.digest_checked:
            checked += ", every image checked against the shipped digest"
        if self._listing.artefacts:
            checked += f", {len(self._listing.artefacts)} copy artefacts set aside"
        found = self._facts.summary()
        tar = f"sha256 {self.tar_sha256} as first recorded" if self.tar_sha256 else "not recorded"
        return "\n".join([
            f"Split: {self.split} (test_fraction={self.test_fraction}, seed={self.seed}, "
            f"min_per_class={self.min_per_class}, shots={self.shots})",
            f"Parts: train {len(self._parts.train)}, test {len(self._parts.test)}",
            f"Audit: {found['identical_groups']} groups of identical images "
            f"({found['images_in_identical_groups']} images), {found['blank_images']} blank; "
            f"{SPLIT_RULE}",
            f"Classes: {len(self.classes)}, images per class here: {lo} to {hi}",
            f"Tree: {checked}, every image checked to be 64x64 L",
            f"Images: {self.image_size}x{self.image_size}"
            + (" (exact 2x2 means of the 64x64 ones)" if self.image_size != SIDE else ""),
            f"Tar: {tar} (no official checksum exists)",
            f"Licence: {catalog.LICENSE}",
        ])  # fmt: skip
