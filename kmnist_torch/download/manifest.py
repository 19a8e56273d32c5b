"""A derived root's manifest: the record a root written by the package itself (a re-split, a
subset) carries, ``<Folder>/raw/kmnist_torch-derived.json``. It says where the images came from,
how they were cut, and each file's size and sha256; such a root is verified against it instead
of the catalog, as strictly (sizes and sha256), and never downloaded into. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .._io import HashRecord, hash_file, write_json
from ..errors import DataFilesError

MANIFEST_NAME = "kmnist_torch-derived.json"
KIND = "kmnist_torch derived root"
VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Manifest:
    """What a derived root holds: its dataset, origin, how it was made, each file's
    (size, sha256) and each split's number of images."""

    path: Path
    dataset: str
    origin: str
    how: str
    files: dict[str, tuple[int, str]]
    splits: dict[str, int]

    def describe(self) -> str:
        """``derived from <origin> (<how>)``, as the commands say it."""
        return f"derived from {self.origin} ({self.how})"


def manifest_path(folder: Path) -> Path:
    """Where the manifest of the raw folder ``folder`` is (present or not)."""
    return Path(folder) / MANIFEST_NAME


def _malformed(path: Path, why: str) -> DataFilesError:
    return DataFilesError(
        f"{path} is not a valid derived-root manifest ({why}). It was not written by this "
        "package, or was edited: write the root again (python -m kmnist_torch resplit ... or "
        "subset ...) into a new --root, or delete this file and the files it lists."
    )


def _files(path: Path, doc: dict) -> dict[str, tuple[int, str]]:
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise _malformed(path, "'files' must map file names to their size and sha256")
    out: dict[str, tuple[int, str]] = {}
    for name, entry in files.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == MANIFEST_NAME:
            raise _malformed(path, f"bad file name {name!r}")
        size = entry.get("size") if isinstance(entry, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not isinstance(sha, str):
            raise _malformed(path, f"{name}: needs a whole 'size' and a 'sha256'")
        if not _SHA256.fullmatch(sha):
            raise _malformed(path, f"{name}: sha256 {sha[:80]!r} is not 64 hex digits")
        out[name] = (size, sha)
    return out


def read_manifest(folder: Path, dataset: str | None = None) -> Manifest | None:
    """The manifest in ``folder``, None when there is none.

    Raises :class:`DataFilesError` (one message, saying what is wrong) when the file is there
    but is not a manifest this package wrote, or names another dataset than ``dataset``."""
    path = manifest_path(folder)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise _malformed(path, "not a regular file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _malformed(path, f"not readable JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise _malformed(path, f"'kind' must be {KIND!r}")
    if doc.get("version") != VERSION:
        raise _malformed(path, f"version {doc.get('version')!r}, this package reads {VERSION}")
    for key in ("dataset", "origin", "how"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise _malformed(path, f"'{key}' must be a non-empty string")
    if dataset is not None and doc["dataset"] != dataset:
        raise _malformed(path, f"it describes {doc['dataset']!r}, this folder holds {dataset!r}")
    splits = doc.get("splits")
    if not isinstance(splits, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in splits.items()
    ):
        raise _malformed(path, "'splits' must map split names to image counts")
    return Manifest(path, doc["dataset"], doc["origin"], doc["how"], _files(path, doc), splits)


def write_manifest(
    folder: Path, dataset: str, origin: str, how: str, names: list[str], splits: dict[str, int]
) -> Manifest:
    """Hash ``names`` (files in ``folder``) and write the manifest beside them, atomically."""
    folder = Path(folder)
    record = HashRecord(folder)
    files = {}
    for name in names:
        md5, sha = hash_file(folder / name)
        record.remember(folder / name, md5, sha)
        files[name] = {"size": (folder / name).stat().st_size, "sha256": sha}
    doc = {"kind": KIND, "version": VERSION, "dataset": dataset, "origin": origin, "how": how,
           "splits": splits, "files": files}  # fmt: skip
    write_json(manifest_path(folder), doc)
    return read_manifest(folder)


def file_problem(
    manifest: Manifest, folder: Path, name: str, record: HashRecord | None = None,
    full: bool = False,
) -> str | None:  # fmt: skip
    """Why ``folder/name`` is not the file the manifest lists, in words; None when it is.
    ``full`` rehashes every byte (the ``verify`` command); else a hash remembered by size and
    mtime is reused, as for the catalog's files."""
    path = Path(folder) / name
    if name not in manifest.files:
        return f"not listed in {manifest.path.name}"
    size, sha = manifest.files[name]
    if path.is_symlink() or not path.is_file():
        return "missing" if not path.is_symlink() else "a symbolic link, not a file"
    if path.stat().st_size != size:
        return (f"changed after the manifest was written: {path.stat().st_size} bytes, the "
                f"manifest says {size}")  # fmt: skip
    if full:
        md5, got = hash_file(path)
        if record is not None:
            record.remember(path, md5, got)
    else:
        got = (record or HashRecord(path.parent)).hashes(path)[1]
    if got != sha:
        return f"changed after the manifest was written: sha256 {got}, the manifest says {sha}"
    return None
