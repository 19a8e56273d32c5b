"""Verified downloads: mirrors, timeouts, retries, ``.part`` + HTTP Range resume, atomic rename,
a progress bar, and bounds a hostile or broken server cannot push past. Knows nothing about
Kuzushiji: it is given URLs, a path, a size and checksums, and produces a verified file or one
clear error.

Settings (timeouts, retries, the deadline and byte bounds) come from the environment through
:mod:`kmnist_torch.settings`.

Proxies are taken from the usual ``http_proxy``/``https_proxy``/``no_proxy`` variables.
Redirects are followed (never from https to http); symbolic links at the partial file are
removed, never followed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._io import (
    CHUNK,
    HashRecord,
    failed_write,
    hash_file,
    open_nofollow,
    write_error,
    write_json,
)
from ..errors import DownloadError, WriteError
from ..settings import FetchConfig
from .connection import Watchdog, opener

USER_AGENT = "kmnist_torch (+https://pypi.org/project/kmnist-torch/)"


@dataclass
class Target:
    """A file to have: where it goes, where it can come from, and how to recognise it.

    ``max_size`` bounds a file of unknown ``size`` (else :attr:`FetchConfig.max_bytes`);
    ``accept`` is an extra check of the downloaded bytes (returns why they are wrong, or None),
    for files with no published checksum."""

    dest: Path
    urls: list[str]
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    stale_md5: dict[str, str] = field(default_factory=dict)  # md5 -> what old release it is
    max_size: int | None = None
    accept: Callable[[Path], str | None] | None = None

    def describe(self) -> str:
        """A few lines a user can act on to fetch this file by hand."""
        lines = [f"  {self.dest.name}"]
        lines += [f"    from: {u}" for u in self.urls]
        if self.size is not None:
            lines.append(f"    size: {self.size} bytes")
        if self.md5:
            lines.append(f"    md5:  {self.md5}")
        if self.sha256:
            lines.append(f"    sha256: {self.sha256}")
        lines.append(f"    put it at: {self.dest}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks


def check(
    target: Target, verify: bool = True, record: HashRecord | None = None, full: bool = False
) -> str | None:
    """Why ``target.dest`` is not usable as it stands, or None if it is.

    Checks existence and size always; md5/sha256 (and known stale releases) when ``verify``.
    Hashes remembered in ``record`` (keyed by size and mtime) are reused unless ``full``, which
    rehashes every byte (what ``python -m kmnist_torch verify`` does).
    """
    dest = target.dest
    if dest.is_symlink():  # never read through: a download replaces the link itself
        return "a symbolic link, not a file (it is replaced, never followed)"
    if not dest.is_file():
        return "missing"
    size = dest.stat().st_size
    if not verify:
        return None
    if target.size is not None and size != target.size:
        md5 = hash_file(dest)[0] if target.stale_md5 else None
        if md5 in target.stale_md5:
            return f"stale: it is {target.stale_md5[md5]} (md5 {md5})"
        return f"wrong size: {size} bytes, expected {target.size}"
    if target.md5 is None and target.sha256 is None:
        return None
    if full:
        md5, sha = hash_file(dest)
        if record is not None:
            record.remember(dest, md5, sha)
    else:
        record = record or HashRecord(dest.parent)
        md5, sha = record.hashes(dest)
    if md5 in target.stale_md5:
        return f"stale: it is {target.stale_md5[md5]} (md5 {md5})"
    if target.md5 and md5 != target.md5:
        return f"md5 mismatch: {md5}, expected {target.md5}"
    if target.sha256 and sha != target.sha256:
        return f"sha256 mismatch: {sha}, expected {target.sha256}"
    return None


# --------------------------------------------------------------------------- HTTP


class _Permanent(Exception):
    """A failure that retrying the same URL will not fix (404, checksum mismatch...)."""


class _DeadlineExceeded(Exception):
    """The attempt ran past its overall deadline (a server dripping bytes, or stalled)."""


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a broken env should still download
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, leave=False)  # fmt: skip


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict | None:
    meta = _meta_path(part)
    try:
        if meta.is_symlink():
            return None
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("url"), str) else None


def discard_partial(part: Path) -> None:
    """Remove a partial download and the record of where it came from."""
    for p in (part, _meta_path(part)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _resumable(part: Path, url: str) -> tuple[int, dict | None]:
    """How many bytes of ``part`` may be resumed from ``url``: all of them when the partial was
    written by that very URL (its record says so), else none (and the partial is discarded)."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_meta_path(part))
        return 0, None
    meta = _read_meta(part)
    if not stat.S_ISREG(st.st_mode) or meta is None or meta["url"] != url or st.st_size == 0:
        discard_partial(part)  # another source's bytes, a planted link, or no record
        return 0, None
    return st.st_size, meta


def _int_header(resp, name: str) -> int | None:
    value = resp.headers.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise _Permanent(f"malformed {name} header {value[:40]!r}")
    return int(value)


def _fetch_once(
    url: str, part: Path, target: Target, config: FetchConfig, resume: bool = True
) -> int:
    """One attempt: append to ``part`` from where it stops (if that URL wrote it), until the
    whole file is there; returns the byte offset it resumed from (0 for a fresh start).

    Bounded in time (one overall deadline for connecting, the status line, the headers and the
    body) and in bytes (never past the known size, else past ``max_size``)."""
    if resume:
        start, meta = _resumable(part, url)
    else:
        discard_partial(part)
        start, meta = 0, None
    limit = target.size if target.size is not None else (target.max_size or config.max_bytes)
    if start >= limit:
        discard_partial(part)
        start, meta = 0, None
    watchdog = Watchdog(config.deadline_for(limit - start))
    try:
        return _transfer(url, part, target, config, start, meta, limit, watchdog)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if watchdog.expired():
            raise _DeadlineExceeded(
                f"no complete answer within the deadline of {watchdog.seconds:.0f} s "
                f"($KMNIST_TORCH_GRACE + bytes / $KMNIST_TORCH_MIN_RATE)"
            ) from exc
        raise
    finally:
        watchdog.cancel()


def _transfer(url, part, target, config, start, meta, limit, watchdog) -> int:
    """Ask ``url`` for the file from byte ``start`` on and write what comes to ``part``;
    returns the offset the answer started at (0 when the server sent the whole file)."""
    resp = _open(url, part, start, meta, config, watchdog)
    with resp:
        length = _int_header(resp, "Content-Length")
        start = _answer_start(resp, part, start, meta)
        expected_total = _expected_total(length, start, target, limit)
        if expected_total is not None:  # a known length tightens the deadline
            watchdog.tighten(config.deadline_for(expected_total - start))
        fd = _open_part(part, url, resp, start, expected_total)
        got = _copy_body(resp, fd, start, limit, target, config, watchdog, expected_total)
        if expected_total is not None and got != expected_total:
            raise http.client.IncompleteRead(b"", expected_total - got)
    return start


def _open(url: str, part: Path, start: int, meta: dict | None, config: FetchConfig, watchdog):
    """The server's answer to a request for the file from byte ``start`` on (a Range request
    when resuming, conditional on the partial's validator)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
        validator = meta.get("etag") or meta.get("last_modified") if meta else None
        if validator:
            headers["If-Range"] = validator  # a changed file comes back whole (200)
    req = urllib.request.Request(url, headers=headers)
    try:
        return opener(watchdog).open(req, timeout=config.timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and start:  # our partial file is no prefix the server knows
            discard_partial(part)
            raise
        if 400 <= exc.code < 500 and exc.code not in (408, 425, 429):
            raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
        raise


def _answer_start(resp, part: Path, start: int, meta: dict | None) -> int:
    """Where the answer's body starts in the file: ``start`` for a range that continues the
    partial, 0 for a whole file; any other answer is refused."""
    status = getattr(resp, "status", 200)
    if start and status == 206:
        content_range = resp.headers.get("Content-Range", "")
        total = content_range.rpartition("/")[2]
        if not content_range.startswith(f"bytes {start}-"):
            raise _Permanent(f"server answered range {content_range!r} to bytes={start}-")
        if meta and meta.get("total") is not None and total != str(meta["total"]):
            discard_partial(part)
            raise _Permanent(f"the file changed on the server (range {content_range!r})")
        return start
    if status != 200:
        raise _Permanent(f"unexpected HTTP status {status}")
    return 0  # 200: the server ignored the Range header, or the file changed: start over


def _expected_total(length: int | None, start: int, target: Target, limit: int) -> int | None:
    """The whole file's size as the answer gives it (else the known size), checked against
    the known size and the cap."""
    expected_total = start + length if length is not None else target.size
    if target.size is not None and expected_total != target.size:
        raise _Permanent(f"server offers {expected_total} bytes, expected {target.size}")
    if expected_total is not None and expected_total > limit:
        raise _Permanent(f"server offers {expected_total} bytes, more than the cap of {limit}")
    return expected_total


def _open_part(part: Path, url: str, resp, start: int, expected_total: int | None) -> int:
    """A descriptor to write to ``part``: appending to the partial, or a fresh file (with a
    fresh record of where it comes from) when the answer starts at 0."""
    if start:
        return open_nofollow(part, os.O_WRONLY | os.O_APPEND)
    discard_partial(part)
    write_json(_meta_path(part), {
        "url": url,
        "total": expected_total,
        "etag": resp.headers.get("ETag"),
        "last_modified": resp.headers.get("Last-Modified"),
    })  # fmt: skip
    return open_nofollow(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def _copy_body(resp, fd: int, start: int, limit: int, target: Target, config: FetchConfig,
               watchdog, expected_total: int | None) -> int:  # fmt: skip
    """Write the answer's body to ``fd`` until it ends, never past ``limit`` bytes of file nor
    past the deadline; returns the file's size then."""
    bar = _progress_bar(expected_total, start, target.dest.name, config.progress)
    got = start
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                if watchdog.expired():
                    raise socket.timeout("overall deadline passed")
                chunk = resp.read(min(CHUNK, limit - got + 1))
                if not chunk:
                    return got
                if got + len(chunk) > limit:
                    out.write(chunk[: limit - got])
                    raise _Permanent(
                        f"server sent more than {limit} bytes"
                        + (" (the file's known size)" if target.size is not None else
                           " (the cap for a file of unknown size: $KMNIST_TORCH_MAX_BYTES)")
                    )  # fmt: skip
                out.write(chunk)
                got += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


_TRANSIENT = (
    urllib.error.URLError,
    http.client.HTTPException,
    OSError,
)


def _verify_part(part: Path, target: Target) -> tuple[str, str, str | None]:
    if not stat.S_ISREG(os.lstat(part).st_mode):  # swapped for a link under our feet
        return "", "", "the partial file was replaced by something that is not a file"
    md5, sha = hash_file(part)
    problem = None
    if target.md5 and md5 != target.md5:
        problem = f"md5 {md5}, expected {target.md5}"
    elif target.sha256 and sha != target.sha256:
        problem = f"sha256 {sha}, expected {target.sha256}"
    elif target.accept is not None:
        problem = target.accept(part)
    return md5, sha, problem


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, (_Permanent, _DeadlineExceeded)):
        return str(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    return f"{type(exc).__name__}: {reason or exc}"


class _GaveUp(Exception):
    """One URL failed for good (the message says why); the next mirror is asked."""


def download(target: Target, config: FetchConfig | None = None) -> tuple[str, str]:
    """Download ``target`` from the first of its URLs that yields a file with the expected size
    and checksums; resume a partial download only from the URL that wrote it; move the file
    into place atomically.

    Returns the file's (md5, sha256). Raises :class:`DownloadError` listing every URL tried and
    why it failed. Never leaves a file at ``target.dest`` that failed its check.
    """
    config = config or FetchConfig()
    dest = target.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    size = f"{target.size:,} bytes" if target.size is not None else "size unknown"
    failures: list[str] = []
    for k, url in enumerate(target.urls):
        config.log(f"downloading {dest.name} ({size}) from {url}")
        try:
            md5, sha = _from_url(url, part, target, config)
        except _GaveUp as exc:
            failures.append(f"{url}: {exc}")
            if k + 1 < len(target.urls):
                config.log(f"{dest.name}: giving up on {url} ({exc}); "
                           f"trying the next mirror, {target.urls[k + 1]}")  # fmt: skip
            continue
        os.replace(part, dest)  # replaces a link at dest itself, never its target
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_meta_path(part))
        return md5, sha
    raise DownloadError(
        f"could not download {dest.name}; tried:\n  "
        + "\n  ".join(failures)
        + "\n"
        + target.describe()
    )


def _from_url(url: str, part: Path, target: Target, config: FetchConfig) -> tuple[str, str]:
    """Fetch ``target`` from one URL into ``part``, retrying what may pass; returns the
    verified file's (md5, sha256), or raises :class:`_GaveUp` saying why that URL failed."""
    name, log = target.dest.name, config.log
    restarted = False  # a resumed file that failed its check gets one fresh try
    attempt = 0
    while True:
        try:
            resumed_from = _fetch_once(url, part, target, config, resume=not restarted)
        except _Permanent as exc:
            discard_partial(part)
            raise _GaveUp(str(exc)) from exc
        except _DeadlineExceeded as exc:  # that URL is too slow: the next one is asked
            raise _GaveUp(str(exc)) from exc
        except _TRANSIENT as exc:
            if isinstance(exc, WriteError):  # a full disk: no retry or mirror can help
                raise
            if failed_write(exc) is not None:
                raise write_error(part, failed_write(exc)) from exc
            if attempt >= config.retries:
                # The partial stays: a later run resumes it from this URL (and only this).
                raise _GaveUp(f"{_reason(exc)} (after {attempt + 1} attempts)") from exc
            delay = config.backoff_for(attempt)
            attempt += 1
            log(f"{name}: {url} failed ({_reason(exc)}); retry {attempt} of "
                f"{config.retries} in {delay:g} s")  # fmt: skip
            time.sleep(delay)
            continue
        md5, sha, problem = _verify_part(part, target)
        if problem and resumed_from and not restarted:
            # The bytes kept from before may be what is wrong, not this URL's: once more
            # from zero before blaming it.
            log(f"{name}: resumed file from {url} has {problem}; downloading it again "
                "from the start")  # fmt: skip
            discard_partial(part)
            restarted = True
            continue
        if problem:
            discard_partial(part)
            raise _GaveUp(f"downloaded file has {problem}")
        return md5, sha
