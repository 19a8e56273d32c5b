"""Write dataset roots in the exact official layout and file formats, from arrays: re-splits
and subsets of the data, as derived roots with a manifest (and the fake roots of the tests and
benchmarks). Torch-free (a subset reads its source through the dataset classes).

The class maps written here are byte-identical to the official ones (same header, rows and
line endings), so they pass their published checksums.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

from .. import catalog
from .._io import folder_lock, hash_file
from ..download.manifest import file_problem, manifest_path, read_manifest, write_manifest
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
    folder = raw_folder(Path(root), info)
    _write_files(folder, info, split, images, labels, fmt or info.formats[0], extracted)
    return folder


def _write_files(folder: Path, info, split, images, labels, fmt: str, extracted=False) -> list:
    """Write one split's pair of files (and the class map) into ``folder``; their names."""
    if split not in info.splits or fmt not in info.splits[split]:
        raise ValueError(f"{info.name} has no {split!r} split in format {fmt!r}")
    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.uint8)
    if images.shape[1:] != info.image_shape or len(images) != len(labels):
        raise ValueError(
            f"expected N x {info.image_shape[0]} x {info.image_shape[1]} images and N labels, "
            f"got {images.shape} and {labels.shape}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for remote, arr in zip(info.splits[split][fmt], (images, labels)):
        path = folder / remote.name
        if fmt == "npz":
            write_npz(path, arr)
        else:
            write_idx(path, arr)
            if extracted:
                write_idx(path.with_suffix(""), arr, compress=False)
        names.append(remote.name)
    if info.classmap is not None:
        (folder / info.classmap.name).write_bytes(classmap_bytes(info.name))
        names.append(info.classmap.name)
    return names


# Where a derived root is written before it is moved in: a fresh folder of this prefix per run
# (made by mkdtemp, never a fixed name that could be a planted link), under the folder's lock.
WRITING = ".kmnist_torch-writing"
LOCK = ".download.lock"  # the lock downloads into the folder hold too: one writer at a time


def _sweep_writing(folder: Path) -> None:
    """Remove the staging folders left in ``folder`` by killed writers: real directories only
    (judged by ``os.lstat``), never a link or what it points to. Called under the lock."""
    with os.scandir(folder) as entries:
        stale = [e.path for e in entries if e.name.startswith(WRITING)]
    for path in stale:
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)


def _taken(folder: Path, info, staged: Path, names: list[str]) -> list[str]:
    """The files of ``info`` in ``folder`` that writing ``names`` there would destroy: any
    present file neither identical to the new one nor still as an existing manifest lists it
    (a derived root of ours may be written again), and any official file of another format."""
    old = None
    with contextlib.suppress(DataFilesError):
        old = read_manifest(folder, info.name)
    taken = []
    for f in info.files():
        copy = folder / f.extracted.name if f.extracted is not None else None
        if old is None and copy is not None and (copy.exists() or copy.is_symlink()):
            taken.append(f"{copy.name} (loading would rewrite it from the new {f.name})")
        path = folder / f.name
        if not path.exists() and not path.is_symlink():
            continue
        if f.name not in names:
            taken.append(f"{f.name} (not part of the new root)")
        elif old is not None and file_problem(old, folder, f.name, full=True) is None:
            continue
        elif not path.is_symlink() and hash_file(path) == hash_file(staged / f.name):
            continue
        else:
            taken.append(f.name)
    return taken


def write_derived(
    root: str | os.PathLike, name: str, splits: dict, fmt: str, origin: str, how: str
) -> Path:
    """Write a derived root: each ``split -> (images, labels)`` of ``name`` in the official
    names and format ``fmt``, with a manifest (origin, how, each file's size and sha256) that
    loading and ``verify`` check instead of the catalog. All or nothing: the files are written
    into a staging folder beside, then moved in; a root holding other files of the dataset
    (the official ones, or a user's) is refused, never overwritten.

    Returns the raw folder written."""
    info = catalog.get(name)
    folder = raw_folder(Path(root), info)
    # Written first in a private folder elsewhere, so a root refused before any writer of ours
    # came (no lock file: the files judged were not half-written by one) is left exactly as it
    # was, without even a lock file; else the check under the lock decides.
    with tempfile.TemporaryDirectory(prefix="kmnist_torch-derived-") as tmp:
        names = []
        for split, (images, labels) in splits.items():
            names += _write_files(Path(tmp), info, split, images, labels, fmt)
        names = list(dict.fromkeys(names))
        taken = _taken(folder, info, Path(tmp), names) if folder.is_dir() else []
        if taken and not os.path.lexists(folder / LOCK):
            raise _taken_error(folder, info, taken)
        # One writer at a time: two runs never sweep or replace each other's files.
        with folder_lock(folder, LOCK, what="writing a derived root"):
            _sweep_writing(folder)
            staged = Path(tempfile.mkdtemp(prefix=WRITING + "-", dir=folder))
            try:
                for n in names:  # onto the root's file system: os.replace is atomic there
                    shutil.move(Path(tmp) / n, staged / n)
                taken = _taken(folder, info, staged, names)  # under the lock: the last word
                if taken:
                    raise _taken_error(folder, info, taken)
                manifest_path(folder).unlink(missing_ok=True)  # the old one no longer holds
                for n in names:
                    os.replace(staged / n, folder / n)
                counts = {split: len(labels) for split, (_, labels) in splits.items()}
                write_manifest(folder, info.name, origin, how, names, counts)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
    return folder


def _taken_error(folder: Path, info, taken: list[str]) -> DataFilesError:
    """The refusal to write a derived root over the files ``taken`` (from :func:`_taken`)."""
    return DataFilesError(
        f"{folder} already holds files of {info.title} that are not a root this package "
        f"derived; nothing was written. Choose an empty --root. Files: {', '.join(taken)}"
    )


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
    how = (f"the KMNIST test split shuffled with seed {seed}, cut {len(train)} train / "
           f"{len(test)} test")  # fmt: skip
    splits = {"train": (x[train], y[train]), "test": (x[test], y[test])}
    write_derived(root, "kmnist", splits, "mnist", str(Path(source).resolve()), how)
    return {"train": len(train), "test": len(test)}


def write_subset(
    source_root: str | os.PathLike, name: str, out_root: str | os.PathLike,
    sizes: dict[str, int | None], seed: int = 0, verify: bool = True,
) -> dict:  # fmt: skip
    """Write a stratified subset of each split of ``name`` under ``source_root`` (any root
    that loads: official or derived) into ``out_root`` as a derived root.

    Args:
        source_root: the root read.
        name: ``"kmnist"``, ``"k49"`` or ``"mnist"``.
        out_root: the root written (never the same folder as ``source_root``).
        sizes: images kept per split (``{"train": 1000, "test": 200}``; None keeps all).
        seed: which images of each class are kept.
        verify: check the source's files.

    Returns:
        The split sizes written."""
    from .registry import create_dataset
    from .splits import stratified_subset

    info = catalog.get(name)
    if Path(out_root).resolve() == Path(source_root).resolve():
        raise ValueError("--out-root must differ from --root: a subset never replaces its source")
    splits, origin = {}, raw_folder(Path(source_root).resolve(), info)
    for split, n in sizes.items():
        ds = create_dataset(info.name, source_root, train=split == "train", verify=verify)
        x, y = ds.data.numpy(), ds.targets.numpy()
        keep = stratified_subset(y, len(y) if n is None else n, seed)
        splits[split] = (x[keep], y[keep])
    how = "stratified subset, seed {}: {}".format(
        seed, ", ".join(f"{len(v[1])} {k}" for k, v in splits.items())
    )
    write_derived(out_root, info.name, splits, info.formats[0], str(origin), how)
    return {k: len(v[1]) for k, v in splits.items()}
