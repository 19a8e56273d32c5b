"""One trainer per run folder: :class:`RunLock`, held by the run's writer (rank 0) from the
moment it opens the folder until the run ends, and the sweep of temporaries left by writers
that died (``kill -9``, a lost node) part-way through a write.

The lock is a file ``.kmnist_torch-run.lock`` holding ``pid host`` of its holder, locked with
``flock``: the kernel releases it when the holder dies, however it dies, so a folder left by a
dead run is taken over at once, while a live run (on this machine, or on another one sharing
the folder where the filesystem supports ``flock``) keeps it. Where ``flock`` is not available
the pid and host in the file decide: a holder on this machine whose process is gone is dead; one
on another machine counts as live.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from pathlib import Path

from .._io import open_nofollow
from ..errors import TrainError

LOCK_NAME = ".kmnist_torch-run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(text: str) -> tuple[int, str] | None:
    """``(pid, host)`` as a lock file holds them, or None for anything else."""
    match = re.fullmatch(r"(\d{1,10}) (\S{1,255})\n?", text)
    return (int(match[1]), match[2]) if match else None


class RunLock:
    """The lock on one run folder. :meth:`acquire` takes it or raises :class:`TrainError`
    naming the live run (its pid and host); :meth:`release` lets it go and removes the file."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def _read(self, fd: int) -> tuple[int, str] | None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return _holder(os.pread(fd, 300, 0).decode("ascii"))
        return None

    def _busy(self, holder: tuple[int, str] | None) -> TrainError:
        who = "another process" if holder is None else f"pid {holder[0]} on {holder[1]}"
        return TrainError(
            f"{self.path.parent} is in use by a live run ({who} holds {self.path}): wait for it "
            "to end, stop it (Ctrl-C or SIGTERM: it checkpoints), or pick another --out (a "
            "holder on another host that is gone: remove the lock file)"
        )

    def acquire(self) -> None:
        """Take the lock, or raise :class:`TrainError` when a live run holds it."""
        try:
            import fcntl
        except ImportError:  # Windows: the pid and host in the file decide
            fcntl = None
        for _ in range(5):
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
            try:
                if not self._lock(fd, fcntl):
                    raise self._busy(self._read(fd))
                # The holder before us may have removed the file between our open and our
                # lock: then we locked a file nobody else will open. Take the one at the path.
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self._take(fd)
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise TrainError(f"{self.path} keeps being replaced; is another run starting there?")

    def _lock(self, fd: int, fcntl) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError:  # no flock on this filesystem: the pid decides
                pass
        holder = self._read(fd)
        if holder is None or holder[0] == os.getpid():
            return True
        # Another host's holder cannot be checked from here: it counts as live.
        return holder[1] == socket.gethostname() and not _alive(holder[0])

    def _take(self, fd: int) -> None:
        before = self._read(fd)
        if before is not None and before[0] != os.getpid():
            print(
                f"{self.path.parent}: the run that used it (pid {before[0]} on {before[1]}) is "
                "gone; taking the folder over",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode("ascii"), 0)
        self.fd = fd

    def release(self) -> None:
        """Let the lock go (removing the file first, while it is still ours)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        os.close(self.fd)  # closing releases the flock
        self.fd = None
