"""Verified downloads: mirrors, timeouts, retries, ``.part`` + HTTP Range resume, atomic rename,
a file lock and a progress bar. Knows nothing about Kuzushiji: it is given URLs, a path, a size
and checksums, and produces a verified file or one clear error.

Settings come from the environment, so that a user behind a slow proxy (or a test of a stalled
server) can change them without code:

- ``KMNIST_TORCH_TIMEOUT``: seconds to wait for a connection and for each read (default 30).
- ``KMNIST_TORCH_RETRIES``: extra attempts per URL after a transient failure (default 3).
- ``KMNIST_TORCH_BACKOFF``: first back-off delay in seconds, doubled on each retry (default 1).

Proxies are taken from the usual ``http_proxy``/``https_proxy``/``no_proxy`` variables.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ._io import CHUNK, HashRecord, hash_file

USER_AGENT = "kmnist_torch (+https://pypi.org/project/kmnist-torch/)"


class DownloadError(RuntimeError):
    """No URL produced a file with the expected size and checksums."""


class ChecksumError(ValueError):
    """A file on disk does not match its published size or checksum."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ValueError(f"${name}={value!r} is not a number") from exc


@dataclass
class FetchConfig:
    """Network settings; the defaults read ``$KMNIST_TORCH_TIMEOUT/RETRIES/BACKOFF``."""

    timeout: float = field(default_factory=lambda: _env_float("KMNIST_TORCH_TIMEOUT", 30.0))
    retries: int = field(default_factory=lambda: int(_env_float("KMNIST_TORCH_RETRIES", 3)))
    backoff: float = field(default_factory=lambda: _env_float("KMNIST_TORCH_BACKOFF", 1.0))
    progress: bool | None = None  # None: only when stderr is a terminal


@dataclass
class Target:
    """A file to have: where it goes, where it can come from, and how to recognise it."""

    dest: Path
    urls: list[str]
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    stale_md5: dict[str, str] = field(default_factory=dict)  # md5 -> what old release it is

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


def check(target: Target, verify: bool = True, record: HashRecord | None = None) -> str | None:
    """Why ``target.dest`` is not usable as it stands, or None if it is.

    Checks existence and size always; md5/sha256 (and known stale releases) when ``verify``.
    """
    dest = target.dest
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


class _NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.full_url.lower().startswith("https:") and newurl.lower().startswith("http:"):
            raise urllib.error.HTTPError(
                req.full_url, code, f"refused redirect from https to insecure {newurl}",
                headers, fp,
            )  # fmt: skip
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoDowngradeRedirect())  # ProxyHandler reads the env


class _Permanent(Exception):
    """A failure that retrying the same URL will not fix (404, checksum mismatch...)."""


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)


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


def _fetch_once(url: str, part: Path, target: Target, config: FetchConfig) -> None:
    """One attempt: append to ``part`` from where it stops, until the whole file is there."""
    start = part.stat().st_size if part.exists() else 0
    if target.size is not None and start >= target.size:
        part.unlink()
        start = 0
    try:
        resp = _open(url, start, config.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # our partial file is no prefix the server knows
            part.unlink()
            raise
        if 400 <= exc.code < 500 and exc.code not in (408, 425, 429):
            raise _Permanent(f"HTTP {exc.code} {exc.reason}") from exc
        raise
    with resp:
        status = getattr(resp, "status", 200)
        if start and status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                raise _Permanent(f"server answered range {content_range!r} to bytes={start}-")
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            start, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        expected_total = start + int(length) if length is not None else target.size
        if target.size is not None and expected_total not in (None, target.size):
            raise _Permanent(f"server offers {expected_total} bytes, expected {target.size}")
        bar = _progress_bar(expected_total, start, target.dest.name, config.progress)
        got = start
        try:
            with open(part, mode) as out:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if expected_total is not None and got != expected_total:
            raise http.client.IncompleteRead(b"", expected_total - got)


_TRANSIENT = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    socket.timeout,
    TimeoutError,
)


def download(target: Target, config: FetchConfig | None = None) -> tuple[str, str]:
    """Download ``target`` from the first of its URLs that yields a file with the expected size
    and checksums; resume partial downloads; move it into place atomically.

    Returns the file's (md5, sha256). Raises :class:`DownloadError` listing every URL tried and
    why it failed. Never leaves a file at ``target.dest`` that failed its check.
    """
    config = config or FetchConfig()
    dest = target.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    for url in target.urls:
        for attempt in range(config.retries + 1):
            try:
                _fetch_once(url, part, target, config)
            except _Permanent as exc:
                failures.append(f"{url}: {exc}")
                break
            except _TRANSIENT as exc:
                reason = getattr(exc, "reason", None) or exc
                if attempt == config.retries:
                    failures.append(f"{url}: {type(exc).__name__}: {reason} "
                                    f"(after {attempt + 1} attempts)")  # fmt: skip
                    break
                time.sleep(config.backoff * (2**attempt))
                continue
            md5, sha = hash_file(part)
            problem = None
            if target.md5 and md5 != target.md5:
                problem = f"md5 {md5}, expected {target.md5}"
            elif target.sha256 and sha != target.sha256:
                problem = f"sha256 {sha}, expected {target.sha256}"
            if problem:
                part.unlink()
                failures.append(f"{url}: downloaded file has {problem}")
                break
            os.replace(part, dest)
            return md5, sha
    raise DownloadError(
        f"could not download {dest.name}; tried:\n  "
        + "\n  ".join(failures)
        + "\n"
        + target.describe()
    )
