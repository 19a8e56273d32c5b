"""The extracted Kuzushiji-Kanji tree, read as the tar's members are: regular files only (a
symbolic link, class folder or image, is neither followed nor read; a FIFO or device is never
opened), at most :data:`~.layout.MAX_MEMBER_BYTES` each, the PNG header read and checked before
the rest, names with control characters escaped when printed. Copies that copy and upload tools
leave beside an image (``<name>(1).png``, ``<name> copy.png``...) are set aside when they hold
the same bytes as that image. Listing and fingerprinting use names, sizes and mtimes only."""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..._io import open_regular
from ...errors import DataFilesError, FormatError
from ...settings import say
from ..formats import png_problem
from .layout import (
    CACHE_VERSION,
    MAX_MEMBER_BYTES,
    NAME_RE,
    SIDE,
    TAR_NAME,
    TREE_NAME,
    class_codepoint,
    expected,
    warn,
)

# What copy and upload tools name a second copy of "<stem>.png": "<stem>(1).png",
# "<stem> (2).png", "<stem> copy.png", "<stem> copy 2.png", "<stem> - Copy.png",
# "<stem> - Copy (2).png". The name only nominates; byte equality with "<stem>.png" decides.
ARTEFACT_RE = re.compile(
    r"(?P<stem>.+?)(?: ?\(\d{1,3}\)| copy(?: \d{1,3})?| - Copy(?: \(\d{1,3}\))?)\.png"
)
PNG_HEADER_BYTES = 33  # signature (8) + IHDR length, type and body (25): all png_problem reads


def shown(name: str) -> str:
    """``name`` safe to print on a terminal: control and other unprintable characters escaped
    as Python writes them (``\\x1b``, ``\\n``), everything else as it is."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def read_member(path: Path) -> bytes:
    """The bytes of one image file of the tree, read as a tar member is: a regular file (never
    through a symbolic link, a FIFO or device refused without blocking), at most
    ``MAX_MEMBER_BYTES``, its PNG header checked before the rest is read. A
    :class:`FormatError` naming the file otherwise."""
    try:
        fh = open_regular(path, follow_links=False)
    except OSError as exc:
        if os.path.islink(path):
            kind = "a symbolic link (not followed)"
        else:
            kind = "not a regular file" if exc.errno is None else str(exc)
        raise FormatError(f"{shown(str(path))}: refused: {kind}") from exc
    with fh:
        st = os.fstat(fh.fileno())
        if st.st_size > MAX_MEMBER_BYTES:
            raise FormatError(
                f"{shown(str(path))}: refused: {st.st_size} bytes, far more than a 64x64 PNG "
                f"(at most {MAX_MEMBER_BYTES})"
            )
        head = fh.read(PNG_HEADER_BYTES)
        problem = png_problem(head, (SIDE, SIDE))
        if problem:
            raise FormatError(f"{shown(str(path))}: expected a 64x64 grayscale PNG: {problem}")
        data = head + fh.read(MAX_MEMBER_BYTES + 1 - len(head))
    if len(data) > MAX_MEMBER_BYTES:  # it grew after the check
        raise FormatError(f"{shown(str(path))}: refused: more than {MAX_MEMBER_BYTES} bytes")
    return data


def decode_member(path: Path) -> np.ndarray:
    """One image of the tree (read by :func:`read_member`) as a 64x64 uint8 array."""
    from PIL import Image

    data = read_member(path)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.size == (SIDE, SIDE) and im.mode == "L":
                return np.asarray(im, dtype=np.uint8)
            problem = f"a {im.size[0]}x{im.size[1]} image of mode {im.mode}"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        problem = f"an undecodable PNG ({exc})"
    raise FormatError(f"{shown(str(path))}: expected a 64x64 8-bit grayscale PNG, found {problem}")


@dataclass
class Listing:
    """The images of a tree, classes in numeric codepoint order, names sorted in each class."""

    tree: Path
    folders: list[str]  # class folder names as on disk
    codepoints: list[int]
    names: list[list[str]]
    fingerprint: str  # of (path, size, mtime) of every image: changes when the source does
    stamps: list[str] = field(default_factory=list)  # the same, one per class
    artefacts: list[str] = field(default_factory=list)  # "U+XXXX/<name>" set aside as copies
    digest_checked: bool = False  # every image checked against the shipped digest

    @property
    def counts(self) -> list[int]:
        return [len(n) for n in self.names]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def relpaths(self) -> list[str]:
        """Every image as ``kkanji2/U+XXXX/<name>.png``, in cache order."""
        return [f"{TREE_NAME}/{f}/{n}" for f, names in zip(self.folders, self.names) for n in names]


# The (tree, artefacts) whose copy artefacts this process has already reported.
_TOLD: set[tuple[str, tuple[str, ...]]] = set()


def scan_tree(tree: Path, verify: bool) -> Listing:
    """List and fingerprint the tree (stat only; only nominated copy artefacts and their
    siblings are read); set the artefacts aside; check its counts."""
    unexpected: list[str] = []
    codepoints, folders = _class_folders(tree, unexpected)
    names: list[list[str]] = []
    stamps: list[str] = []
    artefacts: list[str] = []
    digest = hashlib.sha256(f"kkanji-cache-v{CACHE_VERSION}\n".encode())
    for folder in folders:
        stats = _png_stats(tree, folder, unexpected)
        copies = _copy_artefacts(tree / folder, [s[0] for s in stats])
        artefacts += [f"{folder}/{n}" for n in sorted(copies)]
        # The tar's name rule: any other name is no image of the set.
        unexpected += [f"{folder}/{shown(s[0])}" for s in stats
                       if s[0] not in copies and not NAME_RE.fullmatch(s[0])]  # fmt: skip
        stats = [s for s in stats if s[0] not in copies and NAME_RE.fullmatch(s[0])]
        names.append([s[0] for s in stats])
        text = "".join(f"{folder}/{n}\t{size}\t{mtime}\n" for n, size, mtime in stats).encode()
        digest.update(text)
        stamps.append(hashlib.sha256(text).hexdigest())
    keep = [i for i, n in enumerate(names) if n]  # an empty folder is no class
    listing = Listing(
        tree,
        [folders[i] for i in keep],
        [codepoints[i] for i in keep],
        [names[i] for i in keep],
        digest.hexdigest(),
        [stamps[i] for i in keep],
        artefacts,
    )
    told = (str(tree), tuple(artefacts))
    if artefacts and told not in _TOLD:  # once per process: a script builds several splits
        _TOLD.add(told)
        say(
            f"KKanji: set aside {len(artefacts)} copy artefacts in {shown(str(tree))}: files "
            "named like <name>(1).png or '<name> copy.png' holding the same bytes as <name>.png "
            f"beside them, as copy and upload tools leave them (e.g. {shown(artefacts[0])})"
        )
    _check_listing(listing, unexpected, verify)
    return listing


def _class_folders(tree: Path, unexpected: list[str]) -> tuple[list[int], list[str]]:
    """The class folders of ``tree`` as (codepoints, folder names), in codepoint order; any
    other entry not hidden (a symbolic link to a folder included: never followed) is added to
    ``unexpected``."""
    classes: dict[int, str] = {}
    with os.scandir(tree) as it:
        entries = list(it)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        cp = class_codepoint(entry.name) if entry.is_dir(follow_symlinks=False) else None
        if cp is None:
            link = " (a symbolic link, not followed)" if entry.is_symlink() else ""
            unexpected.append(shown(entry.name) + link)
        elif cp in classes:
            raise DataFilesError(
                f"{shown(str(tree))}: folders {classes[cp]!r} and {entry.name!r} name the "
                "same codepoint"
            )
        else:
            classes[cp] = entry.name
    codepoints = sorted(classes)
    return codepoints, [classes[cp] for cp in codepoints]


def _png_stats(tree: Path, folder: str, unexpected: list[str]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of each PNG of one class folder, sorted by name: regular files of
    at most ``MAX_MEMBER_BYTES`` only. Any other entry not hidden (a link, a FIFO, a folder, a
    file far too large for an image) is added to ``unexpected``, never opened."""
    stats = []
    with os.scandir(tree / folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                unexpected.append(f"{folder}/{shown(entry.name)} (a symbolic link, not followed)")
                continue
            if not (entry.name.endswith(".png") and entry.is_file(follow_symlinks=False)):
                unexpected.append(f"{folder}/{shown(entry.name)}")
                continue
            st = entry.stat(follow_symlinks=False)
            if st.st_size > MAX_MEMBER_BYTES:
                unexpected.append(
                    f"{folder}/{shown(entry.name)} ({st.st_size} bytes, far more than a 64x64 PNG)"
                )
                continue
            stats.append((entry.name, st.st_size, st.st_mtime_ns))
    return sorted(stats)


def _copy_artefacts(folder: Path, names: list[str]) -> set[str]:
    """The names in ``names`` that a copy tool made: named like a copy of a sibling that is
    there, and holding exactly its bytes."""
    present = set(names)
    found = set()
    for name in names:
        m = ARTEFACT_RE.fullmatch(name)
        sibling = f"{m.group('stem')}.png" if m else None
        if sibling is None or sibling not in present or sibling == name:
            continue
        try:
            if read_member(folder / name) == read_member(folder / sibling):
                found.add(name)
        except FormatError:
            continue  # not a good image: it stays, and is reported like any other
    return found


def _check_listing(listing: Listing, unexpected: list[str], verify: bool) -> None:
    """Refuse a tree with no image; when verifying, one with unexpected entries or other
    than the full counts (else warn about them)."""
    tree = shown(str(listing.tree))
    n_classes, n_images = expected()
    found = (len(listing.codepoints), listing.total)
    if listing.total == 0:
        raise DataFilesError(f"{tree} holds no image (expected {TREE_NAME}/U+XXXX/<name>.png)")
    shown_entries = ", ".join(unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
    if verify and (unexpected or found != (n_classes, n_images)):
        why = f"unexpected entries ({shown_entries}); " if unexpected else ""
        raise DataFilesError(
            f"KKanji: {tree} holds {why}{found[0]} classes and {found[1]} images; the full "
            f"Kuzushiji-Kanji has {n_classes} and {n_images}. Delete {TREE_NAME}/ (and "
            f"{TAR_NAME} if it came from there) and download again, or pass verify=False to "
            "use a subset."
        )
    if unexpected:
        warn(f"KKanji: ignoring unexpected entries in {tree}: {shown_entries}")
    if found != (n_classes, n_images):
        warn(
            f"KKanji: verify=False: {tree} holds {found[0]} classes and {found[1]} images, not "
            f"the full {n_classes} and {n_images}; using it as it is."
        )
