"""The shipped digest of the full Kuzushiji-Kanji tree, and checking a tree against it.

No checksum of ``kkanji.tar`` is published, so the package ships the content instead
(``kkanji2.digest.gz``, package data): for each class folder ``U+XXXX``, its image count and
the sha256 of ``"<file name>\\t<sha256 of the file>\\n"`` over its images in sorted name order;
and one sha256 over ``"U+XXXX\\t<count>\\t<class sha256>\\n"`` of every class in codepoint
order. A tree from the tar or from any copy is checked image by image against it, and a
mismatch is pinned to its class. What was checked is remembered per class in
``.kkanji2-verified.json`` beside the tree, keyed by the names, sizes and mtimes of its files,
so a later load hashes only the classes that changed since.

``benchmarks/kkanji_digest.py TREE OUT`` writes the digest of a tree (how the shipped one was
made, from the public copy of the full tree)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..._io import atomic_write
from ...errors import DataFilesError
from ...settings import Progress
from .layout import TREE_NAME, expected
from .tree import Listing, read_member, shown

DIGEST_PATH = Path(__file__).with_name("kkanji2.digest.gz")
VERIFIED_NAME = ".kkanji2-verified.json"
HEADER = "# kkanji2 digest v1: U+XXXX <tab> images <tab> sha256 of '<name>\\t<sha256>\\n' lines"


@dataclass
class Digest:
    classes: dict[str, tuple[int, str]]  # folder -> (images, class sha256)
    sha256: str  # over the classes

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.classes.values())


def overall(classes: dict[str, tuple[int, str]]) -> str:
    """The one sha256 over the classes (in codepoint order)."""
    order = sorted(classes, key=lambda f: int(f[2:], 16))
    text = "".join(f"{f}\t{classes[f][0]}\t{classes[f][1]}\n" for f in order)
    return hashlib.sha256(text.encode()).hexdigest()


def class_digest(folder: Path, names: list[str]) -> str:
    """The sha256 of one class: over its sorted (file name, file sha256) lines."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\t{hashlib.sha256(read_member(folder / name)).hexdigest()}\n".encode())
    return h.hexdigest()


def load(path: Path | None = None) -> Digest:
    """The digest stored at ``path`` (the shipped one by default), checked against its own
    overall sha256."""
    path = DIGEST_PATH if path is None else path
    lines = gzip.decompress(path.read_bytes()).decode("ascii").splitlines()
    classes = {}
    for line in lines[2:]:
        folder, n, sha = line.split("\t")
        classes[folder] = (int(n), sha)
    sha = lines[1].split()[-1]
    if overall(classes) != sha:
        raise DataFilesError(f"{path}: damaged (its classes do not give its sha256); reinstall")
    return Digest(classes, sha)


def compute(listing: Listing) -> Digest:
    """The digest of a listed tree (every image read and hashed)."""
    bar = Progress("KKanji: hashing the images", listing.total, "image")
    classes = {}
    try:
        for folder, names in zip(listing.folders, listing.names):
            classes[folder] = (len(names), class_digest(listing.tree / folder, names))
            bar.update(len(names))
    finally:
        bar.close()
    return Digest(classes, overall(classes))


def write(digest: Digest, out: Path) -> None:
    """Store ``digest`` compactly (gzip, no timestamp: the same tree gives the same bytes)."""
    order = sorted(digest.classes, key=lambda f: int(f[2:], 16))
    text = f"{HEADER}\n# classes {len(order)} images {digest.total} sha256 {digest.sha256}\n"
    text += "".join(f"{f}\t{digest.classes[f][0]}\t{digest.classes[f][1]}\n" for f in order)
    atomic_write(out, gzip.compress(text.encode("ascii"), 9, mtime=0))


def applies() -> bool:
    """Whether the shipped digest describes the full dataset the catalog names (it does,
    unless a test or a future catalog changed the counts)."""
    n_classes, n_images = expected()
    return DIGEST_PATH.is_file() and _shipped_counts() == (n_classes, n_images)


def _shipped_counts() -> tuple[int, int]:
    d = load()
    return len(d.classes), d.total


def check(folder: Path, listing: Listing, digest: Digest | None = None) -> None:
    """Check every image of ``listing`` against ``digest`` (the shipped one by default);
    classes unchanged since they were last checked here are not hashed again. A
    :class:`DataFilesError` naming each class that differs."""
    digest = load() if digest is None else digest
    record_path = folder / VERIFIED_NAME
    done = _read_record(record_path, digest.sha256)
    todo = [i for i, f in enumerate(listing.folders) if done.get(f) != listing.stamps[i]]
    bar = Progress("KKanji: checking the images against the shipped digest",
                   sum(len(listing.names[i]) for i in todo), "image")  # fmt: skip
    bad: list[str] = []
    try:
        for i in todo:
            folder_name, names = listing.folders[i], listing.names[i]
            want = digest.classes.get(folder_name)
            got = (len(names), class_digest(listing.tree / folder_name, names))
            bar.update(len(names))
            if want == got:
                done[folder_name] = listing.stamps[i]
            else:
                bad.append(_why(folder_name, want, got))
    finally:
        bar.close()
    missing = sorted(set(digest.classes) - set(listing.folders))
    bad += [f"{f}: missing ({digest.classes[f][0]} images expected)" for f in missing]
    if todo:
        with contextlib.suppress(OSError):  # a read-only root: checked again next time
            text = json.dumps({"digest": digest.sha256, "classes": done}, indent=0)
            atomic_write(record_path, text + "\n", fsync=False)
    if bad:
        shown_bad = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataFilesError(
            f"KKanji: {shown(str(listing.tree))} differs from the shipped digest of the full "
            f"Kuzushiji-Kanji in {len(bad)} classes: {shown_bad}. Delete {TREE_NAME}/ and "
            "extract or download it again, or pass verify=False to use it as it is."
        )
    listing.digest_checked = True


def _why(folder: str, want: tuple[int, str] | None, got: tuple[int, str]) -> str:
    if want is None:
        return f"{folder}: not a class of the full set"
    if want[0] != got[0]:
        return f"{folder}: {got[0]} images, expected {want[0]}"
    return f"{folder}: the images' names or bytes differ"


def _read_record(path: Path, digest_sha: str) -> dict[str, str]:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(rec, dict) or rec.get("digest") != digest_sha:
        return {}
    classes = rec.get("classes")
    if not isinstance(classes, dict):
        return {}
    return {k: v for k, v in classes.items() if isinstance(k, str) and isinstance(v, str)}
