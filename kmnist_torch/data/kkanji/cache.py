"""The extracted Kuzushiji-Kanji tree as arrays: its listing (:mod:`.tree`), checked against
the shipped digest when verifying (:mod:`.digest`), decoding every PNG once into a
memory-mapped ``.npy`` cache keyed on the listing's fingerprint, and finding that cache again."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ... import catalog
from ..._io import (
    NOFOLLOW,
    failed_write,
    folder_lock_if_writable,
    hash_file,
    write_error,
    write_json,
)
from ...download.sources import resolve_root
from ...errors import FormatError
from ...settings import Progress, decode_workers
from . import digest
from .archive import ensure_tree
from .layout import (
    CACHE_DIR,
    CACHE_VERSION,
    CHUNK_IMAGES,
    LOCK_NAME,
    POOL_MIN_IMAGES,
    SIDE,
    codepoint_name,
    warn,
)
from .tree import Listing, decode_member
from .tree import scan_tree as scan_tree  # kept importable from here


def open_source(folder: Path, download_missing: bool, verify: bool) -> Listing:
    """The listing of ``folder/kkanji2`` (extracted or downloaded first if needed); when
    verifying, every image is also checked against the shipped digest of the full set."""
    listing = scan_tree(ensure_tree(folder, download_missing, verify), verify)
    if verify and digest.applies():
        digest.check(folder, listing)
    return listing


# --------------------------------------------------------------------------- the decoded cache


def _decode_chunk(paths: Sequence[str]) -> bytes:
    """The images of ``paths``, decoded and concatenated (runs in a worker process)."""
    out = bytearray(len(paths) * SIDE * SIDE)
    for i, p in enumerate(paths):
        out[i * SIDE * SIDE : (i + 1) * SIDE * SIDE] = decode_member(Path(p)).tobytes()
    return bytes(out)


def _quiet_worker() -> None:
    """A decoding worker leaves Ctrl-C and SIGTERM to the command (a terminal sends Ctrl-C to
    every process of the group): the command cancels what is queued, the workers finish their
    chunk and are shut down, with no traceback of theirs."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def _signals_noted() -> Iterator[None]:
    """Inside: Ctrl-C and SIGTERM are noted, not raised, then passed on (``raise_signal``) to
    the handlers in place at the end. Around a fork: raised in fork's own hooks, a command's
    ``Stopped`` is swallowed by Python ("Exception ignored"), in the command and in the new
    worker alike, and the build went on as if nothing had been asked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if noted:
            signal.raise_signal(noted[0])


def _decode_into(out: np.ndarray | _Rows, paths: list[str], workers: int) -> None:
    """Decode ``paths`` into ``out`` (an array, or the rows of the cache file being written),
    in a pool of ``workers`` processes where there are enough images to be worth it."""
    bar = Progress("KKanji: decoding PNGs into the cache", len(paths), "image")
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
        context = multiprocessing.get_context()
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_worker) as pool:
            pending: dict[Any, int] = {}
            try:
                with _signals_noted():  # the workers are forked at the first submit
                    for s in starts:
                        pending[pool.submit(_decode_chunk, paths[s : s + CHUNK_IMAGES])] = s
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


def cache_paths(folder: Path, fingerprint: str) -> tuple[Path, Path]:
    """(images ``.npy``, index ``.json``) of the decoded cache of the tree with this
    fingerprint, under ``folder``; the index is written last, so it marks a complete cache."""
    cache = folder / CACHE_DIR
    return cache / f"images-{fingerprint[:20]}.npy", cache / f"index-{fingerprint[:20]}.json"


def _load_cache(folder: Path, listing: Listing) -> np.ndarray | None:
    """The cached images of exactly this tree, memory-mapped, or None."""
    images_path, index_path = cache_paths(folder, listing.fingerprint)
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
    folder: Path, listing: Listing, workers: int | None = None
) -> tuple[np.ndarray, bool]:
    """Decode every image of the tree into ``folder/cache/images-<fp>.npy`` and write the index
    beside it; returns the memory-mapped array and whether it could be written to disk (a
    read-only root gets an in-memory array instead).

    All or nothing: the images go to a temporary renamed into place, then the index (what
    marks a complete cache) is written; a signal, an error or a full disk on the way removes
    what was written (a failed write is :class:`~kmnist_torch.errors.WriteError`). The room is
    reserved before decoding, so a full disk fails at once; the images are written to the
    file, not through a memory map (where a full disk is a ``SIGBUS`` crash)."""
    workers = decode_workers(-(-listing.total // CHUNK_IMAGES)) if workers is None else workers
    paths = [str(listing.tree.parent / p) for p in listing.relpaths()]
    shape = (listing.total, SIDE, SIDE)
    images_path, index_path = cache_paths(folder, listing.fingerprint)
    tmp = images_path.with_name(f"{images_path.name}.{os.getpid()}.tmp")
    try:
        images_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_other_caches(images_path.parent, listing.fingerprint)  # make room first
        rows = _Rows(tmp, shape)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        cause = failed_write(exc)
        if cause is not None:
            raise write_error(images_path, cause, f", {_mb(shape)} needed") from exc
        msg = f"cannot write the decoded cache in {folder} ({exc}); decoding into memory"
        warn(f"KKanji: {msg}, again at every construction")
        arr = np.empty(shape, np.uint8)
        _decode_into(arr, paths, workers)
        return arr, False
    try:
        with rows:
            _decode_into(rows, paths, workers)
        os.replace(tmp, images_path)
    except OSError as exc:
        cause = failed_write(exc)
        if cause is None:
            raise
        raise write_error(images_path, cause) from exc
    finally:
        tmp.unlink(missing_ok=True)
    try:
        write_json(index_path, _index(listing, images_path, shape), indent=None)
    except BaseException:  # no index: the images are not a cache anyone trusts; free the room
        images_path.unlink(missing_ok=True)
        raise
    _remove_other_caches(images_path.parent, listing.fingerprint)
    return np.load(images_path, mmap_mode="c", allow_pickle=False), True


def _mb(shape: tuple[int, ...]) -> str:
    return f"{np.prod(shape) / 1e6:,.1f} MB"


class _Rows:
    """A new uint8 ``.npy`` of ``shape`` at ``path`` (created, never through a link), its room
    reserved on the disk where the system can (``posix_fallocate``: running out of it is an
    ``OSError`` now, not halfway), filled by ``rows[a:b] = images`` (written at their place)
    and flushed to the disk as the ``with`` block ends without an error."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.row_bytes = int(np.prod(shape[1:]))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
        self.fh = os.fdopen(fd, "wb")
        try:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(self.fh, header)
            self.offset = self.fh.tell()
            size = self.offset + shape[0] * self.row_bytes
            self.fh.flush()
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:
                self.fh.truncate(size)
        except BaseException:
            self.fh.close()
            raise

    def __setitem__(self, rows: slice, images: np.ndarray) -> None:
        self.fh.seek(self.offset + rows.start * self.row_bytes)
        self.fh.write(np.ascontiguousarray(images, np.uint8).tobytes())

    def __enter__(self) -> _Rows:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
        finally:
            self.fh.close()


def _index(listing: Listing, images_path: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """The index of a cache just decoded: what marks it complete and what it holds."""
    return {
        "version": CACHE_VERSION,
        # What `python -m kmnist_torch verify` checks the cache against (loading does not).
        "sha256": hash_file(images_path)[1],
        "fingerprint": listing.fingerprint,
        "images": images_path.name,
        "shape": list(shape),
        "codepoints": [codepoint_name(cp) for cp in listing.codepoints],
        "counts": listing.counts,
        "targets_note": "image i belongs to class k when sum(counts[:k]) <= i < sum(counts[:k+1])",
        "files": listing.relpaths(),
    }


def _remove_other_caches(cache: Path, fingerprint: str) -> None:
    """Delete what was kept for earlier versions of the tree (the ``.npy`` and ``.json`` files
    not named with this tree's fingerprint: images, index, audit facts)."""
    for old in cache.iterdir():
        if fingerprint[:20] not in old.name and old.suffix in (".npy", ".json"):
            with contextlib.suppress(OSError):  # still mapped by a live dataset (Windows)
                old.unlink()


def remove_stale_cache_temporaries(folder: Path) -> None:
    """Remove the ``*.tmp`` files a killed build left in the cache folder (call it holding the
    lock: no other build is running then)."""
    with contextlib.suppress(OSError):
        # Matches the build's "<images>.npy.<pid>.tmp" and _io's hidden ".<name>.<pid>.tmp".
        for p in (folder / CACHE_DIR).glob("*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def images(folder: Path, listing: Listing, workers: int | None = None) -> np.ndarray:
    arr = _load_cache(folder, listing)
    if arr is not None:
        if any((folder / CACHE_DIR).glob("*.tmp")):  # a killed build's leftovers
            with folder_lock_if_writable(folder, LOCK_NAME):
                remove_stale_cache_temporaries(folder)
        return arr
    with folder_lock_if_writable(folder, LOCK_NAME):
        remove_stale_cache_temporaries(folder)
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
    folder = resolve_root(root) / catalog.KKANJI.folder
    listing = open_source(folder, download, verify)
    images(folder, listing, workers)
    images_path, index_path = cache_paths(folder, listing.fingerprint)
    return {
        "images": images_path,
        "index": index_path,
        "n_images": listing.total,
        "n_classes": len(listing.codepoints),
        "fingerprint": listing.fingerprint,
    }


def check_cache(folder: Path, listing: Listing) -> list[str]:
    """Problems of the decoded cache of this tree, checked in full (what ``verify`` does; loading
    trusts the cache whose index matches the tree's fingerprint): its file's sha256 against the
    one its index recorded, then every PNG decoded again and compared with its cached image.
    Each problem names the file. An absent cache is no problem (it is built at first use)."""
    images_path, index_path = cache_paths(folder, listing.fingerprint)
    if not index_path.is_file():
        return []
    problems = []
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        recorded = index.get("sha256") if isinstance(index, dict) else None
    except (OSError, ValueError) as exc:
        return [f"{index_path}: unreadable index ({exc})"]
    if not images_path.is_file():
        return [f"{images_path}: missing (its index {index_path.name} is there)"]
    if not isinstance(recorded, str):
        problems.append(f"{index_path}: records no sha256 of {images_path.name}")
    elif hash_file(images_path)[1] != recorded:
        problems.append(f"{images_path}: sha256 differs from the one recorded when it was built")
    try:
        arr = np.load(images_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return problems or [f"{images_path}: not a readable .npy ({exc})"]
    if arr.dtype != np.uint8 or arr.shape != (listing.total, SIDE, SIDE):
        return problems or [f"{images_path}: shape {arr.shape}, expected {listing.total} images"]
    bad_images = 0
    for i, rel in enumerate(listing.relpaths()):
        png = listing.tree.parent / rel
        try:  # read as at loading: a regular file, bounded, its header first
            img = decode_member(png)
        except FormatError as exc:  # it names the file
            problems.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - every unreadable PNG is reported by name
            problems.append(f"{png}: {exc}")
            continue
        if not np.array_equal(img, arr[i]):
            bad_images += 1
            if bad_images <= 10:
                problems.append(f"{images_path}: image {i} differs from {png} decoded again")
    if bad_images > 10:
        problems.append(f"{images_path}: {bad_images} images in all differ from their PNGs")
    return problems


def remove_cache(folder: Path) -> None:
    """Delete the decoded cache (it is rebuilt at the next use)."""
    with contextlib.suppress(OSError):
        for p in (folder / CACHE_DIR).iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
