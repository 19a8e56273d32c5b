"""KMNIST and K49 in the torchvision mould: download, verify and cache the official files, then
expose ``data``/``targets`` tensors, the real characters as ``classes``, and transforms."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import VisionDataset

from . import catalog, formats
from .catalog import DatasetInfo, RemoteFile
from .fetch import (
    DownloadError,
    FetchConfig,
    Target,
    VerifiedRecord,
    check,
    download,
    hash_file,
)


class DataFilesError(RuntimeError):
    """Files a dataset needs are missing, damaged, stale, or could not be downloaded."""


def default_root() -> Path:
    """``$KMNIST_TORCH_ROOT``, else ``~/.cache/kmnist_torch``."""
    env = os.environ.get("KMNIST_TORCH_ROOT")
    return Path(env).expanduser() if env else Path("~/.cache/kmnist_torch").expanduser()


NO_SOURCE = (
    "no download source: $KMNIST_TORCH_OFFICIAL=0 and $KMNIST_TORCH_MIRRORS is empty; set "
    "$KMNIST_TORCH_MIRRORS to a mirror or place the files by hand"
)


def mirrors() -> list[str]:
    """Base URLs to try, in order: ``$KMNIST_TORCH_MIRRORS`` (commas or spaces), then the
    official host (left out when ``$KMNIST_TORCH_OFFICIAL=0``, for sites that must not reach
    it). Each base has the official layout (``<base>/kmnist/<file>``...).

    Empty when neither is set: files placed by hand still load; only a download then fails,
    with :data:`NO_SOURCE`."""
    bases = [b for b in re.split(r"[,\s]+", os.environ.get("KMNIST_TORCH_MIRRORS", "")) if b]
    if os.environ.get("KMNIST_TORCH_OFFICIAL", "1").strip().lower() not in ("0", "no", "false"):
        bases.append(catalog.OFFICIAL_BASE)
    out: list[str] = []
    for b in bases:
        b = b if b.endswith("/") else b + "/"
        if b not in out:
            out.append(b)
    return out


def target_for(remote: RemoteFile, folder: Path) -> Target:
    """Where an official file lives under ``folder`` and where it can be fetched from."""
    return Target(
        dest=folder / remote.name,
        urls=[base + remote.path for base in mirrors()],
        size=remote.size,
        md5=remote.md5,
        sha256=remote.sha256,
        stale_md5=dict(remote.stale_md5),
    )


def ensure_files(
    targets: list[Target],
    download_missing: bool,
    verify: bool = True,
    name: str = "the dataset",
    config: FetchConfig | None = None,
    extras: list[Target] = (),
) -> None:
    """Make sure every target is on disk and passes its checks; download what is missing, bad
    or stale when ``download_missing``. Raises one :class:`DataFilesError` naming every file
    that is still not right, with its URLs, size, md5 and the path to put it at.

    ``extras`` (the class map) are fetched along when something is downloaded anyway, so a
    complete (or read-only) root is never touched for them.
    """
    if not targets:
        return
    folder = targets[0].dest.parent
    record = VerifiedRecord(folder)
    problems = {id(t): check(t, verify, record) for t in targets}
    bad = [t for t in targets if problems[id(t)]]
    if not bad:
        return
    if download_missing:
        bad += [t for t in extras if check(t, verify, record)]
    if not download_missing or not mirrors():
        # One error naming every file: what is wrong, where it comes from, where to put it.
        if download_missing:
            lines = [f"{name}: {len(bad)} file(s) to download into {folder}, but {NO_SOURCE}:"]
        else:
            lines = [f"{name}: {len(bad)} file(s) not usable in {folder}:"]
        for t in bad:  # extras (the class map) were not checked above: they are missing or bad
            lines.append(f"- {t.dest.name}: {problems.get(id(t)) or 'missing or not usable'}")
            lines.append(t.describe())
        if not download_missing:
            lines.append(
                "Pass download=True (or run `python -m kmnist_torch download "
                f"{name.lower()}`) to fetch them, or place the files above by hand."
            )
        raise DataFilesError("\n".join(lines))
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    # One lock per folder: a second process waits, then finds the files already in place.
    with FileLock(str(folder / ".download.lock")):
        record = VerifiedRecord(folder)
        for t in bad:
            problem = check(t, verify, record)
            if problem is None:
                continue
            if not verify:  # users' own re-encodings: take what the mirror serves
                t = dataclasses.replace(t, size=None, md5=None, sha256=None, stale_md5={})
            elif problem.startswith("stale"):
                warnings.warn(f"{t.dest}: {problem}; replacing it with the current release",
                              stacklevel=3)  # fmt: skip
            try:
                md5, sha = download(t, config)
            except DownloadError as exc:
                failures.append(str(exc))
                continue
            record.remember(t.dest, md5, sha)
    if failures:
        raise DataFilesError(
            f"{name}: download failed for {len(failures)} file(s). Set $KMNIST_TORCH_MIRRORS "
            "to a mirror, or fetch the files by hand:\n" + "\n".join(failures)
        )


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
        root = Path(root).expanduser() if root is not None else default_root()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
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
    record = VerifiedRecord(gz_path.parent)
    gz_md5 = record.hashes(gz_path)[0]  # remembered after the first load
    entry = record.entries.get(plain.name)
    if plain.is_file() and entry and entry.get("from_md5") == gz_md5:
        st = plain.stat()
        if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return formats.read_idx(plain, ndim, full_shape)
    raw = formats.read_gzip(gz_path)
    arr = formats.parse_idx(raw, gz_path, ndim, full_shape)
    tmp = plain.with_name(f"{plain.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, plain)
        md5, sha = hash_file(plain)
        record.remember(plain, md5, sha, from_md5=gz_md5)
    except OSError:  # read-only root: keep working from the gz
        tmp.unlink(missing_ok=True)
    return arr


class KMNIST(_ArrayDataset):
    """Kuzushiji-MNIST: 10 hiragana, 60,000 train and 10,000 test images of 28x28.

    Files live in ``root/KMNIST/raw/`` as in torchvision, so either package reuses the other's
    download. ``format="npz"`` reads the NumPy release instead of the idx.gz one.
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
    of 28x28, imbalanced (report balanced accuracy). Files live in ``root/K49/raw/``."""

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
