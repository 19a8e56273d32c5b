"""The settings a user changes through the environment, read in one place: each value is
checked against a finite range, and a bad one is a :class:`~kmnist_torch.errors.SettingError`,
one line naming the variable, the value and the range it allows; and what long steps print on
stderr (:func:`say`, :class:`Progress`). Torch-free.

- ``KMNIST_TORCH_TIMEOUT``: seconds to wait for a connection and for each read (> 0 and
  <= 86400, default 30).
- ``KMNIST_TORCH_RETRIES``: extra attempts per URL after a transient failure (whole number from
  0 to 100, default 3).
- ``KMNIST_TORCH_BACKOFF``: first back-off delay in seconds, doubled on each retry up to an
  hour (from 0 to 3600, default 1).
- ``KMNIST_TORCH_MIN_RATE``: the slowest transfer accepted, in bytes/s (from 1 to 10**12,
  default 16384). Each attempt at a file has an overall deadline of
  ``GRACE + bytes / MIN_RATE`` covering the connection, status line, headers and body; past it
  that URL has failed.
- ``KMNIST_TORCH_GRACE``: the fixed seconds added to every deadline (from 0 to 86400, default
  60).
- ``KMNIST_TORCH_MAX_BYTES``: the most bytes written for a file whose size is not known in
  advance (whole number from 1 to 2**33 = 8 GiB, default 1 GiB). A file of known size is never
  written past it.
- ``KMNIST_TORCH_LOCK_TIMEOUT``: seconds to wait for another process's lock (from 0 to 604800,
  a week; default 3600).
- ``KMNIST_TORCH_OFFICIAL``: ``0`` (or no/false/off) never contacts the publishers' hosts
  (default 1; any other value is an error).
- ``KMNIST_TORCH_DECODE_WORKERS``: KKanji decoding processes (whole number from 1 to 1024,
  default: the usable cores); never more than the usable cores nor the chunks of work.
- ``KMNIST_TORCH_TUNE_MALLOC``: ``0`` (or no/false/off) leaves glibc's malloc as the process
  found it; by default a CPU run tells it to keep freed memory for the next step
  (:func:`kmnist_torch.training.cpu.keep_freed_memory`; default 1; any other value is an
  error).
- ``KMNIST_TORCH_PROGRESS_EVERY``: when stderr is not a terminal, the seconds between two plain
  progress lines of a long step (a training epoch, a test pass, the KKanji cache build) (from 0,
  a line after every step, to 3600; default 10). On a terminal tqdm draws a bar instead.

The ranges keep every later use finite: the longest deadline (``GRACE + MAX_BYTES / MIN_RATE``,
about 8.6e9 s) still fits a timer, and no back-off wait is longer than an hour.

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

from .errors import SettingError

DEFAULT_MAX_BYTES = 1 << 30

# name: (lowest, whether the lowest itself is allowed, highest). Every setting has a finite
# range, so no later sum, product or timer overflows (``tests/test_fuzz.py`` checks the
# extremes together).
RANGES: dict[str, tuple[float, bool, float]] = {
    "KMNIST_TORCH_TIMEOUT": (0, False, 86400),
    "KMNIST_TORCH_RETRIES": (0, True, 100),
    "KMNIST_TORCH_BACKOFF": (0, True, 3600),
    "KMNIST_TORCH_MIN_RATE": (1, True, 10**12),
    "KMNIST_TORCH_GRACE": (0, True, 86400),
    "KMNIST_TORCH_MAX_BYTES": (1, True, 1 << 33),
    "KMNIST_TORCH_LOCK_TIMEOUT": (0, True, 604800),
    "KMNIST_TORCH_DECODE_WORKERS": (1, True, 1024),
    "KMNIST_TORCH_PROGRESS_EVERY": (0, True, 3600),
}
MAX_BACKOFF_WAIT = 3600.0  # the longest single wait between two retries, in seconds


def _num(x: float) -> str:
    """A bound as a person reads it: ``86400``, ``1000000000000``, ``0.5``."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _shown(value: str) -> str:
    """A value as given, quoted and escaped, cut to 60 characters (an error stays one line)."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:60] + f"... ({len(value)} characters)"


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
    no more than ``at_most`` (when given), else ``default`` when unset or empty; a
    :class:`SettingError` (a ``ValueError``) naming the variable, the value and the allowed
    range for anything else."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    op, bound_text = re.fullmatch(r"(>=?)(\d+(?:\.\d+)?)", rule).groups()
    bound = float(bound_text)
    kind = kind or ("a whole number" if integer else "a number")
    upper = "" if at_most is None else f" and <= {_num(at_most)}"
    allowed = f"{kind} {op} {_num(bound)}{upper} (default {default_text or _num(default)})"
    out: float | None = None
    if len(value) <= 1000:  # longer is no number a person meant (and slow to parse)
        try:
            out = int(value) if integer else float(value)
        except ValueError:
            out = None
    if (
        out is None
        or (isinstance(out, float) and not math.isfinite(out))  # an int of 999 digits is finite
        or (out < bound if op == ">=" else out <= bound)
        or (at_most is not None and out > at_most)
    ):
        raise SettingError(f"${name}={_shown(value)} is not allowed: use {allowed}")
    return out


def setting(name: str, default: float, integer: bool = False, **kw: Any) -> float:
    """``$name`` within its range in :data:`RANGES` (see :func:`env_number`)."""
    low, closed, high = RANGES[name]
    rule = (">=" if closed else ">") + _num(low)
    return env_number(name, default, rule, integer, at_most=high, **kw)


_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


def env_flag(name: str, default: bool) -> bool:
    """``$name`` as yes or no (1/0, yes/no, true/false, on/off, any case), else ``default``
    when unset or empty; anything else is a :class:`SettingError`, never a silent guess."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise SettingError(
        f"${name}={_shown(os.environ[name])} is not allowed: use 1 or 0 (yes/no, true/false, "
        f"on/off; default {int(default)})"
    )


def say(message: str) -> None:
    """One line on stderr, terminal or not: what a download is doing and why."""
    print(f"kmnist_torch: {message}", file=sys.stderr, flush=True)


@dataclass
class FetchConfig:
    """Network settings and bounds; the defaults read ``$KMNIST_TORCH_TIMEOUT``, ``_RETRIES``,
    ``_BACKOFF``, ``_MIN_RATE``, ``_GRACE`` and ``_MAX_BYTES`` (see the module docstring), and
    values given in code must lie in the same ranges."""

    timeout: float = field(default_factory=lambda: setting("KMNIST_TORCH_TIMEOUT", 30.0))
    retries: int = field(default_factory=lambda: int(setting("KMNIST_TORCH_RETRIES", 3, True)))
    backoff: float = field(default_factory=lambda: setting("KMNIST_TORCH_BACKOFF", 1.0))
    min_rate: float = field(default_factory=lambda: setting("KMNIST_TORCH_MIN_RATE", 16384.0))
    grace: float = field(default_factory=lambda: setting("KMNIST_TORCH_GRACE", 60.0))
    max_bytes: int = field(
        default_factory=lambda: int(
            setting("KMNIST_TORCH_MAX_BYTES", DEFAULT_MAX_BYTES, True, default_text="1073741824")
        )
    )
    progress: bool | None = None  # None: only when stderr is a terminal
    log: Callable[[str], None] = say

    def __post_init__(self) -> None:
        for attr in ("timeout", "retries", "backoff", "min_rate", "grace", "max_bytes"):
            low, closed, high = RANGES[f"KMNIST_TORCH_{attr.upper()}"]
            v = getattr(self, attr)
            ok = isinstance(v, (int, float)) and (v >= low if closed else v > low) and v <= high
            if not ok:
                lowest = (">= " if closed else "> ") + _num(low)
                raise ValueError(f"FetchConfig.{attr} must be {lowest} and <= {_num(high)}, "
                                 f"got {v!r}")  # fmt: skip

    def deadline_for(self, n_bytes: int) -> float:
        """Seconds one attempt may take to move ``n_bytes``: ``grace + n_bytes / min_rate``."""
        return self.grace + n_bytes / self.min_rate

    def backoff_for(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt + 1``: ``backoff * 2**attempt``, at most an
        hour (:data:`MAX_BACKOFF_WAIT`)."""
        return min(self.backoff * 2.0 ** min(attempt, 64), MAX_BACKOFF_WAIT)


def lock_timeout() -> float:
    """``$KMNIST_TORCH_LOCK_TIMEOUT``: seconds to wait for another process's lock."""
    return setting("KMNIST_TORCH_LOCK_TIMEOUT", 3600.0, kind="a number of seconds")


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def decode_workers(tasks: int | None = None) -> int:
    """How many KKanji decoding processes to start for ``tasks`` chunks of work:
    ``$KMNIST_TORCH_DECODE_WORKERS`` (default the usable cores), but never more than the usable
    cores nor ``tasks`` (when given), and at least 1."""
    cores = usable_cores()
    value = int(setting("KMNIST_TORCH_DECODE_WORKERS", cores, True,
                        default_text="the usable CPU cores"))  # fmt: skip
    return max(1, min(value, cores, value if tasks is None else tasks))


def progress_every() -> float:
    """``$KMNIST_TORCH_PROGRESS_EVERY``: seconds between two plain progress lines."""
    return setting("KMNIST_TORCH_PROGRESS_EVERY", 10.0, kind="a number of seconds")


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
