"""Where files come from and where they go: the data root, the mirror bases and the settings a
user changes through the environment. Torch-free.

- ``$KMNIST_TORCH_ROOT``: the default data folder (else ``~/.cache/kmnist_torch``).
- ``$KMNIST_TORCH_MIRRORS``: base URLs tried in order before the official host.
- ``$KMNIST_TORCH_OFFICIAL=0``: never contact the official host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import stat
import warnings
from pathlib import Path

from .. import catalog
from .._io import HashRecord, folder_lock
from ..catalog import RemoteFile
from ..errors import DataFilesError, DownloadError, LockTimeout
from ..settings import FetchConfig, env_flag
from .fetch import Target, check, download
from .manifest import MANIFEST_NAME, manifest_path

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


def data_root(folder: Path) -> Path:
    """The data root a dataset's folder is in (``root/KMNIST/raw`` -> ``root``)."""
    return folder.parent.parent if folder.name == "raw" else folder.parent


def fix_command(name: str, folder: Path) -> str:
    """The one command that fetches a dataset's missing files (after setting a mirror, where no
    source is set), and for KMNIST the one that makes a training set without them (the
    re-split of the real test split, for offline and air-gapped machines)."""
    root, dataset = data_root(folder), name.lower()
    line = f"python -m kmnist_torch download {dataset} --root {root}"
    if not mirrors():
        line = f"set $KMNIST_TORCH_MIRRORS to a mirror, then {line}"
    if dataset == "kmnist":
        line += (f"; offline, without the official training files: python -m kmnist_torch "
                 f"resplit SOURCE_DIR --root {root}")  # fmt: skip
    return line


# A file that fails its check may be replaced without asking only when it is one of these: not
# there, or a known stale release. Anything else may be the user's own file, a symbolic link to
# their data included (never followed, so never read either): replaced only on an explicit
# repair or download.
def replaceable(problem: str) -> bool:
    """Whether a file with this problem (from :func:`check`) may be replaced unasked."""
    return problem == "missing" or problem.startswith("stale")


def _refusal(name: str, folder: Path, refused: list[tuple[Target, str]]) -> DataFilesError:
    """The error for present files that fail verification and were left as they are."""
    root, dataset = data_root(folder), name.lower()
    lines = [
        f"{name}: {len(refused)} file(s) in {folder} are not the official ones and were left "
        "as they are. Your own files (a re-split, a subset): pass --no-verify (verify=False); "
        "a symbolic link is never followed, so put the file itself there. To replace them: "
        f"python -m kmnist_torch verify {dataset} --root {root} --repair"
    ]
    lines += [f"- {t.dest.name}: {problem}" for t, problem in refused]
    return DataFilesError("\n".join(lines))


def _unusable(name: str, folder: Path, bad: list[Target], problems: dict, download: bool):
    """The error naming every file still not right: what is wrong, where it comes from."""
    if download:
        head = f"{name}: {len(bad)} file(s) to download into {folder}, but no download source"
    else:
        head = f"{name}: {len(bad)} file(s) missing or not usable in {folder}"
    lines = [f"{head}. Fix: {fix_command(name, folder)}", "Details:"]
    if download:
        lines.append(NO_SOURCE[0].upper() + NO_SOURCE[1:] + ".")
    for t in bad:  # extras (the class map) were not checked above: they are missing or bad
        lines.append(f"- {t.dest.name}: {problems.get(id(t)) or 'missing or not usable'}")
        lines.append(t.describe())
    if not download:
        lines.append("Pass download=True (or --download) to fetch them, or place the files "
                     "above by hand.")  # fmt: skip
    return DataFilesError("\n".join(lines))


def ensure_files(
    targets: list[Target],
    download_missing: bool,
    verify: bool = True,
    name: str = "the dataset",
    config: FetchConfig | None = None,
    extras: list[Target] = (),
    record: HashRecord | None = None,
    replace: bool = False,
) -> None:
    """Make sure every target is on disk and passes its checks; download what is missing or
    stale when ``download_missing``, all files of one call together or none (staged in the
    same folder, checked, then moved into place). Raises one :class:`DataFilesError` naming
    every file that is still not right, with its URLs, size, md5 and the path to put it at.

    A present file that fails verification for another reason (a user's own file) is never
    replaced unless ``replace`` (``verify --repair``, the ``download`` command): it is an
    error offering ``--no-verify`` and ``verify --repair``. A derived root (one with a
    manifest, :mod:`kmnist_torch.download.manifest`) is never downloaded into.

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
    if manifest_path(folder).exists():
        raise DataFilesError(
            f"{name}: {folder} is a derived root (it has {MANIFEST_NAME}): its files are not "
            "the official ones and nothing is downloaded into it. Download into another --root."
        )
    refused = [(t, problems[id(t)]) for t in bad if not replaceable(problems[id(t)])]
    if refused and not replace:
        raise _refusal(name, folder, refused)
    if download_missing:
        for t in extras:  # a user's own class map is left alone too
            problem = check(t, verify, record)
            if problem and (replace or replaceable(problem)):
                bad.append(t)
    if not download_missing or not mirrors():
        raise _unusable(name, folder, bad, problems, download_missing)
    _download_all(name, folder, bad, verify, config or FetchConfig(), record)


def _download_all(
    name: str, folder: Path, bad: list[Target], verify: bool, config: FetchConfig,
    record: HashRecord,
) -> None:  # fmt: skip
    """Download ``bad`` under the folder's lock, all or none; one error for what failed."""
    failures: list[str] = []
    # One lock per folder: a second process waits (bounded), then finds the files in place.
    try:
        with folder_lock(folder, DOWNLOAD_LOCK, what="downloading"):
            _download_bad(bad, verify, config, failures, record)
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
            f"{name}: download failed for {len(failures)} file(s); nothing in {folder} was "
            "changed. Set $KMNIST_TORCH_MIRRORS to a mirror, or fetch the files by hand:\n"
            + "\n".join(failures)
        )


STAGING = ".kmnist_torch-staging"


def _download_bad(
    bad: list[Target], verify: bool, config: FetchConfig, failures: list[str], record: HashRecord
) -> None:
    """Download each target still wrong (checked again: another process may have fixed it
    while we waited for the lock) into the staging folder beside them; when every one arrived
    and passed its checks, move them all into place, else leave the folder as it was and
    append a message per failure (a partial download stays in the staging folder, resumed by
    the next run)."""
    folder = bad[0].dest.parent
    # Read again under the lock (another process may have recorded files meanwhile), into the
    # caller's record, which goes on to record the copies it extracts.
    record.entries = HashRecord(folder).entries
    staging = _staging_folder(folder)
    staged: list[tuple[Path, Path, str, str]] = []
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
                          stacklevel=5)  # fmt: skip
        st = dataclasses.replace(t, dest=staging / t.dest.name)
        _adopt_partial(t.dest, st.dest)
        try:
            md5, sha = download(st, config)
        except DownloadError as exc:  # where to put the file by hand: its place, not staging
            failures.append(str(exc).replace(st.describe(), t.describe()))
            continue
        staged.append((st.dest, t.dest, md5, sha))
    try:
        if failures:
            return
        for src, dest, md5, sha in staged:
            os.replace(src, dest)  # replaces a link at dest itself, never its target
            record.remember(dest, md5, sha)
    finally:
        for src, *_ in staged:
            src.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            staging.rmdir()  # kept only while it holds a partial download to resume


def _staging_folder(folder: Path) -> Path:
    """The staging folder in ``folder``, a real directory: whatever else is at its name (a
    symbolic link, a file) is removed first, the link itself and never what it points to, so
    nothing is ever written, moved or deleted through it. Called under the folder's lock."""
    staging = folder / STAGING
    try:
        mode = os.lstat(staging).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISDIR(mode):
        try:
            staging.unlink()
        except OSError:
            if os.name != "nt":
                raise
            os.rmdir(staging)  # a Windows link to a folder: removed alone, never its files
        mode = None
    if mode is None:
        staging.mkdir()
    return staging


def _adopt_partial(dest: Path, staged: Path) -> None:
    """Move a partial download left beside ``dest`` (by an older release of the package) into
    the staging folder, so it is resumed rather than left behind."""
    part = dest.with_name(dest.name + ".part")
    if part.is_file() and not part.is_symlink() and not staged.with_name(part.name).exists():
        staged.parent.mkdir(parents=True, exist_ok=True)
        for p in (part, part.with_name(part.name + ".json")):
            with contextlib.suppress(OSError):
                os.replace(p, staged.with_name(p.name))
