"""The settings a user changes through the environment, read in one place: each value is
checked, and a bad one is an error naming the variable and the values it allows; and what
long steps print on stderr (:func:`say`, :class:`Progress`). Torch-free.

- ``KMNIST_TORCH_TIMEOUT``: seconds to wait for a connection and for each read (> 0, default 30).
- ``KMNIST_TORCH_RETRIES``: extra attempts per URL after a transient failure (whole number >= 0,
  default 3).
- ``KMNIST_TORCH_BACKOFF``: first back-off delay in seconds, doubled on each retry (>= 0,
  default 1).
- ``KMNIST_TORCH_MIN_RATE``: the slowest transfer accepted, in bytes/s (> 0, default 16384).
  Each attempt at a file has an overall deadline of ``GRACE + bytes / MIN_RATE`` covering the
  connection, status line, headers and body; past it that URL has failed.
- ``KMNIST_TORCH_GRACE``: the fixed seconds added to every deadline (>= 0, default 60).
- ``KMNIST_TORCH_MAX_BYTES``: the most bytes written for a file whose size is not known in
  advance (whole number > 0, default 1 GiB). A file of known size is never written past it.
- ``KMNIST_TORCH_LOCK_TIMEOUT``: seconds to wait for another process's lock (>= 0, default 3600).
- ``KMNIST_TORCH_OFFICIAL``: ``0`` (or no/false/off) never contacts the publishers' hosts
  (default 1; any other value is an error).
- ``KMNIST_TORCH_DECODE_WORKERS``: KKanji decoding processes (whole number >= 1, default: the
  usable cores).
- ``KMNIST_TORCH_PROGRESS_EVERY``: when stderr is not a terminal, the seconds between two plain
  progress lines of a long step (a training epoch, a test pass, the KKanji cache build) (from 0,
  a line after every step, to 3600; default 10). On a terminal tqdm draws a bar instead.

The data root and the mirrors are in :mod:`kmnist_torch.download.sources`.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

DEFAULT_MAX_BYTES = 1 << 30


def env_number(
    name: str,
    default: float,
    rule: str,
    integer: bool = False,
    default_text: str | None = None,
    kind: str | None = None,
    at_most: float | None = None,
) -> float:
    """``$name`` as a finite number obeying ``rule`` (``">0"``, ``">=0"``, ``">=1"`` ...) and
    no more than ``at_most`` (when given), else ``default`` when unset or empty; a ValueError
    naming the variable and the allowed values for anything else."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    op, bound = re.fullmatch(r"(>=?)(\d+)", rule).groups()
    kind = kind or ("a whole number" if integer else "a number")
    upper = "" if at_most is None else f" and <= {at_most:g}"
    allowed = f"{kind} {op} {bound}{upper} (default {default_text or f'{default:g}'})"
    try:
        out: float | None = int(value) if integer else float(value)
    except ValueError:
        out = None
    if (
        out is None
        or not math.isfinite(out)
        or (out < int(bound) if op == ">=" else out <= int(bound))
        or (at_most is not None and out > at_most)
    ):
        raise ValueError(f"${name}={value!r} is not allowed: use {allowed}")
    return out


_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


def env_flag(name: str, default: bool) -> bool:
    """``$name`` as yes or no (1/0, yes/no, true/false, on/off, any case), else ``default``
    when unset or empty; anything else is a ValueError, never a silent guess."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(
        f"${name}={os.environ[name]!r} is not allowed: use 1 or 0 (yes/no, true/false, on/off; "
        f"default {int(default)})"
    )


def say(message: str) -> None:
    """One line on stderr, terminal or not: what a download is doing and why."""
    print(f"kmnist_torch: {message}", file=sys.stderr, flush=True)


@dataclass
class FetchConfig:
    """Network settings and bounds; the defaults read ``$KMNIST_TORCH_TIMEOUT``, ``_RETRIES``,
    ``_BACKOFF``, ``_MIN_RATE``, ``_GRACE`` and ``_MAX_BYTES`` (see the module docstring)."""

    timeout: float = field(default_factory=lambda: env_number("KMNIST_TORCH_TIMEOUT", 30.0, ">0"))
    retries: int = field(
        default_factory=lambda: int(env_number("KMNIST_TORCH_RETRIES", 3, ">=0", True))
    )
    backoff: float = field(default_factory=lambda: env_number("KMNIST_TORCH_BACKOFF", 1.0, ">=0"))
    min_rate: float = field(
        default_factory=lambda: env_number("KMNIST_TORCH_MIN_RATE", 16384.0, ">0")
    )
    grace: float = field(default_factory=lambda: env_number("KMNIST_TORCH_GRACE", 60.0, ">=0"))
    max_bytes: int = field(
        default_factory=lambda: int(
            env_number("KMNIST_TORCH_MAX_BYTES", DEFAULT_MAX_BYTES, ">0", True, "1073741824")
        )
    )
    progress: bool | None = None  # None: only when stderr is a terminal
    log: Callable[[str], None] = say

    def __post_init__(self) -> None:
        for name, low in (("timeout", 0), ("min_rate", 0), ("max_bytes", 0)):
            if not getattr(self, name) > low:
                raise ValueError(f"FetchConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("retries", "backoff", "grace"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def deadline_for(self, n_bytes: int) -> float:
        """Seconds one attempt may take to move ``n_bytes``: ``grace + n_bytes / min_rate``."""
        return self.grace + n_bytes / self.min_rate


def lock_timeout() -> float:
    """``$KMNIST_TORCH_LOCK_TIMEOUT``: seconds to wait for another process's lock."""
    return env_number("KMNIST_TORCH_LOCK_TIMEOUT", 3600.0, ">=0", kind="a number of seconds")


def decode_workers() -> int:
    """``$KMNIST_TORCH_DECODE_WORKERS``, else the usable CPU cores."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        cores = max(1, os.cpu_count() or 1)
    value = env_number("KMNIST_TORCH_DECODE_WORKERS", cores, ">=1", True, "the usable CPU cores")
    return int(value)


def progress_every() -> float:
    """``$KMNIST_TORCH_PROGRESS_EVERY``: seconds between two plain progress lines."""
    return env_number(
        "KMNIST_TORCH_PROGRESS_EVERY", 10.0, ">=0", kind="a number of seconds", at_most=3600
    )


def _clock_text(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """How far a long step has got (a training epoch, a test pass, the KKanji cache build),
    told as it goes on stderr: tqdm's bar on a terminal; anywhere else (a CI log, ``nohup``, a
    notebook) one plain line, no carriage return, each time ``every`` seconds
    (``$KMNIST_TORCH_PROGRESS_EVERY``) have passed since the start or the last line::

        kmnist_torch: epoch 1/12: 40/100 steps (40%), 512 images/s, about 0:12 left

    A line is written when :meth:`update` is called, so a single step longer than ``every``
    shows up when it ends. ``enabled=False`` shows nothing (``None`` and ``True``: shown).
    ``clock`` and ``stream`` are for tests.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "step",
        initial: int = 0,
        enabled: bool | None = None,
        every: float | None = None,
        stream: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done, self.initial, self.images, self.note = initial, initial, 0, ""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled is not False
        self.every = progress_every() if every is None and self.enabled else (every or 0.0)
        self.clock = clock
        self.start = self.last = clock()
        self.bar = None
        if self.enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                            file=self.stream)  # fmt: skip

    def update(self, n: int = 1, images: int | None = None, note: str | None = None) -> None:
        """``n`` more units done, holding ``images`` images (default ``n``); ``note`` (the
        loss, say) is shown with the bar or the next line."""
        self.done += n
        self.images += n if images is None else images
        if note is not None:
            self.note = note
        if self.bar is not None:
            self.bar.update(n)
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
        elif self.enabled and self.clock() - self.last >= self.every:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last = self.clock()

    def counted(self, batches: Iterable[Any], scale: int = 1) -> Iterator[Any]:
        """The ``(images, targets)`` batches of ``batches``, each counted as one unit of
        ``len(targets) * scale`` images once it has been used."""
        for batch in batches:
            yield batch
            self.update(1, len(batch[1]) * scale)

    def line(self) -> str:
        """The plain progress line as things stand."""
        elapsed = max(self.clock() - self.start, 1e-9)
        units = self.done - self.initial
        plural = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")
        parts = [f"{self.done:,}/{self.total:,} {plural}"]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts.append(f"{self.images / elapsed:,.0f} images/s")
        if units > 0:
            parts.append(f"about {_clock_text((self.total - self.done) * elapsed / units)} left")
        if self.note:
            parts.append(self.note)
        return f"kmnist_torch: {self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        """Take the bar away (a plain line stays where it is)."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a file
        return False
