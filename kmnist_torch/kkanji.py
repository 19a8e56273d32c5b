"""Kuzushiji-Kanji: 3,832 kanji classes, 140,424 images of 64x64, shipped as one tar of PNGs
with no published checksum and no official train/test split.

This module provides the :class:`KKanji` dataset and :func:`write_split`:

- the tar is downloaded from the mirrors, its size and sha256 recorded at first use and checked
  on every later use, and it is extracted safely (only ``kkanji2/U+<hex>/<name>.png`` regular
  files that are 64x64 8-bit grayscale PNGs, into a temporary folder renamed into place);
- the extracted tree is checked (3,832 classes, 140,424 images) and decoded once into a uint8
  ``.npy`` cache keyed on a fingerprint of the tree, so later constructions touch no PNG;
- splits are stratified and deterministic: they depend only on the arguments and the file
  names, never on the order the filesystem lists them or on the NumPy version.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import time
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from . import catalog
from ._io import hash_file
from .datasets import ImageDataset
from .fetch import DownloadError, Target, download
from .formats import FormatError
from .sources import NO_SOURCE, DataFilesError, default_root, mirrors

TAR_NAME = "kkanji.tar"
TREE_NAME = "kkanji2"
RECORD_NAME = "kkanji.tar.record.json"
CACHE_DIR = "cache"
LOCK_NAME = ".kkanji.lock"
SIDE = 64
# Bumped whenever the cache layout or the decoding changes, so old caches are rebuilt.
CACHE_VERSION = 1
# Part of every split key: changing the split algorithm must change this, never silently.
SPLIT_VERSION = "kkanji-split-v1"
# A 64x64 grayscale PNG is a few KiB; anything far larger is not one of ours (a tar bomb).
MAX_MEMBER_BYTES = 1 << 20
# Below this many images a process pool costs more than it saves.
POOL_MIN_IMAGES = 4096
CHUNK_IMAGES = 512

# What is and is not verified, shown by `python -m kmnist_torch info kkanji` and in the README.
VERIFICATION_NOTE = (
    "no checksum of kkanji.tar is published, so the tar itself cannot be checked against the "
    "release. Verified: at extraction every member is a regular file kkanji2/U+XXXX/<name>.png "
    "(links, devices, absolute paths and '..' refused), the archive is complete (end-of-archive "
    "marker), and the tree holds 3,832 classes and 140,424 images; at decoding every image is a "
    "64x64 8-bit grayscale PNG. Recorded: the tar's size and sha256 at first use "
    "(KKanji/kkanji.tar.record.json), checked whenever the tar changes and required of every "
    "later download. Not verified: that the first tar is the publisher's own bytes. "
    "verify=False accepts a subset of the tree (with a warning)."
)

_CLASS_RE = re.compile(r"U\+([0-9A-Fa-f]{4,6})")
_NAME_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_\-]*\.png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ArchiveError(DataFilesError):
    """``kkanji.tar`` is unsafe (a member outside ``kkanji2/U+XXXX/*.png``, a link, a device),
    damaged (truncated, not a tar) or holds something other than 64x64 grayscale PNGs."""


class KKanjiWarning(UserWarning):
    """The data was used although not everything could be verified (``verify=False``)."""


# --------------------------------------------------------------------------- small helpers


def _expected() -> tuple[int, int]:
    """(classes, images) of the full dataset, read from the catalog at call time."""
    info = catalog.KKANJI
    return info.num_classes, info.split_sizes["all"]


def _codepoint_name(cp: int) -> str:
    return f"U+{cp:04X}"


def _class_codepoint(folder_name: str) -> int | None:
    """The codepoint a class folder names, or None if it is not a valid ``U+XXXX`` name."""
    m = _CLASS_RE.fullmatch(folder_name)
    if m is None:
        return None
    cp = int(m.group(1), 16)
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:  # not a character chr() can stand for
        return None
    return cp


def _png_problem(data: bytes) -> str | None:
    """Why ``data`` is not a 64x64 8-bit grayscale PNG, judged from its header, or None."""
    if not data.startswith(_PNG_SIGNATURE):
        return "not a PNG file (no PNG signature)"
    if len(data) < 33 or data[12:16] != b"IHDR":
        return "a PNG without a complete IHDR header"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if (width, height, depth, colour) != (SIDE, SIDE, 8, 0):
        kind = "8-bit grayscale" if (depth, colour) == (8, 0) else (
            f"bit depth {depth}, colour type {colour}")  # fmt: skip
        return f"a {width}x{height} PNG ({kind}); expected 64x64 8-bit grayscale"
    return None


def _warn(message: str) -> None:
    """Warn at the user's line: the first caller outside this module, however deep we are."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, KKanjiWarning, stacklevel=level)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _lock(folder: Path):
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / LOCK_NAME))


@contextlib.contextmanager
def _lock_if_writable(folder: Path):
    """The folder's lock, or nothing where the folder is read-only (a shared copy prepared by
    someone else: there is nothing we could write there anyway)."""
    try:
        lock = _lock(folder)
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- the tar record


def _read_record(folder: Path) -> dict | None:
    path = folder / RECORD_NAME
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataFilesError(
            f"{path} is unreadable ({exc}); delete it to record {TAR_NAME} afresh."
        ) from exc
    if not isinstance(rec, dict) or not {"size", "sha256"} <= rec.keys():
        raise DataFilesError(f"{path} is not a record of {TAR_NAME}; delete it and run again.")
    return rec


def _write_record(folder: Path, tar: Path, md5: str, sha256: str, how: str) -> dict:
    st = tar.stat()
    rec = {
        "file": TAR_NAME,
        "size": st.st_size,
        "sha256": sha256,
        "md5": md5,
        "mtime_ns": st.st_mtime_ns,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "how": how,
        "note": "No checksum of kkanji.tar is published; this is the copy first used here.",
    }
    _atomic_write_text(folder / RECORD_NAME, json.dumps(rec, indent=1) + "\n")
    return rec


def _mismatch(tar: Path, rec: dict, size: int, sha256: str, verify: bool) -> None:
    """Report a tar that differs from its record: an error, or a warning when not verifying."""
    msg = (
        f"{tar} differs from the copy recorded in {tar.parent / RECORD_NAME} on "
        f"{rec.get('recorded', '?')}: size {size}, sha256 {sha256}; recorded size {rec['size']}, "
        f"sha256 {rec['sha256']}. No official checksum exists, so the record is the only check: "
        f"if the new file is the one you want, delete {RECORD_NAME}, {TREE_NAME}/ and "
        f"{CACHE_DIR}/ in {tar.parent} and run again."
    )
    if verify:
        raise DataFilesError(msg)
    _warn(f"KKanji: verify=False, using it anyway: {msg}")


def _check_tar_cheaply(folder: Path, verify: bool) -> None:
    """Compare an existing tar with its record: by size and mtime, hashing only if they moved."""
    tar = folder / TAR_NAME
    rec = _read_record(folder)
    if rec is None or not tar.is_file():
        return
    st = tar.stat()
    if st.st_size == rec["size"] and st.st_mtime_ns == rec.get("mtime_ns"):
        return
    md5, sha = hash_file(tar)
    if sha != rec["sha256"] or st.st_size != rec["size"]:
        _mismatch(tar, rec, st.st_size, sha, verify)
    else:  # same bytes, touched: remember the new mtime so we do not hash it again
        with contextlib.suppress(OSError):
            _write_record(folder, tar, md5, sha, rec.get("how", "recorded"))


# --------------------------------------------------------------------------- safe extraction


def _member_target(member: tarfile.TarInfo) -> tuple[str, str | None] | None:
    """Check one member's name and type. Returns (class folder, file name or None for a
    folder), or raises :class:`ArchiveError` naming the member."""
    name = member.name
    if name.startswith("/") or name.startswith("\\") or re.match(r"[A-Za-z]:", name):
        raise ArchiveError(f"{TAR_NAME}: refused member {name!r}: an absolute path")
    parts = name.split("/")
    if ".." in parts or any(".." in p.split("\\") for p in parts):
        raise ArchiveError(f"{TAR_NAME}: refused member {name!r}: a path containing '..'")
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        raise ArchiveError(
            f"{TAR_NAME}: refused member {name!r}: a {kind} (to {member.linkname!r})"
        )
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(
            f"{TAR_NAME}: refused member {name!r}: a device, FIFO or other special file"
        )
    if parts and parts[0] == ".":  # "./kkanji2/..." as some tar tools write it
        parts = parts[1:]
    parts = [p for p in parts if p != ""] if member.isdir() else parts
    layout = f"{TREE_NAME}/U+<4 to 6 hex digits>/<name>.png"
    if member.isdir():
        if parts == [TREE_NAME]:
            return None
        if len(parts) == 2 and parts[0] == TREE_NAME and _class_codepoint(parts[1]) is not None:
            return parts[1], None
        raise ArchiveError(f"{TAR_NAME}: refused member {name!r}: a folder outside {layout}")
    if (
        len(parts) != 3
        or parts[0] != TREE_NAME
        or _class_codepoint(parts[1]) is None
        or not _NAME_RE.fullmatch(parts[2])
    ):
        raise ArchiveError(f"{TAR_NAME}: refused member {name!r}: not a file {layout}")
    if member.size > MAX_MEMBER_BYTES:
        raise ArchiveError(
            f"{TAR_NAME}: refused member {name!r}: {member.size} bytes, far more than a 64x64 PNG"
        )
    return parts[1], parts[2]


def _extract(tar_path: Path, folder: Path, verify: bool) -> None:
    """Extract ``kkanji2/`` from the tar into ``folder``, all or nothing.

    Everything is written into a temporary folder beside the destination and renamed into
    place only after the last member and the end-of-archive marker were read and checked.
    """
    for stale in folder.glob(f".{TREE_NAME}.extract-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TREE_NAME}.extract-", dir=folder))
    try:
        counts: dict[int, int] = {}
        folder_of: dict[int, str] = {}  # codepoint -> the one folder name that may hold it
        seen: set[str] = set()
        try:
            with tarfile.open(tar_path, mode="r:") as tf:
                for member in tf:
                    target = _member_target(member)
                    if target is None:
                        continue
                    cls, fname = target
                    cp = _class_codepoint(cls)
                    assert cp is not None  # _member_target checked the name
                    if folder_of.setdefault(cp, cls) != cls:
                        raise ArchiveError(
                            f"{TAR_NAME}: refused member {member.name!r}: folder {cls!r} names "
                            f"the same codepoint as {folder_of[cp]!r}"
                        )
                    cls_dir = tmp / TREE_NAME / cls
                    key = f"{cls}/{fname}" if fname else cls + "/"
                    if fname is not None and key in seen:
                        raise ArchiveError(
                            f"{TAR_NAME}: refused member {member.name!r}: it occurs twice"
                        )
                    seen.add(key)
                    cls_dir.mkdir(parents=True, exist_ok=True)
                    if fname is None:
                        continue
                    fh = tf.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if len(data) != member.size:
                        raise ArchiveError(f"{TAR_NAME}: member {member.name!r} is cut short")
                    problem = _png_problem(data)
                    if problem:
                        raise ArchiveError(f"{TAR_NAME}: refused member {member.name!r}: {problem}")
                    path = cls_dir / fname
                    with open(path, "xb") as out:
                        out.write(data)
                    # The member's mtime, so a re-extracted tar gives the same fingerprint and
                    # the decoded cache stays valid.
                    mtime = int(member.mtime) if 0 <= member.mtime < 2**40 else 0
                    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
                    counts[cp] = counts.get(cp, 0) + 1
                end = tf.offset
        except tarfile.TarError as exc:
            raise ArchiveError(
                f"{tar_path} is not a complete tar archive ({exc}): it is truncated or damaged. "
                "Delete it and download it again."
            ) from exc
        # tarfile stops quietly at a header it cannot read; only the end-of-archive marker (two
        # zero blocks) tells a complete archive from one cut at a member boundary.
        with open(tar_path, "rb") as fh:
            fh.seek(end)
            marker = fh.read(2 * tarfile.BLOCKSIZE)
        if marker != bytes(2 * tarfile.BLOCKSIZE):
            raise ArchiveError(
                f"{tar_path} is truncated or damaged: no end-of-archive marker after the "
                f"{sum(counts.values())} images read (at byte {end} of "
                f"{tar_path.stat().st_size}). Delete it and download it again."
            )
        if not counts:
            raise ArchiveError(f"{tar_path} holds no image {TREE_NAME}/U+XXXX/<name>.png")
        n_classes, n_images = _expected()
        found = (len(counts), sum(counts.values()))
        if verify and found != (n_classes, n_images):
            raise ArchiveError(
                f"{tar_path} holds {found[0]} classes and {found[1]} images; the full "
                f"Kuzushiji-Kanji has {n_classes} and {n_images}. Delete it and download it "
                "again (or pass verify=False to use a subset)."
            )
        os.rename(tmp / TREE_NAME, folder / TREE_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- getting the tree


def _missing_message(folder: Path) -> str:
    archive = catalog.KKANJI.archive
    assert archive is not None
    # With no source configured, still say where the file comes from officially.
    urls = [b + archive.path for b in mirrors() or [catalog.OFFICIAL_BASE]]
    lines = [f"KKanji: neither {TREE_NAME}/ nor {TAR_NAME} is in {folder}."]
    lines += [f"    from: {u}" for u in urls]
    lines += [
        "    (about 310 MB; no checksum is published)",
        f"    put it at: {folder / TAR_NAME}",
        f"Pass download=True to fetch it, place the tar there by hand, or extract {TREE_NAME}/ "
        f"into {folder} yourself.",
    ]
    return "\n".join(lines)


def _download_tar(folder: Path, verify: bool) -> tuple[str, str]:
    """Fetch the tar; when a copy was recorded before, insist on the same bytes (so a mirror
    serving something else is skipped for the next one)."""
    archive = catalog.KKANJI.archive
    assert archive is not None
    if not mirrors():
        raise DataFilesError(f"KKanji: {TAR_NAME} is needed in {folder}, but {NO_SOURCE}.")
    rec = _read_record(folder) if verify else None
    target = Target(
        dest=folder / TAR_NAME,
        urls=[b + archive.path for b in mirrors()],
        size=rec["size"] if rec else archive.size,
        md5=archive.md5,
        sha256=rec["sha256"] if rec else archive.sha256,
    )
    try:
        return download(target)
    except DownloadError as exc:
        extra = (
            f"\n(The sizes and sha256 above are those recorded in {RECORD_NAME} at the first "
            "download; delete that file if the new tar is the one you want.)"
            if rec
            else ""
        )
        raise DataFilesError(
            f"KKanji: download failed. Set $KMNIST_TORCH_MIRRORS to a mirror, or fetch the "
            f"file by hand:\n{exc}{extra}"
        ) from exc


def _ensure_tree(folder: Path, download_missing: bool, verify: bool) -> Path:
    """``folder/kkanji2``, extracted from the tar (downloaded if asked) when not there yet."""
    tree = folder / TREE_NAME
    tar = folder / TAR_NAME
    if tree.is_dir():
        _check_tar_cheaply(folder, verify)
        return tree
    if not tar.is_file() and not download_missing:
        raise DataFilesError(_missing_message(folder))
    with _lock(folder):
        if tree.is_dir():  # another process extracted it while we waited
            return tree
        fresh = not tar.is_file()
        try:
            if fresh:
                md5, sha = _download_tar(folder, verify)
            else:
                md5, sha = hash_file(tar)
            rec = _read_record(folder)
            size = tar.stat().st_size
            if rec is not None and (sha != rec["sha256"] or size != rec["size"]):
                _mismatch(tar, rec, size, sha, verify)
            _extract(tar, folder, verify)
        except DataFilesError:
            # A tar we just fetched and could not use is not kept: a later run must not trust it.
            if fresh:
                tar.unlink(missing_ok=True)
            raise
        # Recorded only after a successful extraction, so a bad tar never becomes the reference.
        if rec is None:
            _write_record(folder, tar, md5, sha, "downloaded" if fresh else "found in the folder")
    return tree


# --------------------------------------------------------------------------- listing the tree


@dataclass
class _Listing:
    """The images of a tree, classes in numeric codepoint order, names sorted in each class."""

    tree: Path
    folders: list[str]  # class folder names as on disk
    codepoints: list[int]
    names: list[list[str]]
    fingerprint: str  # of (path, size, mtime) of every image: changes when the source does

    @property
    def counts(self) -> list[int]:
        return [len(n) for n in self.names]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def relpaths(self) -> list[str]:
        """Every image as ``kkanji2/U+XXXX/<name>.png``, in cache order."""
        return [f"{TREE_NAME}/{f}/{n}" for f, names in zip(self.folders, self.names) for n in names]


def _scan(tree: Path, verify: bool) -> _Listing:
    """List and fingerprint the tree (stat only, no image is opened); check its counts."""
    classes: dict[int, str] = {}
    unexpected: list[str] = []
    with os.scandir(tree) as it:
        entries = list(it)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        cp = _class_codepoint(entry.name) if entry.is_dir() else None
        if cp is None:
            unexpected.append(entry.name)
        elif cp in classes:
            raise DataFilesError(
                f"{tree}: folders {classes[cp]!r} and {entry.name!r} name the same codepoint"
            )
        else:
            classes[cp] = entry.name
    codepoints = sorted(classes)
    folders = [classes[cp] for cp in codepoints]
    names: list[list[str]] = []
    digest = hashlib.sha256(f"kkanji-cache-v{CACHE_VERSION}\n".encode())
    for folder in folders:
        stats = []
        with os.scandir(tree / folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if not (entry.name.endswith(".png") and entry.is_file()):
                    unexpected.append(f"{folder}/{entry.name}")
                    continue
                st = entry.stat()
                stats.append((entry.name, st.st_size, st.st_mtime_ns))
        stats.sort()
        names.append([s[0] for s in stats])
        digest.update(
            "".join(f"{folder}/{n}\t{size}\t{mtime}\n" for n, size, mtime in stats).encode()
        )
    keep = [i for i, n in enumerate(names) if n]  # an empty folder is no class
    listing = _Listing(
        tree,
        [folders[i] for i in keep],
        [codepoints[i] for i in keep],
        [names[i] for i in keep],
        digest.hexdigest(),
    )
    n_classes, n_images = _expected()
    found = (len(listing.codepoints), listing.total)
    if listing.total == 0:
        raise DataFilesError(f"{tree} holds no image (expected {TREE_NAME}/U+XXXX/<name>.png)")
    shown = ", ".join(unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
    if verify and (unexpected or found != (n_classes, n_images)):
        why = f"unexpected entries ({shown}); " if unexpected else ""
        raise DataFilesError(
            f"KKanji: {tree} holds {why}{found[0]} classes and {found[1]} images; the full "
            f"Kuzushiji-Kanji has {n_classes} and {n_images}. Delete {TREE_NAME}/ (and "
            f"{TAR_NAME} if it came from there) and download again, or pass verify=False to "
            "use a subset."
        )
    if unexpected:
        _warn(f"KKanji: ignoring unexpected entries in {tree}: {shown}")
    if found != (n_classes, n_images):
        _warn(
            f"KKanji: verify=False: {tree} holds {found[0]} classes and {found[1]} images, not "
            f"the full {n_classes} and {n_images}; using it as it is."
        )
    return listing


def _open_source(folder: Path, download_missing: bool, verify: bool) -> _Listing:
    return _scan(_ensure_tree(folder, download_missing, verify), verify)


# --------------------------------------------------------------------------- the decoded cache


def _decode_png(path: str) -> np.ndarray:
    """One image as a 64x64 uint8 array, or a FormatError naming the file."""
    with open(path, "rb") as fh:
        data = fh.read()
    problem = _png_problem(data)
    if problem is None:
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if im.size == (SIDE, SIDE) and im.mode == "L":
                    return np.asarray(im, dtype=np.uint8)
                problem = f"a {im.size[0]}x{im.size[1]} image of mode {im.mode}"
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            problem = f"an undecodable PNG ({exc})"
    raise FormatError(
        f"{path}: expected a 64x64 8-bit grayscale PNG, found {problem}. Delete {TREE_NAME}/ "
        "and extract or download it again."
    )


def _decode_chunk(paths: Sequence[str]) -> bytes:
    """The images of ``paths``, decoded and concatenated (runs in a worker process)."""
    out = bytearray(len(paths) * SIDE * SIDE)
    for i, p in enumerate(paths):
        out[i * SIDE * SIDE : (i + 1) * SIDE * SIDE] = _decode_png(p).tobytes()
    return bytes(out)


def decode_workers() -> int:
    """Processes used to decode: ``$KMNIST_TORCH_DECODE_WORKERS``, else the usable CPU cores."""
    env = os.environ.get("KMNIST_TORCH_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _decode_into(out: np.ndarray, paths: list[str], workers: int) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(paths), unit="img", desc="KKanji: decoding PNGs", leave=False,
               disable=not sys.stderr.isatty())  # fmt: skip
    starts = range(0, len(paths), CHUNK_IMAGES)
    try:
        if workers <= 1 or len(paths) < POOL_MIN_IMAGES:
            for s in starts:
                chunk = paths[s : s + CHUNK_IMAGES]
                out[s : s + len(chunk)] = np.frombuffer(_decode_chunk(chunk), np.uint8).reshape(
                    -1, SIDE, SIDE
                )
                bar.update(len(chunk))
            return
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context()) as pool:
            pending = {pool.submit(_decode_chunk, paths[s : s + CHUNK_IMAGES]): s for s in starts}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        s = pending.pop(fut)
                        buf = fut.result()  # re-raises a worker's FormatError
                        n = len(buf) // (SIDE * SIDE)
                        out[s : s + n] = np.frombuffer(buf, np.uint8).reshape(n, SIDE, SIDE)
                        bar.update(n)
            except BaseException:
                for fut in pending:  # one bad image fails the whole build: stop at once
                    fut.cancel()
                raise
    finally:
        bar.close()


def _cache_paths(folder: Path, fingerprint: str) -> tuple[Path, Path]:
    cache = folder / CACHE_DIR
    return cache / f"images-{fingerprint[:20]}.npy", cache / f"index-{fingerprint[:20]}.json"


def _load_cache(folder: Path, listing: _Listing) -> np.ndarray | None:
    """The cached images of exactly this tree, memory-mapped, or None."""
    images_path, index_path = _cache_paths(folder, listing.fingerprint)
    if not index_path.is_file():  # written last: its presence means the .npy is complete
        return None
    try:
        arr = np.load(images_path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (listing.total, SIDE, SIDE):
        return None
    return arr


def _build_cache(
    folder: Path, listing: _Listing, workers: int | None = None
) -> tuple[np.ndarray, bool]:
    """Decode every image of the tree into ``folder/cache/images-<fp>.npy`` and write the index
    beside it; returns the memory-mapped array and whether it could be written to disk (a
    read-only root gets an in-memory array instead)."""
    workers = decode_workers() if workers is None else workers
    paths = [str(listing.tree.parent / p) for p in listing.relpaths()]
    shape = (listing.total, SIDE, SIDE)
    images_path, index_path = _cache_paths(folder, listing.fingerprint)
    tmp = images_path.with_name(f"{images_path.name}.{os.getpid()}.tmp")
    try:
        images_path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as exc:
        msg = f"cannot write the decoded cache in {folder} ({exc}); decoding into memory"
        _warn(f"KKanji: {msg}, again at every construction")
        arr = np.empty(shape, np.uint8)
        _decode_into(arr, paths, workers)
        return arr, False
    try:
        _decode_into(out, paths, workers)
        out.flush()
        del out
        os.replace(tmp, images_path)
    finally:
        tmp.unlink(missing_ok=True)
    index = {
        "version": CACHE_VERSION,
        "fingerprint": listing.fingerprint,
        "images": images_path.name,
        "shape": list(shape),
        "codepoints": [_codepoint_name(cp) for cp in listing.codepoints],
        "counts": listing.counts,
        "targets_note": "image i belongs to class k when sum(counts[:k]) <= i < sum(counts[:k+1])",
        "files": listing.relpaths(),
    }
    _atomic_write_text(index_path, json.dumps(index, ensure_ascii=False) + "\n")
    for old in images_path.parent.iterdir():  # caches of earlier versions of the tree
        if old.name not in (images_path.name, index_path.name) and old.suffix in (".npy", ".json"):
            with contextlib.suppress(OSError):  # still mapped by a live dataset (Windows)
                old.unlink()
    return np.load(images_path, mmap_mode="c", allow_pickle=False), True


def _images(folder: Path, listing: _Listing, workers: int | None = None) -> np.ndarray:
    arr = _load_cache(folder, listing)
    if arr is not None:
        return arr
    with _lock_if_writable(folder):
        arr = _load_cache(folder, listing)  # built by another process while we waited
        return arr if arr is not None else _build_cache(folder, listing, workers)[0]


def prepare_cache(
    root: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Make sure ``root/KKanji`` has the extracted tree and its decoded cache (downloading,
    extracting and decoding what is missing); returns where the cache is and what it holds:
    ``{"images": Path, "index": Path, "n_images", "n_classes", "fingerprint"}``."""
    root = Path(root).expanduser() if root is not None else default_root()
    folder = root / catalog.KKANJI.folder
    listing = _open_source(folder, download, verify)
    _images(folder, listing, workers)
    images_path, index_path = _cache_paths(folder, listing.fingerprint)
    return {
        "images": images_path,
        "index": index_path,
        "n_images": listing.total,
        "n_classes": len(listing.codepoints),
        "fingerprint": listing.fingerprint,
    }


# --------------------------------------------------------------------------- splits


def _check_split_args(test_fraction: float, seed: int, min_per_class: int, shots: int | None):
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a number, got {test_fraction!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    for name, value, low in (("seed", seed, None), ("min_per_class", min_per_class, 1),
                             ("shots", shots, 1)):  # fmt: skip
        if value is None and name == "shots":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


def _rank(seed: int, cp: int, names: list[str]) -> list[int]:
    """Positions of ``names`` in the seeded order of the class: a keyed hash of each name, so
    the order depends on nothing but (seed, codepoint, name), on any machine and any NumPy."""
    prefix = f"{SPLIT_VERSION}|{int(seed)}|{_codepoint_name(cp)}|"
    keys = [hashlib.sha256((prefix + n).encode()).digest() for n in names]
    return sorted(range(len(names)), key=lambda i: (keys[i], names[i]))


@dataclass
class _Split:
    classes: list[int]  # positions in the listing of the kept classes, in order
    train: np.ndarray  # flat cache indices, sorted
    test: np.ndarray
    labels: np.ndarray  # class index (after renumbering) of every cached image, -1 if dropped


def _split(
    listing: _Listing, test_fraction: float, seed: int, min_per_class: int, shots: int | None
) -> _Split:
    # Exact decimal arithmetic: floor(50 * 0.29) is 14 as a person computes it, not 14.499...
    frac = Fraction(repr(float(test_fraction)))
    labels = np.full(listing.total, -1, np.int64)
    train: list[int] = []
    test: list[int] = []
    kept: list[int] = []
    offset = 0
    for pos, (cp, names) in enumerate(zip(listing.codepoints, listing.names)):
        n = len(names)
        if n >= min_per_class:
            labels[offset : offset + n] = len(kept)
            kept.append(pos)
            order = _rank(seed, cp, names)
            n_test = math.floor(n * frac)
            test.extend(offset + i for i in order[:n_test])
            rest = order[n_test:]
            train.extend(offset + i for i in (rest if shots is None else rest[:shots]))
        offset += n
    if not kept:
        raise ValueError(f"min_per_class={min_per_class} leaves no class")
    return _Split(kept, np.array(sorted(train), np.int64), np.array(sorted(test), np.int64),
                  labels)  # fmt: skip


# --------------------------------------------------------------------------- the dataset


class KKanji(ImageDataset):
    """Kuzushiji-Kanji: 3,832 kanji classes, 140,424 images of 64x64 grayscale, imbalanced
    (1,768 to 1 images per class), with a deterministic stratified train/test split.

    Files live in ``root/KKanji/``: ``kkanji.tar`` (optional once extracted), ``kkanji2/``
    (the extracted PNGs) and ``cache/`` (the decoded images). ``split`` is "train", "test" or
    "all" (both). In each class ``floor(n * test_fraction)`` images, chosen by ``seed``, are the
    test part; ``min_per_class`` drops smaller classes (and renumbers the rest), ``shots=k``
    keeps at most ``k`` training images per class. ``verify=False`` accepts a subset of the
    tree and a tar that differs from the recorded one, with a warning.
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
    ) -> None:
        root = Path(root).expanduser() if root is not None else default_root()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        if split not in ("train", "test", "all"):
            raise ValueError(f"KKanji: split must be 'train', 'test' or 'all', got {split!r}")
        _check_split_args(test_fraction, seed, min_per_class, shots)
        self.split = split
        self.test_fraction = test_fraction
        self.seed = seed
        self.min_per_class = min_per_class
        self.shots = shots
        self.verify = verify
        folder = Path(self.folder)
        listing = _open_source(folder, download, verify)
        images = _images(folder, listing)
        parts = _split(listing, test_fraction, seed, min_per_class, shots)
        self._listing, self._parts = listing, parts
        if split == "all":
            index = np.union1d(parts.train, parts.test)
        else:
            index = parts.train if split == "train" else parts.test
        # Every image, in order: use the memory map as it is rather than copying 575 MB.
        whole = len(index) == listing.total
        self.data = torch.from_numpy(images if whole else images[index])
        self.targets = torch.from_numpy(parts.labels[index])
        self.codepoints = [_codepoint_name(listing.codepoints[p]) for p in parts.classes]
        self.classes = [chr(listing.codepoints[p]) for p in parts.classes]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        n_classes, n_images = _expected()
        self.complete = (len(listing.codepoints), listing.total) == (n_classes, n_images)
        rec = _read_record(folder)
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
        n_classes, n_images = _expected()
        checked = (
            f"complete ({n_classes} classes, {n_images} images)"
            if self.complete
            else f"a subset ({len(self._listing.codepoints)} classes, {self._listing.total} images)"
        )
        tar = f"sha256 {self.tar_sha256} as first recorded" if self.tar_sha256 else "not recorded"
        return "\n".join([
            f"Split: {self.split} (test_fraction={self.test_fraction}, seed={self.seed}, "
            f"min_per_class={self.min_per_class}, shots={self.shots})",
            f"Parts: train {len(self._parts.train)}, test {len(self._parts.test)}",
            f"Classes: {len(self.classes)}, images per class here: {lo} to {hi}",
            f"Tree: {checked}, every image checked to be 64x64 L",
            f"Tar: {tar} (no official checksum exists)",
            f"Licence: {catalog.LICENSE}",
        ])  # fmt: skip


def write_split(
    out_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_per_class: int = 1,
    shots: int | None = None,
    download: bool = False,
    verify: bool = True,
) -> dict:
    """Write the KKanji split of these arguments as JSON (arguments, classes with their counts,
    the files of each part) to ``out_path`` and return the same document. Only file names are
    read: no image is decoded."""
    _check_split_args(test_fraction, seed, min_per_class, shots)
    root = Path(root).expanduser() if root is not None else default_root()
    folder = root / catalog.KKANJI.folder
    listing = _open_source(folder, download, verify)
    parts = _split(listing, test_fraction, seed, min_per_class, shots)
    paths = listing.relpaths()
    train_counts = np.bincount(parts.labels[parts.train], minlength=len(parts.classes))
    test_counts = np.bincount(parts.labels[parts.test], minlength=len(parts.classes))
    rec = _read_record(folder)
    n_classes, n_images = _expected()
    doc = {
        "dataset": "Kuzushiji-Kanji",
        "split_version": SPLIT_VERSION,
        "arguments": {
            "test_fraction": test_fraction,
            "seed": int(seed),
            "min_per_class": int(min_per_class),
            "shots": None if shots is None else int(shots),
        },
        "source": {
            "classes": len(listing.codepoints),
            "images": listing.total,
            "complete": (len(listing.codepoints), listing.total) == (n_classes, n_images),
            # Of the sorted file list: the same on any machine that has the same files.
            "files_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
            "tar_sha256": rec["sha256"] if rec else None,
        },
        "licence": catalog.LICENSE,
        "attribution": catalog.ATTRIBUTION,
        "classes": [
            {
                "index": i,
                "codepoint": _codepoint_name(listing.codepoints[p]),
                "char": chr(listing.codepoints[p]),
                "train": int(train_counts[i]),
                "test": int(test_counts[i]),
            }
            for i, p in enumerate(parts.classes)
        ],
        "train": [paths[i] for i in parts.train],
        "test": [paths[i] for i in parts.test],
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    return doc
