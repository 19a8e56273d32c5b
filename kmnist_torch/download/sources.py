"""Where files come from and where they go: the data root, the mirror bases and the settings a
user changes through the environment. Torch-free.

- ``$KMNIST_TORCH_ROOT``: the default data folder (else ``~/.cache/kmnist_torch``).
- ``$KMNIST_TORCH_MIRRORS``: base URLs tried in order before the official host.
- ``$KMNIST_TORCH_OFFICIAL=0``: never contact the official host.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from pathlib import Path

from .. import catalog
from .._io import HashRecord, folder_lock
from ..catalog import RemoteFile
from ..errors import DataFilesError, DownloadError, LockTimeout
from ..settings import FetchConfig, env_flag
from .fetch import Target, check, download

DOWNLOAD_LOCK = ".download.lock"

NO_SOURCE = (
    "no download source: $KMNIST_TORCH_OFFICIAL=0 and $KMNIST_TORCH_MIRRORS is empty; set "
    "$KMNIST_TORCH_MIRRORS to a mirror or place the files by hand"
)


def default_root() -> Path:
    """``$KMNIST_TORCH_ROOT``, else ``~/.cache/kmnist_torch``."""
    env = os.environ.get("KMNIST_TORCH_ROOT")
    return Path(env).expanduser() if env else Path("~/.cache/kmnist_torch").expanduser()


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a path (``~`` expanded), or :func:`default_root` when None."""
    return Path(root).expanduser() if root is not None else default_root()


def mirrors(bases: tuple[str, ...] | None = None) -> list[str]:
    """Base URLs to try, in order: ``$KMNIST_TORCH_MIRRORS`` (commas or spaces), then the
    publisher's ``bases`` (default: the official Kuzushiji host), left out when
    ``$KMNIST_TORCH_OFFICIAL=0``, for sites that must not reach them. Each base has the official
    layout (``<base>/kmnist/<file>``, ``<base>/mnist/<file>`` ...).

    Empty when neither is set: files placed by hand still load; only a download then fails,
    with :data:`NO_SOURCE`."""
    found = [b for b in re.split(r"[,\s]+", os.environ.get("KMNIST_TORCH_MIRRORS", "")) if b]
    if env_flag("KMNIST_TORCH_OFFICIAL", True):
        found.extend(bases or (catalog.OFFICIAL_BASE,))
    out: list[str] = []
    for b in found:
        b = b if b.endswith("/") else b + "/"
        if b not in out:
            out.append(b)
    return out


def urls_for(remote: RemoteFile, bases: tuple[str, ...] | None = None) -> list[str]:
    """Every URL an official file can be fetched from, in the order they are tried."""
    return [base + remote.path for base in mirrors(bases)]


def target_for(
    remote: RemoteFile, folder: Path, bases: tuple[str, ...] | None = None, shown: bool = False
) -> Target:
    """Where an official file lives under ``folder`` and where it can be fetched from.
    ``shown=True``: for an error a user reads, where no source is configured the publisher's
    own URLs are listed all the same (they can be fetched by hand elsewhere)."""
    urls = urls_for(remote, bases)
    if shown and not urls:
        urls = [base + remote.path for base in bases or (catalog.OFFICIAL_BASE,)]
    return Target(
        dest=folder / remote.name,
        accept=functools.partial(magic_problem, name=remote.name),  # judged on the .part
        urls=urls,
        size=remote.size,
        md5=remote.md5,
        sha256=remote.sha256,
        stale_md5=dict(remote.stale_md5),
    )


# How each kind of official file begins: a download whose first bytes differ is not that file
# (an HTML error page, a truncated or foreign file), whatever the checksums say or skip.
MAGIC = {
    ".gz": (b"\x1f\x8b", "a gzip file"),
    ".npz": (b"PK\x03\x04", "an npz (zip) file"),
    ".csv": (b"index,codepoint,char", "a class map (index,codepoint,char)"),
}


def magic_problem(path: os.PathLike | str, name: str | None = None) -> str | None:
    """Why the file at ``path`` does not begin as its kind of official file must (by the
    suffix of ``name``, default ``path``'s own: .gz, .npz, .csv), or None; files of other
    kinds are not judged here."""
    path = Path(path)
    expected = MAGIC.get(Path(name or path.name).suffix)
    if expected is None:
        return None
    magic, kind = expected
    with open(path, "rb") as fh:
        head = fh.read(max(len(magic), 64))
    if head.startswith(magic):
        return None
    looks = "an HTML page" if head.lstrip()[:1] == b"<" else f"bytes {head[:8]!r}"
    return f"not {kind}: it begins with {looks}"


def ensure_files(
    targets: list[Target],
    download_missing: bool,
    verify: bool = True,
    name: str = "the dataset",
    config: FetchConfig | None = None,
    extras: list[Target] = (),
    record: HashRecord | None = None,
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
    record = record or HashRecord(folder)
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
    config = config or FetchConfig()  # a bad $KMNIST_TORCH_* value fails here, by name
    failures = []
    # One lock per folder: a second process waits (bounded), then finds the files in place.
    try:
        with folder_lock(folder, DOWNLOAD_LOCK, what="downloading"):
            _download_bad(bad, verify, config, failures)
    except LockTimeout as exc:
        raise DataFilesError(f"{name}: {exc}") from exc
    except OSError as exc:  # a read-only root, a root below a regular file...
        lines = [f"{name}: cannot download into {folder}: {exc.strerror or exc}. Choose a "
                 "writable root (root=..., --root or $KMNIST_TORCH_ROOT), or place these "
                 "files there by hand:"]  # fmt: skip
        lines += [t.describe() for t in bad]
        raise DataFilesError("\n".join(lines)) from exc
    if failures:
        raise DataFilesError(
            f"{name}: download failed for {len(failures)} file(s). Set $KMNIST_TORCH_MIRRORS "
            "to a mirror, or fetch the files by hand:\n" + "\n".join(failures)
        )


def _download_bad(
    bad: list[Target], verify: bool, config: FetchConfig, failures: list[str]
) -> None:
    """Download each target still wrong (checked again: another process may have fixed it
    while we waited for the lock); append a message per failure."""
    folder = bad[0].dest.parent
    record = HashRecord(folder)
    for t in bad:
        problem = check(t, verify, record)
        if problem is None:
            continue
        if not verify:  # users' own re-encodings: take what the mirror serves
            # Still bounded: at most twice the published size plus 1 MiB.
            cap = None if t.size is None else 2 * t.size + (1 << 20)
            t = dataclasses.replace(t, size=None, md5=None, sha256=None, stale_md5={},
                                    max_size=cap)  # fmt: skip
        elif problem.startswith("stale"):
            warnings.warn(f"{t.dest}: {problem}; replacing it with the current release",
                          stacklevel=4)  # fmt: skip
        try:
            md5, sha = download(t, config)
        except DownloadError as exc:
            failures.append(str(exc))
            continue
        record.remember(t.dest, md5, sha)
