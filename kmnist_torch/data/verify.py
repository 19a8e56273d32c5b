"""Full checks of the files under a data root, and their repair: the ``verify`` command's work.

Every file present is rehashed (no remembered hash is trusted), every complete split decoded,
KKanji's tar checked against its record and its decoded cache against the PNG tree. The checks
report one line per file through ``say`` (``print`` by default), as they go: a full check of
KKanji takes a while, and a line per file shows where it is.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import catalog
from .._io import HashRecord, atomic_write, hash_file
from ..download.fetch import Target, check
from ..download.manifest import Manifest, file_problem, read_manifest
from ..download.sources import ensure_files, target_for
from ..errors import DataFilesError, FormatError
from .arrays import extracted_target, present, raw_folder
from .formats import read_gzip
from .kkanji import archive, cache, digest, layout
from .registry import create_dataset

Say = Callable[[str], None]


def missing_files(info: catalog.DatasetInfo, root: Path, fmts: list[str]) -> list[Target]:
    """The official files of a dataset that are in no usable form under ``root``.

    Args:
        info: the dataset's catalog entry.
        root: the data folder.
        fmts: the formats asked for (``"mnist"``, ``"npz"``); ignored for an archive.

    Returns:
        One target per file still missing, each able to say where to fetch it from and where
        to put it (:meth:`kmnist_torch.download.fetch.Target.describe`).
    """
    if info.archive is not None:  # KKanji: the tar, unless the tree is extracted
        folder = root / info.folder
        if (folder / layout.TREE_NAME).is_dir() or (folder / info.archive.name).is_file():
            return []
        return [target_for(info.archive, folder, info.bases, shown=True)]
    folder = raw_folder(root, info)
    remotes = [f for pairs in info.splits.values() for fmt in fmts for f in pairs.get(fmt, ())]
    if info.classmap is not None:
        remotes.append(info.classmap)
    return [
        target_for(f, folder, info.bases, shown=True) for f in remotes if not present(f, folder)
    ]


def copy_problem(gz: Path, copy: Path) -> str | None:
    """Why an extracted idx file is not the decompressed content of the ``.gz`` beside it.

    Args:
        gz: the official ``.gz`` file.
        copy: the idx file extracted from it (which loading reads).

    Returns:
        What is wrong, in words, or None when ``copy`` is ``gz``'s content.
    """
    if copy.is_symlink():
        return "a symbolic link, not a file (never followed; rewritten from the .gz on repair)"
    try:
        same = read_gzip(gz) == copy.read_bytes()
    except (FormatError, OSError) as exc:
        return f"cannot compare it with {gz.name} ({exc})"
    if same:
        return None
    return f"differs from {gz.name}, which it was extracted from (rewritten from it on repair)"


def verify_dataset(root: Path, name: str, repair: bool = False, say: Say = print) -> int:
    """Check every file of one dataset present under ``root``, and repair what is bad.

    Args:
        root: the data folder.
        name: the dataset (any name :func:`kmnist_torch.catalog.get` accepts).
        repair: download bad files again (and rebuild KKanji's cache).
        say: where the per-file lines go.

    Returns:
        0 when every file present is good (or was repaired), else 1.
    """
    info = catalog.get(name)
    if info.archive is not None:
        return verify_archive(root, info, repair, say)
    return verify_arrays(root, info, repair, say)


@dataclass
class _Checked:
    """One file of a split as checked: its target, what is wrong (None: good) and whether a
    published checksum was compared (else its size only)."""

    target: Target
    problem: str | None
    known: bool = True


@dataclass
class _SplitFiles:
    """A split's pair of files in one format, as found under the raw folder."""

    split: str
    fmt: str
    pair: tuple[catalog.RemoteFile, ...]
    forms: list[str | None] = field(default_factory=list)  # "official", "extracted" or None


def verify_arrays(root: Path, info: catalog.DatasetInfo, repair: bool, say: Say = print) -> int:
    """Rehash every file of an array dataset (KMNIST, K49, MNIST) under ``root`` in whichever
    form it is there (the official file, or only the idx file extracted from it), then decode
    each complete split.

    Args:
        root: the data folder.
        info: the dataset's catalog entry.
        repair: delete bad files and download them again.
        say: where the per-file lines go.

    Returns:
        0 when every file present is good (or was repaired) and every complete split decodes,
        else 1.
    """
    folder = raw_folder(root, info)
    try:
        manifest = read_manifest(folder, info.name)
    except DataFilesError as exc:
        say(f"{info.name}: BAD: {exc}")
        return 1
    if manifest is not None:
        return verify_derived(root, info, manifest, repair, say)
    record = HashRecord(folder)
    found, status = False, 0
    seen: list[_SplitFiles] = []
    for split, formats in info.splits.items():
        for fmt, pair in formats.items():
            files = _SplitFiles(split, fmt, pair, [present(f, folder) for f in pair])
            seen.append(files)
            found = found or any(files.forms)
            bad = _check_files(info, folder, record, files, say)
            if bad and repair:
                bad = _repair_files(info, folder, record, files, bad, say)
            if bad:
                status = 1
            elif all(files.forms):  # a whole split: decode it too
                status |= _decode(root, info, files, say)
    if not found:
        say(f"{info.name}: not downloaded ({folder})")
        return status
    return status | _report_absent(info, root, seen, say)


def _report_absent(info: catalog.DatasetInfo, root: Path, seen: list, say: Say) -> int:
    """Name every file a split needs that is absent (in no form): 1 if there is one. A split
    needs one format's pair: the format partly there, else the format the dataset's other
    files are in, else its first."""
    status = 0
    used = [f.fmt for f in seen if any(f.forms)] or info.formats[:1]
    for split in info.splits:
        mine = [f for f in seen if f.split == split]
        if any(all(f.forms) for f in mine):
            continue
        started = [f for f in mine if any(f.forms)]
        for files in started or [f for f in mine if f.fmt == used[0]]:
            for remote, form in zip(files.pair, files.forms):
                if form is None:
                    status = 1
                    say(f"{info.name} {remote.name}: MISSING: the {split} split needs it "
                        f"(python -m kmnist_torch download {info.name} --root {root})")  # fmt: skip
    return status


def verify_derived(
    root: Path, info: catalog.DatasetInfo, manifest: Manifest, repair: bool, say: Say = print
) -> int:
    """Check a derived root (a re-split, a subset) against its manifest: every file it lists
    rehashed (size and sha256), then each split decoded. Nothing is downloaded into it: a file
    that changed is an error naming it, and ``repair`` says how to write the root again.

    Returns:
        0 when every file matches the manifest and every split decodes, else 1."""
    folder = raw_folder(root, info)
    record = HashRecord(folder)
    status = 0
    for name in manifest.files:
        problem = file_problem(manifest, folder, name, record, full=True)
        say(f"{info.name} {name}: " + ("OK (matches the manifest)" if problem is None
                                       else f"BAD: {problem}"))  # fmt: skip
        status |= problem is not None
        copy = next((f.extracted for f in info.files() if f.name == name), None)
        if problem is None and copy is not None and (folder / copy.name).is_file():
            # The extracted copy is what loading reads: it must be the .gz's content.
            bad = copy_problem(folder / name, folder / copy.name)
            say(f"{info.name} {copy.name}: " + ("OK" if bad is None else f"BAD: {bad}"))
            status |= bad is not None
    if status:
        how = ": not repaired from the mirrors, write it again (resplit / subset)"
        say(f"{info.name}: {folder} is a root {manifest.describe()}; it does not match its "
            f"manifest ({manifest.path})" + (how if repair else ""))  # fmt: skip
        return 1
    for split in manifest.splits:
        for fmt, pair in info.splits.get(split, {}).items():
            if all(f.name in manifest.files for f in pair):
                status |= _decode(root, info, _SplitFiles(split, fmt, pair), say)
    if not status:
        say(f"{info.name}: {manifest.describe()}, verified against its manifest")
    return status


def _check_files(
    info: catalog.DatasetInfo, folder: Path, record: HashRecord, files: _SplitFiles, say: Say
) -> list[Target]:
    """Rehash the files of one split and format in full; say one line each; return the bad."""
    checked: list[_Checked] = []
    for remote, form in zip(files.pair, files.forms):
        if form == "official":
            t = target_for(remote, folder, info.bases)
        elif form == "extracted":
            t = extracted_target(remote, folder)
        else:
            continue
        checked.append(_Checked(t, check(t, True, record, full=True), bool(t.md5 or t.sha256)))
        copy = extracted_target(remote, folder)
        if form == "official" and copy is not None and copy.dest.is_file():
            # The extracted copy is what loading reads: it must be the .gz's content.
            checked.append(_Checked(copy, copy_problem(t.dest, copy.dest)))
    for c in checked:
        verdict = "OK" if c.known else "OK (size only: no published checksum to check)"
        say(
            f"{info.name} {c.target.dest.name}: "
            + (verdict if c.problem is None else "BAD: " + c.problem)
        )
    return [c.target for c in checked if c.problem]


def _repair_files(
    info: catalog.DatasetInfo,
    folder: Path,
    record: HashRecord,
    files: _SplitFiles,
    bad: list[Target],
    say: Say,
) -> list[Target]:
    """Fetch the official files again over the bad ones, all or none, then rewrite from its
    .gz every extracted copy that differs from it (loading never rewrites a copy it did not
    write); return the files still bad."""
    for t in bad:  # official files are replaced all at once, only once their copies arrived
        record.forget(t.dest.name)
    try:
        targets = [target_for(f, folder, info.bases) for f in files.pair]
        ensure_files(targets, True, True, name=info.name, replace=True)
        rewritten = _rewrite_copies(folder, record, files.pair)
    except (DataFilesError, FormatError, OSError) as exc:
        say(f"{info.name} {files.split} ({files.fmt}): repair failed: {exc}")
        return bad
    for name in dict.fromkeys([t.dest.name for t in bad] + rewritten):
        how = "rewritten from the .gz" if name in rewritten else "downloaded again"
        say(f"{info.name} {name}: repaired ({how})")
    files.forms = ["official"] * len(files.pair)
    return []


def _rewrite_copies(folder: Path, record: HashRecord, pair) -> list[str]:
    """Rewrite each extracted copy (or link) beside a .gz of ``pair`` that is not the .gz's
    content, atomically, recorded as written from it; the names rewritten."""
    done = []
    for remote in pair:
        copy = extracted_target(remote, folder)
        if copy is None or not (copy.dest.is_file() or copy.dest.is_symlink()):
            continue
        gz = folder / remote.name
        if copy_problem(gz, copy.dest) is None:
            continue
        raw = read_gzip(gz)
        atomic_write(copy.dest, raw, fsync=False)
        md5, sha = hashlib.md5(raw).hexdigest(), hashlib.sha256(raw).hexdigest()
        record.remember(copy.dest, md5, sha, from_md5=record.hashes(gz)[0])
        done.append(copy.dest.name)
    return done


def _decode(root: Path, info: catalog.DatasetInfo, files: _SplitFiles, say: Say) -> int:
    """Load a complete split through its class: 0 when it decodes, else 1."""
    kw = {"format": files.fmt} if len(info.formats) > 1 else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said per file already
            ds = create_dataset(info.name, root, split=files.split, **kw)
    except (DataFilesError, FormatError) as exc:
        say(f"{info.name} {files.split} ({files.fmt}): BAD: {exc}")
        return 1
    say(f"{info.name} {files.split} ({files.fmt}): decodes, {len(ds):,} images")
    return 0


@dataclass
class ArchiveCheck:
    """What a check of KKanji's folder found: the problems, which parts they are in, and the
    tree's listing (None where there is no readable tree)."""

    problems: list[str] = field(default_factory=list)
    tar_bad: bool = False
    tar_unrecorded: bool = False  # a tar with no record: never checked by this package
    tree_bad: bool = False
    png_bad: bool = False
    listing: cache.Listing | None = None


def verify_archive(root: Path, info: catalog.DatasetInfo, repair: bool, say: Say = print) -> int:
    """Check Kuzushiji-Kanji under ``root``: the tar against the record written when it was
    downloaded, every PNG of the extracted tree, and the decoded cache against the tree.

    Args:
        root: the data folder.
        info: the dataset's catalog entry (KKanji's).
        repair: delete what is bad, download and extract again, rebuild the cache.
        say: where the lines go.

    Returns:
        0 when everything present is good (or was repaired), else 1.
    """
    folder = root / info.folder
    tar, tree = folder / layout.TAR_NAME, folder / layout.TREE_NAME
    if not folder.exists() or not (tree.is_dir() or tar.is_file()):
        say(f"{info.name}: not downloaded ({folder})")
        return 0
    state = check_archive(folder)
    for line in state.problems:
        say(f"{info.name}: BAD: {line}")
    if state.problems and repair:
        return _repair_archive(root, info.name, folder, state, say)
    if state.problems:
        return 1
    if state.listing is not None:
        has_cache = cache.cache_paths(folder, state.listing.fingerprint)[1].is_file()
        note = "; decoded cache checked against the PNGs" if has_cache else "; no cache yet"
        n, k = state.listing.total, len(state.listing.codepoints)
        say(f"{info.name}: OK, {n:,} images in {k:,} classes{note}")
    else:
        say(f"{info.name}: OK, {tar} matches its record (not extracted yet)")
    return 0


def check_archive(folder: Path) -> ArchiveCheck:
    """Check KKanji's folder without changing anything in it (but the record of the classes
    already checked against the shipped digest, so that a second check does not hash them again).

    Args:
        folder: the dataset's folder (``<root>/KKanji``).

    Returns:
        What was found: the tar against its record, the tree's PNGs, the decoded cache
        against the tree.
    """
    state = ArchiveCheck()
    tar, tree = folder / layout.TAR_NAME, folder / layout.TREE_NAME
    try:
        rec = archive.read_record(folder)
    except DataFilesError as exc:
        rec, state.tar_bad = None, True
        state.problems.append(str(exc))
    if tar.is_file() and rec is None and not state.tar_bad:
        state.tar_unrecorded = True
        state.problems.append(_unrecorded(folder, tree.is_dir()))
    if tar.is_file() and rec is not None:
        _, sha = hash_file(tar)
        if sha != rec["sha256"] or tar.stat().st_size != rec["size"]:
            state.tar_bad = True
            state.problems.append(
                f"{tar}: sha256 {sha} differs from the one recorded ({rec['sha256']})"
            )
    if tree.is_dir():
        try:
            state.listing = cache.scan_tree(tree, verify=True)
            if digest.applies():  # image by image against the shipped digest of the full set
                digest.check(folder, state.listing)
        except DataFilesError as exc:
            state.tree_bad = True
            state.problems.append(str(exc))
    if state.listing is not None:
        cache_problems = cache.check_cache(folder, state.listing)
        state.problems += cache_problems
        state.png_bad = any(".png" in p.split(":")[0] for p in cache_problems)
    return state


def _unrecorded(folder: Path, extracted: bool) -> str:
    """What is wrong with a tar that has no record, and the way out."""
    tar, root = folder / layout.TAR_NAME, folder.parent
    line = (
        f"{tar}: unrecorded and unchecked: there is no {layout.RECORD_NAME}, so this package "
        "never checked or extracted this file (an HTML page or a subset saved under this name "
        "looks the same from here). "
    )
    if extracted:
        return line + (
            f"The extracted {layout.TREE_NAME}/ is what is read: delete the tar, or delete "
            f"{layout.TREE_NAME}/ and run python -m kmnist_torch verify kkanji --root {root} "
            "--repair to check the tar in full and record it."
        )
    return line + (
        f"Check it in full (extracted, refused unless it is the whole set) and record it: "
        f"python -m kmnist_torch verify kkanji --root {root} --repair; or delete it."
    )


def _repair_archive(root: Path, name: str, folder: Path, state: ArchiveCheck, say: Say) -> int:
    """Delete the bad parts, download and extract again, rebuild the cache: 0 when it worked.
    An unrecorded tar is the user's: checked by extracting it (and recorded if it passes),
    never deleted; beside an extracted tree it cannot be checked, and stays a problem."""
    tar, tree = folder / layout.TAR_NAME, folder / layout.TREE_NAME
    if state.tar_unrecorded and tree.is_dir() and not (state.tree_bad or state.png_bad):
        say(f"{name}: repair failed: {tar} was not checked (the tree beside it is what is read)")
        return 1
    try:
        if state.tar_bad:
            tar.unlink(missing_ok=True)
        if state.tree_bad or state.png_bad or state.tar_bad:
            shutil.rmtree(tree, ignore_errors=True)
        cache.remove_cache(folder)
        prepared = cache.prepare_cache(root, download=True)
    except (DataFilesError, FormatError, OSError) as exc:
        say(f"{name}: repair failed: {exc}")
        return 1
    n, where = prepared["n_images"], prepared["images"]
    say(f"{name}: repaired: {n:,} images, cache rebuilt at {where}")
    return 0
