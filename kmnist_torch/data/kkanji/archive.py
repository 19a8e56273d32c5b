"""Getting the Kuzushiji-Kanji tree: the tar's record (size and sha256 at first use, the only
check there can be, since no checksum is published), its download from the mirrors, and its
safe, all-or-nothing extraction."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from ... import catalog
from ..._io import folder_lock, hash_file, unchanged, write_json
from ...download.fetch import Target, download
from ...download.sources import NO_SOURCE, target_for, urls_for
from ...errors import ArchiveError, DataFilesError, DownloadError, LockTimeout
from ...settings import say
from ..formats import png_problem
from .layout import (
    CACHE_DIR,
    LOCK_NAME,
    MAX_MEMBER_BYTES,
    NAME_RE,
    RECORD_NAME,
    SIDE,
    TAR_NAME,
    TREE_NAME,
    class_codepoint,
    expected,
    warn,
)


def read_record(folder: Path) -> dict | None:
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
    write_json(folder / RECORD_NAME, rec)
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
    warn(f"KKanji: verify=False, using it anyway: {msg}")


def _check_tar_cheaply(folder: Path, verify: bool) -> None:
    """Compare an existing tar with its record: by size and mtime, hashing only if they moved."""
    tar = folder / TAR_NAME
    rec = read_record(folder)
    if rec is None or not tar.is_file():
        return
    if unchanged(tar, rec):
        return
    md5, sha = hash_file(tar)
    size = tar.stat().st_size
    if sha != rec["sha256"] or size != rec["size"]:
        _mismatch(tar, rec, size, sha, verify)
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
        if len(parts) == 2 and parts[0] == TREE_NAME and class_codepoint(parts[1]) is not None:
            return parts[1], None
        raise ArchiveError(f"{TAR_NAME}: refused member {name!r}: a folder outside {layout}")
    if (
        len(parts) != 3
        or parts[0] != TREE_NAME
        or class_codepoint(parts[1]) is None
        or not NAME_RE.fullmatch(parts[2])
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
        counts, end = _extract_members(tar_path, tmp / TREE_NAME)
        _check_end_marker(tar_path, end, sum(counts.values()))
        _check_counts(tar_path, counts, verify)
        os.rename(tmp / TREE_NAME, folder / TREE_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_members(tar_path: Path, tree: Path) -> tuple[dict[int, int], int]:
    """Check and write every member into ``tree``; returns the images per codepoint and the
    byte offset where tarfile stopped reading."""
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
                cp = _claim(member, cls, fname, folder_of, seen)
                (tree / cls).mkdir(parents=True, exist_ok=True)
                if fname is None:
                    continue
                _write_member(tf, member, tree / cls / fname)
                counts[cp] = counts.get(cp, 0) + 1
            return counts, tf.offset
    except tarfile.TarError as exc:
        raise ArchiveError(
            f"{tar_path} is not a complete tar archive ({exc}): it is truncated or damaged. "
            "Delete it and download it again."
        ) from exc


def _claim(
    member: tarfile.TarInfo, cls: str, fname: str | None, folder_of: dict[int, str], seen: set
) -> int:
    """The codepoint of ``cls``, refusing a second folder name for the same codepoint and a
    file that occurs twice."""
    cp = class_codepoint(cls)
    assert cp is not None  # _member_target checked the name
    if folder_of.setdefault(cp, cls) != cls:
        raise ArchiveError(
            f"{TAR_NAME}: refused member {member.name!r}: folder {cls!r} names "
            f"the same codepoint as {folder_of[cp]!r}"
        )
    key = f"{cls}/{fname}" if fname else cls + "/"
    if fname is not None and key in seen:
        raise ArchiveError(f"{TAR_NAME}: refused member {member.name!r}: it occurs twice")
    seen.add(key)
    return cp


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    """Write one image member to ``path`` once it is read in full and is a PNG of the size."""
    fh = tf.extractfile(member)
    data = fh.read() if fh is not None else b""
    if len(data) != member.size:
        raise ArchiveError(f"{TAR_NAME}: member {member.name!r} is cut short")
    problem = png_problem(data, (SIDE, SIDE))
    if problem:
        raise ArchiveError(f"{TAR_NAME}: refused member {member.name!r}: {problem}")
    with open(path, "xb") as out:
        out.write(data)
    # The member's mtime, so a re-extracted tar gives the same fingerprint and the decoded
    # cache stays valid.
    mtime = int(member.mtime) if 0 <= member.mtime < 2**40 else 0
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def _check_end_marker(tar_path: Path, end: int, n_images: int) -> None:
    """tarfile stops quietly at a header it cannot read; only the end-of-archive marker (two
    zero blocks) tells a complete archive from one cut at a member boundary."""
    with open(tar_path, "rb") as fh:
        fh.seek(end)
        marker = fh.read(2 * tarfile.BLOCKSIZE)
    if marker != bytes(2 * tarfile.BLOCKSIZE):
        raise ArchiveError(
            f"{tar_path} is truncated or damaged: no end-of-archive marker after the "
            f"{n_images} images read (at byte {end} of "
            f"{tar_path.stat().st_size}). Delete it and download it again."
        )


def _check_counts(tar_path: Path, counts: dict[int, int], verify: bool) -> None:
    """Refuse a tar with no image, and (when verifying) one that is not the full dataset."""
    if not counts:
        raise ArchiveError(f"{tar_path} holds no image {TREE_NAME}/U+XXXX/<name>.png")
    n_classes, n_images = expected()
    found = (len(counts), sum(counts.values()))
    if verify and found != (n_classes, n_images):
        raise ArchiveError(
            f"{tar_path} holds {found[0]} classes and {found[1]} images; the full "
            f"Kuzushiji-Kanji has {n_classes} and {n_images}. Delete it and download it "
            "again (or pass verify=False to use a subset)."
        )


# --------------------------------------------------------------------------- getting the tree


def _missing_message(folder: Path) -> str:
    archive = catalog.KKANJI.archive
    assert archive is not None
    # With no source configured, still say where the file comes from officially.
    urls = target_for(archive, folder, catalog.KKANJI.bases, shown=True).urls
    lines = [f"KKanji: neither {TREE_NAME}/ nor {TAR_NAME} is in {folder}."]
    lines += [f"    from: {u}" for u in urls]
    lines += [
        "    (about 310 MB; no checksum is published)",
        f"    put it at: {folder / TAR_NAME}",
        f"Pass download=True (or --download) to fetch it, place the tar there by hand, or "
        f"extract {TREE_NAME}/ into {folder} yourself.",
    ]
    return "\n".join(lines)


def _download_tar(folder: Path, verify: bool, url: str) -> tuple[str, str]:
    """Fetch the tar from ``url``; when a copy was recorded before, insist on the same bytes
    (so a mirror serving something else is skipped for the next one). With no record its size
    is unknown, so at most ``$KMNIST_TORCH_MAX_BYTES`` (default 1 GiB) are written."""
    archive = catalog.KKANJI.archive
    assert archive is not None
    rec = read_record(folder) if verify else None
    target = Target(
        dest=folder / TAR_NAME,
        urls=[url],
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


def ensure_tree(folder: Path, download_missing: bool, verify: bool) -> Path:
    """``folder/kkanji2``, extracted from the tar (downloaded if asked) when not there yet.

    A freshly downloaded tar that cannot be used (not a tar, truncated, unsafe, incomplete) is
    that mirror's failure: it is deleted and the next mirror is asked."""
    tree = folder / TREE_NAME
    tar = folder / TAR_NAME
    if tree.is_dir():
        _check_tar_cheaply(folder, verify)
        return tree
    if not tar.is_file() and not download_missing:
        raise DataFilesError(_missing_message(folder))
    try:
        with folder_lock(folder, LOCK_NAME, what="extracting or downloading KKanji"):
            if tree.is_dir():  # another process extracted it while we waited
                return tree
            if tar.is_file():
                md5, sha = hash_file(tar)
                _use_tar(folder, md5, sha, verify, "found in the folder")
            else:
                _download_and_use(folder, verify)
    except LockTimeout as exc:
        raise DataFilesError(f"KKanji: {exc}") from exc
    except OSError as exc:
        raise DataFilesError(
            f"KKanji: cannot write in {folder} ({exc}); choose a writable root (root=..., "
            "--root or $KMNIST_TORCH_ROOT)."
        ) from exc
    return tree


def _use_tar(folder: Path, md5: str, sha: str, verify: bool, how: str) -> None:
    """Check the tar against its record, extract it, and record it if it was not yet."""
    tar = folder / TAR_NAME
    rec = read_record(folder)
    size = tar.stat().st_size
    if rec is not None and (sha != rec["sha256"] or size != rec["size"]):
        _mismatch(tar, rec, size, sha, verify)
    _extract(tar, folder, verify)
    # Recorded only after a successful extraction, so a bad tar never becomes the reference.
    if rec is None:
        _write_record(folder, tar, md5, sha, how)


def _download_and_use(folder: Path, verify: bool) -> None:
    archive = catalog.KKANJI.archive
    assert archive is not None
    urls = urls_for(archive, catalog.KKANJI.bases)
    if not urls:
        raise DataFilesError(f"KKanji: {TAR_NAME} is needed in {folder}, but {NO_SOURCE}.")
    tar = folder / TAR_NAME
    failures: list[tuple[str, DataFilesError]] = []
    for k, url in enumerate(urls):
        try:
            md5, sha = _download_tar(folder, verify, url)
            _use_tar(folder, md5, sha, verify, "downloaded")
            return
        except DataFilesError as exc:
            # A tar we just fetched and could not use is not kept: a later run must not trust
            # it, and the next mirror may serve a good one.
            tar.unlink(missing_ok=True)
            failures.append((url, exc))
            if k + 1 < len(urls):
                say(f"{TAR_NAME}: {url} gave no usable archive ({str(exc).splitlines()[0]}); "
                    f"trying the next mirror, {urls[k + 1]}")  # fmt: skip
    if len(failures) == 1:
        raise failures[0][1]
    kind = ArchiveError if any(isinstance(e, ArchiveError) for _, e in failures) else DataFilesError
    raise kind(
        "KKanji: no mirror gave a usable kkanji.tar. Set $KMNIST_TORCH_MIRRORS to a mirror, or "
        "fetch the file by hand:\n" + "\n".join(f"- {u}:\n{e}" for u, e in failures)
    )
