"""One split of an array dataset (KMNIST, K49, MNIST) from whatever form its files have on disk,
checked and decoded: the official idx.gz or npz files, the idx files torchvision extracts from
the .gz (alone, as a user who unpacked them by hand or torchvision's own tests leave them), or
torchvision's legacy ``processed/training.pt`` and ``test.pt``.

What is checked: the official files against their published size, md5 and sha256 (with
``verify``); an extracted idx file against the size its format implies, and against the md5 and
sha256 of the extracted official file where we know them (computed from real copies); where no
checksum is known, only its size and format, with a warning that its content could not be
checked. Legacy ``.pt`` files were written by torchvision on the user's machine: only their
shapes, dtypes and label range can be checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import HashRecord, atomic_write
from ..catalog import DatasetInfo, LocalFile, RemoteFile
from ..download.fetch import Target, check
from ..download.manifest import Manifest, file_problem, manifest_path, read_manifest
from ..download.sources import (
    data_root,
    ensure_files,
    fix_command,
    mirrors,
    replaceable,
    target_for,
)
from ..errors import DataFilesError, UncheckedContentWarning
from . import formats

LEGACY_FILES = {"train": "training.pt", "test": "test.pt"}

# (file path) already warned about in this process: a warning a user reads once, not per load.
_WARNED: set[str] = set()


@dataclass
class Loaded:
    """Decoded images and labels of one split, and which files they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str  # "idx.gz", "idx", "npz" or "legacy .pt"
    verified: bool  # every file checked against a published checksum (or its manifest)
    derived: str | None = None  # "derived from ..." for a root with a manifest


def raw_folder(root: Path, info: DatasetInfo) -> Path:
    """``root/<Folder>/raw``, where torchvision keeps the same files."""
    return root / info.folder / "raw"


def processed_folder(root: Path, info: DatasetInfo) -> Path:
    """``root/<Folder>/processed``, where older torchvision releases wrote ``training.pt``."""
    return root / info.folder / "processed"


def _warn_once(path: Path, message: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(message, UncheckedContentWarning, stacklevel=4)


def extracted_target(remote: RemoteFile, folder: Path) -> Target | None:
    """The idx file extracted from ``remote`` (an idx.gz) in ``folder``, with the size and the
    checksums we know of it; None for files that are not gzipped."""
    ex = remote.extracted
    if ex is None:
        return None
    return Target(dest=folder / ex.name, urls=[], size=ex.size, md5=ex.md5, sha256=ex.sha256)


def present(remote: RemoteFile, folder: Path) -> str | None:
    """Which form of ``remote`` is in ``folder``: ``"official"`` (the published file),
    ``"extracted"`` (only the idx file inside it), or None."""
    if (folder / remote.name).is_file():
        return "official"
    if remote.extracted is not None and (folder / remote.extracted.name).is_file():
        return "extracted"
    return None


def missing_error(info: DatasetInfo, root: Path, fmt: str, name: str) -> DataFilesError:
    """One error listing every file of the run (both splits and the class map) that is in no
    usable form under ``root``: one summary line (what is missing, the one command that fixes
    it), then URLs, size, checksums and where to put each file."""
    folder = raw_folder(root, info)
    files = [f for pairs in info.splits.values() for f in pairs[fmt]]
    if info.classmap is not None:
        files.append(info.classmap)
    missing = [f for f in files if present(f, folder) is None]
    lines = [
        f"{name}: {len(missing)} file(s) missing in {folder}. Fix: {fix_command(name, folder)}",
        "Details:",
    ]
    for f in missing:
        lines.append(f"- {f.name}: missing")
        lines.append(target_for(f, folder, info.bases, shown=True).describe())
        if f.extracted is not None:
            lines.append(f"    (or the extracted {f.extracted.name}, {f.extracted.size} bytes)")
    if not mirrors():
        lines.append("No download source is set ($KMNIST_TORCH_OFFICIAL=0, no mirrors).")
    lines.append("Pass download=True (or --download) to fetch them, or place the files above "
                 "by hand.")  # fmt: skip
    return DataFilesError("\n".join(lines))


def _load_derived(
    info: DatasetInfo, folder: Path, manifest: Manifest, split: str, fmt: str, verify: bool,
    name: str,
) -> Loaded:  # fmt: skip
    """One split of a derived root: its files checked against the root's manifest (size and
    sha256, as strictly as the catalog's) instead of the catalog, never downloaded."""
    pair = info.splits[split][fmt]
    where = f"{name}: {folder} is a root {manifest.describe()}"
    unlisted = [f.name for f in pair if f.name not in manifest.files]
    if unlisted:
        raise DataFilesError(f"{where}; it holds no {split} split in the {fmt} format "
                             f"({', '.join(unlisted)} not in its manifest)")  # fmt: skip
    record = HashRecord(folder)
    if verify:
        problems = [(f.name, file_problem(manifest, folder, f.name, record)) for f in pair]
        problems = [(n, p) for n, p in problems if p]
        if problems:
            raise DataFilesError(
                f"{where}, and {len(problems)} of its files do not match its manifest "
                f"({manifest.path}): write the root again, or pass --no-verify (verify=False) "
                "to use the files as they are\n" + "\n".join(f"- {n}: {p}" for n, p in problems)
            )
    else:
        for f in pair:
            if not (folder / f.name).is_file():
                raise DataFilesError(f"{where}, but {f.name} is missing: write it again")
    images, labels = _decode(info, folder, pair, ["official", "official"], fmt, record, verify,
                             name)  # fmt: skip
    paths = (folder / pair[0].name, folder / pair[1].name)
    _check_arrays(info, split, images, labels, paths, False)
    expected = manifest.splits.get(split)
    if verify and expected is not None and len(images) != expected:
        raise formats.FormatError(f"{paths[0]}: the manifest says {expected} images in the "
                                  f"{split} split, found {len(images)}")  # fmt: skip
    return Loaded(images, labels, "npz" if fmt == "npz" else "idx.gz", verify,
                  manifest.describe())  # fmt: skip


def load(
    info: DatasetInfo,
    root: Path,
    split: str,
    fmt: str,
    download: bool,
    verify: bool,
    name: str,
    legacy: bool = False,
) -> Loaded:
    """Find, check (downloading what is missing or bad when ``download``) and decode one split.

    Raises :class:`DataFilesError` naming every file the run needs when files are missing and
    cannot be fetched, and :class:`~kmnist_torch.errors.FormatError` for a damaged file."""
    folder = raw_folder(root, info)
    manifest = read_manifest(folder, info.name)
    if manifest is not None:
        return _load_derived(info, folder, manifest, split, fmt, verify, name)
    pair = info.splits[split][fmt]
    extras = [target_for(info.classmap, folder, info.bases)] if info.classmap else []
    forms = [present(f, folder) for f in pair]
    if None in forms:
        if not download:
            if legacy and _legacy_exists(root, info):
                return _load_legacy(root, info, split, verify)
            raise missing_error(info, root, fmt, name)
        forms = ["official" if form is None else form for form in forms]
    record = HashRecord(folder)
    verified = _check_extracted(folder, pair, forms, verify, record, name)
    official = [target_for(f, folder, info.bases) for f, form in zip(pair, forms)]
    official = [t for t, form in zip(official, forms) if form == "official"]
    ensure_files(official, download, verify, name=name, extras=extras, record=record)
    verified = verified and verify
    images, labels = _decode(info, folder, pair, forms, fmt, record, verify, name)
    names = [f.extracted.name if form == "extracted" else f.name for f, form in zip(pair, forms)]
    _check_arrays(info, split, images, labels, (folder / names[0], folder / names[1]), verify)
    source = "npz" if fmt == "npz" else ("idx" if "extracted" in forms else "idx.gz")
    return Loaded(images, labels, source, verified)


def _check_extracted(folder: Path, pair, forms: list, verify: bool, record, name: str) -> bool:
    """Check the files present only as the idx extracted from an official .gz (``forms``
    updated where one vanished meanwhile); whether every one was verified by checksum. A copy
    that fails its check is the user's own: an error, never replaced."""
    verified = True
    for i, (remote, form) in enumerate(zip(pair, forms)):
        if form != "extracted":
            continue
        target = extracted_target(remote, folder)
        problem = check(target, verify, record)  # refuses a symbolic link, verify or not
        checked = verify and bool(target.md5 or target.sha256)
        if problem is None:
            if not checked:
                verified = False
                if verify:
                    _warn_once(
                        folder / remote.extracted.name,
                        f"{name}: {folder / remote.extracted.name}: no published checksum "
                        "exists for this extracted file; its size and format were checked, "
                        f"its content could not be. Place {remote.name} beside it to have it "
                        "verified.",
                    )
            continue
        if not replaceable(problem):  # the user's own file: never replaced unasked
            raise DataFilesError(
                f"{name}: {folder / remote.extracted.name} is not usable: {problem}; it was "
                "left as it is. Your own file: pass --no-verify (verify=False). To replace it: "
                f"python -m kmnist_torch verify {name.lower()} --root {folder.parent.parent} "
                f"--repair (or place the official {remote.name} beside it)."
            )
        forms[i] = "official"  # gone meanwhile: fetch the published file, and decode that
    return verified


def _decode(
    info: DatasetInfo, folder: Path, pair, forms: list[str], fmt: str, record: HashRecord,
    verify: bool, name: str,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    shape = info.image_shape
    if fmt == "npz":
        return (
            formats.read_npz(folder / pair[0].name, (-1, *shape)),
            formats.read_npz(folder / pair[1].name, (-1,)),
        )
    out = []
    for remote, form, ndim, dims in zip(pair, forms, (3, 1), ((-1, *shape), None)):
        if form == "extracted":
            out.append(formats.read_idx(folder / remote.extracted.name, ndim, dims))
        else:
            gz = folder / remote.name
            out.append(read_idx_cached(gz, remote.extracted, ndim, dims, record, verify, name))
    return out[0], out[1]


def _check_arrays(
    info: DatasetInfo,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    where: tuple[Path, Path],
    verify: bool,
) -> None:
    """Images and labels agree, labels are class indices, and (``verify``) the split has its
    published size. ``where``: the (images, labels) files, named in the errors."""
    if len(images) != len(labels):
        raise formats.FormatError(
            f"{where[0]} holds {len(images)} images but {where[1]} holds {len(labels)} labels; "
            "they must match: replace them with the official files (python -m kmnist_torch "
            f"verify {info.name} --repair), or write your own again."
        )
    if labels.size and int(labels.max()) >= info.num_classes:
        raise formats.FormatError(
            f"{where[1]}: expected labels below {info.num_classes}, found {int(labels.max())}."
        )
    expected = info.split_sizes[split]
    if verify and len(images) != expected:
        raise formats.FormatError(
            f"{where[0]}: expected {expected} images in the {split} split, found {len(images)}."
        )


def read_idx_cached(
    gz_path: Path,
    extracted: LocalFile | None,
    ndim: int,
    shape: tuple[int, ...] | None,
    record: HashRecord | None = None,
    verify: bool = True,
    name: str = "the dataset",
) -> np.ndarray:
    """Decode an idx.gz, using (and keeping) the extracted copy torchvision also reads.

    The copy is read when the record says this package wrote it from this very gz (same md5,
    neither file touched since). It is written from the gz only when it is absent, or when the
    record says this package wrote it (from an earlier gz) and it is untouched since; one that
    already has the gz's content is only remembered. Any other copy is the user's (edited, or
    extracted from another file, or a symbolic link): never rewritten. With ``verify`` that is a
    :class:`DataFilesError` offering the ways out; without, the copy is read (it is what
    torchvision reads), with a warning saying so.
    """
    plain = gz_path.with_suffix("") if extracted is None else gz_path.with_name(extracted.name)
    record = record or HashRecord(gz_path.parent)
    gz_md5 = record.hashes(gz_path)[0]  # remembered after the first load
    link = plain.is_symlink()
    entry = record.lookup(plain) if plain.is_file() and not link else None
    if entry is not None and entry.get("from_md5") == gz_md5:
        return formats.read_idx(plain, ndim, shape)
    raw = formats.read_gzip(gz_path, ndim=ndim)
    arr = formats.parse_idx(raw, gz_path, ndim, shape)
    md5, sha = hashlib.md5(raw).hexdigest(), hashlib.sha256(raw).hexdigest()
    ours = entry is not None and "from_md5" in entry  # written by us, untouched since
    if (link or plain.exists()) and not ours:
        if not link and _same_content(plain, raw):  # e.g. torchvision extracted this very gz
            with contextlib.suppress(OSError):
                record.remember(plain, md5, sha, from_md5=gz_md5)
            return arr
        return _users_copy(gz_path, plain, link, ndim, shape, verify, name)
    try:
        atomic_write(plain, raw, fsync=False)
        # Hashed from memory: the bytes just written, not read back from disk.
        record.remember(plain, md5, sha, from_md5=gz_md5)
    except OSError:  # read-only root: keep working from the gz
        pass
    return arr


def _same_content(path: Path, raw: bytes) -> bool:
    try:
        return path.is_file() and path.stat().st_size == len(raw) and path.read_bytes() == raw
    except OSError:
        return False


def _users_copy(
    gz_path: Path, plain: Path, link: bool, ndim: int, shape, verify: bool, name: str
) -> np.ndarray:
    """An extracted copy that is not the gz's content and not ours to rewrite: refused with the
    ways out (``verify``), else read as it is (what torchvision reads), with a warning."""
    root, dataset = data_root(plain.parent), name.lower()
    repair = f"python -m kmnist_torch verify {dataset} --root {root} --repair"
    if manifest_path(plain.parent).exists():  # a derived root: nothing is repaired into it
        repair = "write the root again (resplit / subset)"
    if link:
        raise DataFilesError(
            f"{name}: {plain} is a symbolic link (never followed) and was left as it is. Put "
            f"the file itself there, or replace it with the content of {gz_path.name}: {repair}"
        )
    if verify:
        raise DataFilesError(
            f"{name}: {plain} differs from {gz_path.name} beside it and was left as it is. "
            "Your own copy (torchvision reads it): pass --no-verify (verify=False) to read it. "
            f"To replace it with the content of {gz_path.name}: {repair}\n"
            f"This package writes {plain.name} from {gz_path.name} only where it is absent or "
            "was written by this package and not changed since."
        )
    _warn_once(
        plain,
        f"{name}: verify=False: read your {plain} (what torchvision reads), not "
        f"{gz_path.name} beside it, whose content differs; {plain.name} was left as it is.",
    )
    return formats.read_idx(plain, ndim, shape)


# ------------------------------------------------------------------ torchvision's legacy files


def _legacy_exists(root: Path, info: DatasetInfo) -> bool:
    folder = processed_folder(root, info)
    return all((folder / f).is_file() for f in LEGACY_FILES.values())


def _load_legacy(root: Path, info: DatasetInfo, split: str, verify: bool) -> Loaded:
    """Read torchvision's legacy ``processed/<split>.pt`` (a pickled ``(data, targets)`` pair of
    tensors), with ``weights_only=True`` so nothing but tensors can be unpickled."""
    import torch

    path = processed_folder(root, info) / LEGACY_FILES[split]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: the file is not what it should be
        raise formats.FormatError(
            f"{path}: expected torchvision's legacy (data, targets) tensors, could not read it "
            f"({type(exc).__name__}: {exc}). Delete {path.parent} and download the raw files."
        ) from exc
    ok = isinstance(obj, (tuple, list)) and len(obj) == 2
    data, targets = obj if ok else (None, None)
    if not (
        isinstance(data, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and data.dtype == torch.uint8
        and tuple(data.shape[1:]) == info.image_shape
        and targets.dim() == 1
        and not targets.is_floating_point()
    ):
        raise formats.FormatError(
            f"{path}: expected a (uint8 N x {info.image_shape[0]} x {info.image_shape[1]}, "
            "integer N) pair of tensors as older torchvision releases wrote it. Delete "
            f"{path.parent} and download the raw files."
        )
    images, labels = data.numpy(), targets.numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise formats.FormatError(f"{path}: labels outside 0..{info.num_classes - 1}")
    _check_arrays(info, split, images, labels, (path, path), verify)
    if verify:
        _warn_once(
            path,
            f"{info.title}: loaded torchvision's legacy {path}: no published checksum exists for "
            "it, so only its shapes, dtypes and labels were checked.",
        )
    return Loaded(images, labels.astype(np.int64), "legacy .pt", False)
