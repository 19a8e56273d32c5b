"""File helpers used everywhere the package writes: atomic writes, a per-folder lock, and the
record of hashes already computed. Torch-free, so the download layer and the CLI's ``available``
and ``info`` stay quick to start.

Each helper exists once; the datasets, KKanji, the trainer and the harness call these.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Union

from .errors import LockTimeout, WriteError
from .settings import lock_timeout, say

CHUNK = 1 << 20
RECORD_NAME = ".kmnist_torch-verified.json"
TMP_SUFFIX = ".tmp"

Payload = Union[bytes, str, Callable[[BinaryIO], Any]]


def _tmp_path(path: Path) -> Path:
    # Hidden, per process: two writers never share a temporary, and a listing of the folder
    # (the KKanji tree scan, a user's ls) does not show half-written files.
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def sweep_temporaries(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Remove the temporaries :func:`atomic_write` names ``.<name>.<pid>.tmp``, for each of
    ``names``, whose writer is not this process. Call it holding the folder's lock, so that
    no live writer's are among them: each is what a dead (``kill -9``) writer left. Links are
    removed, never followed. Returns the names removed."""
    removed = []
    wanted = re.compile(
        r"\.(" + "|".join(map(re.escape, names)) + r")\.(\d+)" + re.escape(TMP_SUFFIX)
    )
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = wanted.fullmatch(entry.name)
            if match and int(match[2]) != os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def atomic_write(path: str | os.PathLike, payload: Payload, fsync: bool = True) -> None:
    """Write ``payload`` (bytes, text as UTF-8, or a function given the open binary file) to
    ``path`` through a temporary file in the same folder renamed into place, so a crash leaves
    the old file or the new one, never half of one. The temporary is created exclusively and
    never through a symbolic link, and removed whatever happens.

    Raises:
        WriteError: the write failed because the disk or quota is full, the file-size limit
            was reached or the disk failed, whether ``payload`` saw the ``OSError`` itself or
            only what it became (``torch.save`` turns it into ``RuntimeError: unexpected
            pos``). The previous file at ``path``, if any, is untouched.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a killed process of the same pid
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
        with os.fdopen(fd, "wb") as fh:
            if callable(payload):
                payload(fh)
            else:
                fh.write(payload.encode("utf-8") if isinstance(payload, str) else payload)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        cause = failed_write(exc)
        if cause is None:
            raise
        raise write_error(path, cause) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# errno -> (what it means, what to do): the failures of a write itself, not of its path.
_WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full", "free space there (or write elsewhere)"),
    getattr(errno, "EDQUOT", -1): ("the disk quota is exceeded", "free space within the quota"),
    errno.EFBIG: (
        "the file would exceed the file-size limit",
        "raise the limit (ulimit -f) or write elsewhere",
    ),
    errno.EIO: ("the disk reported an I/O error", "check the disk (dmesg)"),
}


def failed_write(exc: BaseException) -> OSError | None:
    """The ``OSError`` that says a write failed for want of space, quota or a working disk
    (ENOSPC, EDQUOT, EFBIG, EIO), found in ``exc`` or what it was raised from or during (a
    library may wrap it: torch's ``unexpected pos``); None if there is none."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
            return e
        todo += [e.__cause__, e.__context__]
    return None


def write_error(path: str | os.PathLike, cause: OSError, what: str = "") -> WriteError:
    """The one-line :class:`WriteError` of a failed write of ``path``: the file, the cause,
    what is kept (the previous file, or nothing) and what to do. ``what`` adds a clause (how
    much room the file needs)."""
    path = Path(path)
    meaning, action = _WRITE_FAILURES.get(cause.errno, (cause.strerror or str(cause), "fix it"))
    name = errno.errorcode.get(cause.errno, str(cause.errno))
    kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
    err = WriteError(
        f"cannot write {path}: {meaning} ({name}){what}; {kept}. "
        f"{action[0].upper()}{action[1:]}, then run the same command again."
    )
    err.errno = cause.errno
    return err


def write_json(path: str | os.PathLike, doc: Any, indent: int | None = 1) -> None:
    """``doc`` as JSON (UTF-8, characters kept as they are), written atomically."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    atomic_write(path, text + "\n")


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symbolic link at ``path``: a link planted there (in a
    shared, writable folder) is removed and the open tried again, so nothing outside the folder
    is ever opened through it."""
    for _ in range(3):
        try:
            return os.open(path, flags | NOFOLLOW, mode)
        except OSError:
            if not _is_link(path):
                raise
            os.unlink(path)  # a planted link: remove it, never follow it
    raise OSError(f"{path} keeps being replaced by a symbolic link; refusing to open it")


def _is_link(path: Path) -> bool:
    try:
        return os.path.islink(path)
    except OSError:
        return False


# --------------------------------------------- reading what came from outside: regular files only


def _kind(mode: int) -> str | None:
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in kinds if test(mode)), "not a file")


def input_problem(path: str | os.PathLike, max_bytes: int | None = None) -> str | None:
    """Why ``path`` cannot be read as an input file, or None: learnt from ``stat`` alone, so a
    FIFO, a device or a socket is refused without being opened (opening one can block for
    ever). A link to a regular file is read like the file."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    kind = _kind(st.st_mode)
    if kind is not None:
        return f"{kind}, not a regular file"
    if max_bytes is not None and st.st_size > max_bytes:
        return f"{st.st_size:,} bytes, more than the {max_bytes:,} accepted"
    return None


def open_regular(path: str | os.PathLike, follow_links: bool = True) -> BinaryIO:
    """``path`` open for reading, checked on the open file (what is read is what was checked):
    opened without blocking (a FIFO, even one put there after :func:`input_problem` looked,
    never hangs the reader) and refused unless it is a regular file; ``follow_links=False``
    refuses a symbolic link at ``path`` without opening what it points to.

    Raises:
        OSError: from ``os.open`` (a link not followed is ``ELOOP``), or, with no ``errno``
            and a message saying what it is, for anything but a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags if follow_links else flags | NOFOLLOW)
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise OSError(f"{path}: {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | os.PathLike, max_bytes: int, error: Callable[[str], Exception] = ValueError
) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes`` (checked before it is
    opened, and again while reading, for a file that grows); anything else raises ``error``
    with one line naming the file and the problem."""
    problem = input_problem(path, max_bytes)
    if problem is None:
        try:
            with open_regular(path) as fh:
                data = fh.read(max_bytes + 1)
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        else:
            if len(data) <= max_bytes:
                return data
            problem = f"more than the {max_bytes:,} bytes accepted"
    raise error(f"{path}: {problem}")


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike,
    name: str = ".kmnist_torch.lock",
    timeout: float | None = None,
    what: str = "working",
) -> Iterator[None]:
    """Hold an exclusive, inter-process lock on ``folder`` (a file ``name`` in it), creating the
    folder if needed. A second process says once on stderr that it waits, then finds the work
    already done; after ``timeout`` seconds (default ``$KMNIST_TORCH_LOCK_TIMEOUT``, else 3600)
    it gives up with :class:`LockTimeout`. The lock file is opened without following links and
    never truncated."""
    folder = Path(folder)
    timeout = lock_timeout() if timeout is None else timeout
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    try:
        import fcntl
    except ImportError:  # Windows: filelock's msvcrt lock (it has no symlinks to fear there)
        from filelock import FileLock, Timeout

        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise LockTimeout(_lock_message(path, timeout, what)) from exc
        try:
            yield
        finally:
            lock.release()
        return
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    say(
                        f"another process is {what} in {folder} (it holds {path}); waiting "
                        f"up to {timeout:g} s ($KMNIST_TORCH_LOCK_TIMEOUT)"
                    )
                    said = True
                if time.monotonic() >= deadline:
                    raise LockTimeout(_lock_message(path, timeout, what)) from None
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_message(path: Path, timeout: float, what: str) -> str:
    return (
        f"gave up after waiting {timeout:g} s for another process {what} in {path.parent} "
        f"(it holds {path}). If no other process is running, its lock is stale only in name: "
        "run again; to wait longer set $KMNIST_TORCH_LOCK_TIMEOUT (seconds)."
    )


@contextlib.contextmanager
def folder_lock_if_writable(
    folder: str | os.PathLike, name: str = ".kmnist_torch.lock", timeout: float | None = None
):
    """:func:`folder_lock`, or no lock where the folder is read-only (a shared copy prepared by
    someone else: nothing could be written there anyway)."""
    folder = Path(folder)
    try:
        cm = folder_lock(folder, name, timeout)
        cm.__enter__()
    except (PermissionError, OSError) as exc:
        if isinstance(exc, LockTimeout):
            raise
        yield
        return
    try:
        yield
    except BaseException:
        if not cm.__exit__(*sys.exc_info()):
            raise
    else:
        cm.__exit__(None, None, None)


def hash_file(path: str | os.PathLike) -> tuple[str, str]:
    """The md5 and sha256 hex digests of a file, read once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime in ns) of a file: what says it may have changed since it was hashed."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def unchanged(path: str | os.PathLike, entry: dict) -> bool:
    """Whether ``path`` has the size and mtime recorded in ``entry`` (so its recorded hashes
    still hold, short of someone restoring both after changing the bytes)."""
    size, mtime = stamp(path)
    return entry.get("size") == size and entry.get("mtime_ns") == mtime


class HashRecord:
    """Remembers the hashes of files in one folder, keyed by size and mtime, so a file is
    hashed once and later loads stay fast. Best effort: a damaged record is treated as empty
    (everything is hashed again), and a read-only folder just means hashing again next time."""

    def __init__(self, folder: str | os.PathLike, name: str = RECORD_NAME):
        self.path = Path(folder) / name
        self.entries: dict[str, dict] = {}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return
        if isinstance(loaded, dict):
            self.entries = {k: v for k, v in loaded.items() if _valid_entry(v)}

    def lookup(self, path: Path) -> dict | None:
        """What is recorded of ``path``, if the file is unchanged since (same size and mtime)."""
        entry = self.entries.get(path.name)
        return entry if entry is not None and unchanged(path, entry) else None

    def hashes(self, path: Path) -> tuple[str, str]:
        """md5 and sha256 of ``path``: from the record if the file is unchanged, else computed
        (and remembered)."""
        entry = self.lookup(path)
        if entry is not None:
            return entry["md5"], entry["sha256"]
        md5, sha = hash_file(path)
        self.remember(path, md5, sha)
        return md5, sha

    def remember(self, path: Path, md5: str, sha256: str, **extra: Any) -> None:
        """Record the hashes of ``path`` as it is now (and anything else worth keeping)."""
        size, mtime = stamp(path)
        self.entries[path.name] = {
            "size": size,
            "mtime_ns": mtime,
            "md5": md5,
            "sha256": sha256,
            **extra,
        }
        self.save()

    def forget(self, name: str) -> None:
        """Drop what is recorded of a file name."""
        if self.entries.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        """Write the record atomically; silently skipped where the folder is read-only."""
        with contextlib.suppress(OSError):
            atomic_write(self.path, json.dumps(self.entries, indent=1, sort_keys=True), False)


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("mtime_ns"), int)
        and isinstance(entry.get("md5"), str)
        and isinstance(entry.get("sha256"), str)
    )


# ------------------------------------------------------- a command line's first seconds

# The command lines (``python -m`` these), each ending through ``_args.run_main``.
COMMANDS = ("kmnist_torch", "kmnist_torch.__main__", "kmnist_torch.train",
            "kmnist_torch.reproduce", "kmnist_torch.evaluate", "kmnist_torch.predict",
            "kmnist_torch.export")  # fmt: skip
_held: set[int] = set()  # the signals quiet_start holds back


def quiet_start() -> None:
    """In ``python -m kmnist_torch...`` (called as the package is imported, before the command
    imports torch): hold Ctrl-C and SIGTERM back (blocked) until the command has set its own
    handlers, which then take them as ever: one line, exit 128 + the signal (130, 143), not
    Python's ``KeyboardInterrupt`` traceback from inside an import (nor, for SIGTERM, a death
    with no word). Nothing has been written by then. A signal ignored from the start (a
    background job's Ctrl-C) stays so; anything else importing the package is left alone."""
    argv, orig = sys.argv, getattr(sys, "orig_argv", [])
    if argv[:1] != ["-m"] or len(orig) <= len(argv) or orig[-len(argv)] not in COMMANDS:
        return  # not `python ... -m <one of ours> ARGS`
    if threading.current_thread() is not threading.main_thread():
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    held = {s for s, default in defaults.items() if signal.getsignal(s) is default}
    if held and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        _held.update(held)


def started() -> None:
    """The command has set its handlers: let the signals :func:`quiet_start` held back
    through (one that came meanwhile is taken now)."""
    if _held and threading.current_thread() is threading.main_thread():
        held = set(_held)
        _held.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
