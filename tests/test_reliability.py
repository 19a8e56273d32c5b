"""Hostile servers, bit rot and shared cache folders (issue 11): each fault class against a real
server on 127.0.0.1 whose handler scripts the fault at the socket level, or files damaged on
disk by the test. Deadlines and sizes are made small through the settings, so each test takes
seconds."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import socketserver
import threading
import time
import tracemalloc
import zipfile
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import pytest
from conftest import make_target, mirror_env
from fakedata import kkanji_files, kkanji_tar, random_split

from kmnist_torch import KMNIST, DataFilesError, FormatError, catalog
from kmnist_torch._io import HashRecord, folder_lock
from kmnist_torch.cli import main
from kmnist_torch.data import arrays
from kmnist_torch.data.formats import read_idx, read_npz, write_idx
from kmnist_torch.data.resplit import write_split
from kmnist_torch.download.fetch import Target, download
from kmnist_torch.errors import DownloadError
from kmnist_torch.settings import FetchConfig

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
HTML = b"<!DOCTYPE html><html><body>Please log in to the proxy</body></html>\n" * 20


# ------------------------------------------------------------------ a server scripted per socket


class Hostile:
    """An HTTP server on 127.0.0.1 written on raw sockets, so a handler can misbehave anywhere
    (drip the status line, lie in the headers, never stop). ``route(path, *handlers)`` queues
    handlers for the next requests of ``path``; the last one stays for later requests. A
    handler is ``f(send, request_headers)``, ``send`` writing bytes to the client."""

    def __init__(self) -> None:
        self.routes: dict[str, deque] = defaultdict(deque)
        self.requests: list[tuple[str, dict]] = []
        self.stop = threading.Event()
        state = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                sock = self.request
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(4096)
                    if not data:
                        return
                    buf += data
                lines = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1].split("?", 1)[0]
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                state.requests.append((path, headers))
                queue = state.routes.get(path)
                if not queue:
                    sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    return
                handler = queue.popleft() if len(queue) > 1 else queue[0]
                with_stop = lambda b: state.stop.is_set() or sock.sendall(b)  # noqa: E731
                try:
                    handler(with_stop, headers)
                except OSError:
                    pass  # the client gave up: what the test wants

        class TCP(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = TCP(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, path: str, *handlers) -> None:
        self.routes[path].extend(handlers)

    def hits(self, path: str) -> list[dict]:
        return [h for p, h in self.requests if p == path]

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def ok(data: bytes, etag: str | None = None):
    """Serve ``data`` with Range support (206 when asked)."""

    def handler(send, headers):
        start = 0
        rng = headers.get("range", "")
        head = "HTTP/1.1 200 OK\r\n"
        if rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            head = (
                f"HTTP/1.1 206 Partial Content\r\n"
                f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n"
            )
        body = data[start:]
        extra = f"ETag: {etag}\r\n" if etag else ""
        send(f"{head}{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        send(body)

    return handler


def drip(where: str, data: bytes = PAYLOAD, every: float = 0.1):
    """Send the answer one byte at a time, starting the drip in the status line, the headers
    or the body: each read gets a byte well within the per-read timeout."""
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nX-Pad: {'x' * 200}\r\n\r\n".encode()
    whole = head + data
    fast = {"status": 0, "headers": 20, "body": len(head)}[where]

    def handler(send, headers):
        send(whole[:fast])
        for i in range(fast, len(whole)):
            send(whole[i : i + 1])
            time.sleep(every)

    return handler


def endless(content_length: int | None = None, chunk: bytes = b"\0" * 65536):
    """200 with no (or a lying) Content-Length, then bytes until the client hangs up."""

    def handler(send, headers):
        cl = f"Content-Length: {content_length}\r\n" if content_length is not None else ""
        send(f"HTTP/1.1 200 OK\r\n{cl}Connection: close\r\n\r\n".encode())
        for _ in range(100_000):  # 6.5 GB at most: the client must stop long before
            send(chunk)

    return handler


def raw(text: bytes):
    def handler(send, headers):
        send(text)

    return handler


@pytest.fixture
def hostile():
    server = Hostile()
    yield server
    server.close()


@pytest.fixture
def quick(fast_net):
    """Small deadlines: 1 s of grace, a minimum rate far above what a drip achieves."""
    fast_net.setenv("KMNIST_TORCH_GRACE", "1")
    fast_net.setenv("KMNIST_TORCH_MIN_RATE", "1000000")
    fast_net.setenv("KMNIST_TORCH_LOCK_TIMEOUT", "5")
    return fast_net


def _target(tmp_path, urls, data=PAYLOAD, **kw):
    return make_target(tmp_path, urls, data, **kw)


def _cfg(**kw) -> FetchConfig:
    base = dict(timeout=1.0, retries=0, backoff=0, grace=1.0, min_rate=1e6)
    base.update(kw)
    return FetchConfig(**base)


# ---------------------------------------------------------------- 1. an overall time bound


@pytest.mark.parametrize("where", ["status", "headers", "body"])
def test_dripping_server_is_given_up_on_and_next_mirror_serves(where, tmp_path, hostile, quick):
    hostile.route("/drip/f", drip(where))
    hostile.route("/good/f", ok(PAYLOAD))
    t = _target(tmp_path, [f"{hostile.url}/drip/f", f"{hostile.url}/good/f"])
    start = time.monotonic()
    download(t, _cfg(retries=3))
    elapsed = time.monotonic() - start
    assert t.dest.read_bytes() == PAYLOAD
    # A deadline is final for that URL: asked once, not retried 3 more times.
    assert len(hostile.hits("/drip/f")) == 1
    assert elapsed < 15  # the deadline is about 1 s; generous for a loaded machine


def test_deadline_failure_is_named_in_the_error(tmp_path, hostile, quick):
    hostile.route("/drip/f", drip("status"))
    t = _target(tmp_path, [f"{hostile.url}/drip/f"])
    with pytest.raises(DownloadError, match="deadline"):
        download(t, _cfg())


def test_second_process_waiting_on_the_lock_says_so_once_and_gives_up(tmp_path, quick, capfd):
    quick.setenv("KMNIST_TORCH_LOCK_TIMEOUT", "0.5")
    mirror_env(quick, "http://127.0.0.1:9/")
    raw = tmp_path / "KMNIST" / "raw"
    with folder_lock(raw, ".download.lock"):  # another process holds it
        with pytest.raises(DataFilesError, match="gave up after waiting 0.5 s"):
            KMNIST(tmp_path, train=False, download=True)
    err = capfd.readouterr().err
    assert err.count("another process is downloading") == 1
    assert "KMNIST_TORCH_LOCK_TIMEOUT" in err


# ---------------------------------------------------------------- 2. a byte bound


def test_never_writes_past_the_known_size(tmp_path, hostile, quick, monkeypatch):
    hostile.route("/endless/f", endless())
    hostile.route("/lying/f", endless(content_length=len(PAYLOAD)))
    hostile.route("/good/f", ok(PAYLOAD))
    t = _target(tmp_path, [f"{hostile.url}/endless/f", f"{hostile.url}/lying/f",
                           f"{hostile.url}/good/f"])  # fmt: skip
    msgs = []
    download(t, _cfg(log=msgs.append))
    assert t.dest.read_bytes() == PAYLOAD
    # With no length: cut at the file's size and failed. With a (lying) length: read up to it
    # only, then failed on its checksum. Never more than 16384 bytes written.
    assert sum("sent more than 16384 bytes" in m for m in msgs) == 1
    assert sum("downloaded file has md5" in m for m in msgs) == 1


def test_unknown_size_is_capped(tmp_path, hostile, quick):
    hostile.route("/endless/f", endless())
    t = Target(dest=tmp_path / "big.tar", urls=[f"{hostile.url}/endless/f"], max_size=200_000)
    with pytest.raises(DownloadError, match="more than 200000 bytes"):
        download(t, _cfg())
    assert list(tmp_path.iterdir()) == []  # nothing kept of it


def test_cap_comes_from_the_environment(tmp_path, hostile, quick):
    quick.setenv("KMNIST_TORCH_MAX_BYTES", "100000")
    hostile.route("/endless/f", endless())
    t = Target(dest=tmp_path / "big.tar", urls=[f"{hostile.url}/endless/f"])
    with pytest.raises(DownloadError, match=r"more than 100000 bytes .*KMNIST_TORCH_MAX_BYTES"):
        download(t, FetchConfig(retries=0))


# ------------------------------------------------- 3. a partial is resumed only from its source


def test_partial_from_another_mirror_is_discarded_not_resumed(tmp_path, hostile, quick):
    hostile.route("/good/f", ok(PAYLOAD))
    part = tmp_path / "file.bin.part"
    part.write_bytes(HTML[:5000])  # left by mirror 1, an HTML page
    (tmp_path / "file.bin.part.json").write_text(json.dumps({"url": f"{hostile.url}/bad/f"}))
    t = _target(tmp_path, [f"{hostile.url}/good/f"])
    download(t, _cfg())
    assert t.dest.read_bytes() == PAYLOAD
    assert "range" not in hostile.hits("/good/f")[0]  # fetched whole, never appended to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_partial_without_a_record_is_discarded(tmp_path, hostile, quick):
    hostile.route("/good/f", ok(PAYLOAD))
    (tmp_path / "file.bin.part").write_bytes(HTML[:5000])
    t = _target(tmp_path, [f"{hostile.url}/good/f"])
    download(t, _cfg())
    assert t.dest.read_bytes() == PAYLOAD and "range" not in hostile.hits("/good/f")[0]


def test_resumed_file_failing_its_check_is_fetched_again_from_zero(tmp_path, hostile, quick):
    url = f"{hostile.url}/good/f"
    hostile.route("/good/f", ok(PAYLOAD))
    (tmp_path / "file.bin.part").write_bytes(b"X" * 5000)  # recorded as this URL's, but rotten
    (tmp_path / "file.bin.part.json").write_text(json.dumps({"url": url}))
    t = _target(tmp_path, [url])
    msgs = []
    download(t, _cfg(log=msgs.append))
    assert t.dest.read_bytes() == PAYLOAD
    hits = hostile.hits("/good/f")
    assert [h.get("range") for h in hits] == ["bytes=5000-", None]
    assert any("downloading it again from the start" in m for m in msgs)


def test_resume_sends_the_recorded_validator(tmp_path, hostile, quick):
    url = f"{hostile.url}/f"
    hostile.route("/f", raw(b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 16384\r\n"
                            b"Connection: close\r\n\r\n" + PAYLOAD[:3000]),
                  ok(PAYLOAD, etag='"v1"'))  # fmt: skip
    t = _target(tmp_path, [url])
    download(t, _cfg(retries=1))
    second = hostile.hits("/f")[1]
    assert second.get("range") == "bytes=3000-" and second.get("if-range") == '"v1"'
    assert t.dest.read_bytes() == PAYLOAD


# ---------------------------------------------- 4. a malformed response fails only that mirror


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nConnection: close\r\n\r\n" + PAYLOAD,
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n" + HTML,
        b"garbage that is no status line\r\n\r\n",
    ],
    ids=["length-abc", "length-negative", "html-page", "no-status-line"],
)
def test_malformed_answer_moves_on_to_next_mirror(answer, tmp_path, hostile, quick):
    hostile.route("/bad/f", raw(answer))
    hostile.route("/good/f", ok(PAYLOAD))
    t = _target(tmp_path, [f"{hostile.url}/bad/f", f"{hostile.url}/good/f"])
    download(t, _cfg())
    assert t.dest.read_bytes() == PAYLOAD


def _serve_split(server: Hostile, prefix: str, tmp_path: Path, n: int = 40) -> np.ndarray:
    images, labels = random_split(n)
    folder = write_split(tmp_path / "src", "kmnist", "test", images, labels, fmt="npz")
    for f in folder.iterdir():
        server.route(f"{prefix}/kmnist/{f.name}", ok(f.read_bytes()))
    return labels


def test_kmnist_falls_through_a_malformed_mirror(tmp_path, hostile, quick):
    labels = _serve_split(hostile, "/good", tmp_path)
    hostile.route("/bad/kmnist/kmnist-test-imgs.npz",
                  raw(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n"))  # fmt: skip
    mirror_env(quick, f"{hostile.url}/bad", f"{hostile.url}/good")
    with pytest.warns(UserWarning, match="verify=False"):
        ds = KMNIST(tmp_path / "root", train=False, download=True, format="npz", verify=False)
    assert ds.targets.tolist() == labels.tolist()


def _kkanji_subset(monkeypatch):
    files = kkanji_files(3, 4, seed=1)
    full = dataclasses.replace(catalog.KKANJI, num_classes=3, split_sizes={"all": 12})
    monkeypatch.setattr(catalog, "KKANJI", full)
    return files


def test_kkanji_html_from_first_mirror_then_tar_from_second(tmp_path, hostile, quick):
    from kmnist_torch.data.kkanji.dataset import KKanji

    files = _kkanji_subset(quick)
    hostile.route("/m1/kkanji/kkanji.tar",
                  raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n"
                      + HTML))  # fmt: skip
    hostile.route("/m2/kkanji/kkanji.tar", ok(kkanji_tar(files)))
    mirror_env(quick, f"{hostile.url}/m1", f"{hostile.url}/m2")
    ds = KKanji(tmp_path, split="all", download=True)
    assert len(ds) == 12
    assert len(hostile.hits("/m2/kkanji/kkanji.tar")) == 1


# ----------------------------------------------------------------- 5. decompression bombs


def _idx_bomb(path: Path, claimed: int, inflated: int) -> None:
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (claimed, 28, 28))
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header)
        zeros = bytes(1 << 20)
        for _ in range(inflated >> 20):
            fh.write(zeros)


def test_gzip_bomb_is_refused_with_flat_memory(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    _idx_bomb(path, claimed=10, inflated=64 << 20)  # 64 MiB of zeros behind a 10-image header
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="more data"):
            read_idx(path, 3, (-1, 28, 28))
        from kmnist_torch.data.formats import read_gzip

        with pytest.raises(FormatError, match="more data"):
            read_gzip(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # never near the 64 MiB it would inflate to


def test_idx_header_claiming_too_much_is_refused_before_reading(tmp_path):
    path = tmp_path / "x.gz"
    _idx_bomb(path, claimed=4_000_000, inflated=1 << 20)  # 3.1 GB claimed
    with pytest.raises(FormatError, match="refused before reading"):
        read_idx(path, 3)


def test_gzip_bomb_with_verify_off_through_the_dataset(tmp_path):
    raw_dir = tmp_path / "KMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    write_idx(raw_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(10, np.uint8))
    _idx_bomb(raw_dir / "t10k-images-idx3-ubyte.gz", claimed=10, inflated=32 << 20)
    with pytest.warns(UserWarning), pytest.raises(FormatError, match="more data"):
        KMNIST(tmp_path, train=False, verify=False)


def _npz_with_header(path: Path, shape: tuple, body: bytes = b"", declared: int | None = None):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + body)


def test_npz_claiming_10e12_images_is_a_format_error_before_allocating(tmp_path):
    path = tmp_path / "k49-train-imgs.npz"
    _npz_with_header(path, (10**12, 28, 28), bytes(1000))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="refused before reading"):
            read_npz(path, (-1, 28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_npz_bomb_is_bounded_by_its_header(tmp_path):
    # A header of 10 images, a member inflating to 64 MiB: refused from the zip's declared size.
    path = tmp_path / "a.npz"
    _npz_with_header(path, (10, 28, 28), bytes(64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="declared in the zip"):
            read_npz(path, (-1, 28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_npz_cap_is_checked_before_inflating(tmp_path):
    path = tmp_path / "a.npz"
    np.savez_compressed(path, np.zeros((2000, 28, 28), np.uint8))
    with pytest.raises(FormatError, match="at most 1000000 bytes"):
        read_npz(path, (-1, 28, 28), max_bytes=1_000_000)
    assert read_npz(path, (-1, 28, 28)).shape == (2000, 28, 28)


# ------------------------------------------------------------------------ 6. verify checks all


def _official_like_root(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """A full-size KMNIST test split (idx.gz), and a blank full-size train split (``verify``
    calls a root good only when no split lacks a file), whose catalog checksums are patched
    to match, so ``verify`` has something it can call good; returns the raw folder and the
    bytes served."""
    images, labels = random_split(catalog.KMNIST.split_sizes["test"])
    raw_dir = write_split(tmp_path / "root", "kmnist", "test", images, labels, fmt="mnist")
    n = catalog.KMNIST.split_sizes["train"]
    blank = np.zeros((n, 28, 28), np.uint8)
    write_split(tmp_path / "root", "kmnist", "train", blank, np.arange(n) % 10, fmt="mnist")
    served = {p.name: p.read_bytes() for p in raw_dir.iterdir() if p.is_file()}
    from kmnist_torch.data import mnist as datasets
    from kmnist_torch.data import verify
    from kmnist_torch.download import sources

    original = sources.target_for

    def patched(remote, folder, *args, **kwargs):
        t = original(remote, folder, *args, **kwargs)
        data = served.get(t.dest.name)
        if data is None:
            return t
        md5, sha = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
        return dataclasses.replace(t, size=len(data), md5=md5, sha256=sha, stale_md5={})

    monkeypatch.setattr(verify, "target_for", patched)
    monkeypatch.setattr(datasets, "target_for", patched)
    monkeypatch.setattr(arrays, "target_for", patched)
    return raw_dir, served


def test_verify_finds_bit_rot_with_size_and_mtime_restored(tmp_path, monkeypatch, capsys):
    raw_dir, _ = _official_like_root(tmp_path, monkeypatch)
    root = str(tmp_path / "root")
    assert main(["verify", "kmnist", "--root", root]) == 0
    victim = raw_dir / "t10k-images-idx3-ubyte.gz"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before
    capsys.readouterr()
    assert main(["verify", "kmnist", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "t10k-images-idx3-ubyte.gz: BAD: md5 mismatch" in out


def test_verify_repair_downloads_the_bad_file_again(tmp_path, monkeypatch, hostile, quick, capsys):
    raw_dir, served = _official_like_root(tmp_path, monkeypatch)
    for name, data in served.items():
        hostile.route(f"/kmnist/{name}", ok(data))
    mirror_env(quick, hostile.url)
    victim = raw_dir / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(b"rotten")
    root = str(tmp_path / "root")
    assert main(["verify", "kmnist", "--root", root, "--repair"]) == 0
    out = capsys.readouterr().out
    assert "t10k-labels-idx1-ubyte.gz: BAD" in out and "repaired" in out
    assert victim.read_bytes() == served[victim.name]
    assert main(["verify", "kmnist", "--root", root]) == 0


def test_verify_on_a_missing_root_exits_1(tmp_path, capsys):
    assert main(["verify", "--root", str(tmp_path / "nowhere")]) == 1
    assert "nothing to verify" in capsys.readouterr().err


def _kkanji_root_with_cache(tmp_path, monkeypatch):
    from fakedata import write_kkanji_tree

    from kmnist_torch.data.kkanji.dataset import KKanji

    files = _kkanji_subset(monkeypatch)
    folder = tmp_path / "KKanji"
    write_kkanji_tree(folder, files)
    KKanji(tmp_path, split="all")  # builds the decoded cache
    (npy,) = (folder / "cache").glob("images-*.npy")
    return folder, npy


def test_verify_kkanji_finds_a_corrupted_cache_and_repair_rebuilds_it(tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    folder, npy = _kkanji_root_with_cache(tmp_path, monkeypatch)
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 0
    assert "checked against the PNGs" in capsys.readouterr().out
    st = npy.stat()
    data = bytearray(npy.read_bytes())
    data[-100] ^= 0xFF
    npy.write_bytes(bytes(data))
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert npy.name in out and "sha256 differs" in out and "differs from" in out
    assert main(["verify", "kkanji", "--root", str(tmp_path), "--repair"]) == 0
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 0


def test_a_cache_index_without_its_sha256_is_a_problem(tmp_path, monkeypatch):
    # Every index this package writes records the sha256 of its images; one without it was not
    # written by us, and verify says so instead of skipping the check.
    import warnings

    from kmnist_torch.data.kkanji import cache

    folder, npy = _kkanji_root_with_cache(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a subset: scan_tree warns with verify=False
        listing = cache.scan_tree(folder / "kkanji2", verify=False)
    assert cache.check_cache(folder, listing) == []
    index_path = cache.cache_paths(folder, listing.fingerprint)[1]
    index = json.loads(index_path.read_text(encoding="utf-8"))
    del index["sha256"]
    index_path.write_text(json.dumps(index), encoding="utf-8")
    assert cache.check_cache(folder, listing) == [f"{index_path}: records no sha256 of {npy.name}"]


def test_verify_kkanji_names_a_damaged_png(tmp_path, monkeypatch, capsys):
    folder, _ = _kkanji_root_with_cache(tmp_path, monkeypatch)
    victim = sorted((folder / "kkanji2").rglob("*.png"))[3]
    st = victim.stat()
    victim.write_bytes(victim.read_bytes()[:40].ljust(st.st_size, b"\0"))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # the loading fast path sees nothing
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 1
    assert victim.name in capsys.readouterr().out


# ------------------------------------------------------------------- 7. no symlink is followed


def test_symlinked_part_is_replaced_never_followed(tmp_path, hostile, quick):
    hostile.route("/f", ok(PAYLOAD))
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "file.bin.part").symlink_to(outside)
    (folder / "file.bin.part.json").write_text(json.dumps({"url": f"{hostile.url}/f"}))
    t = _target(folder, [f"{hostile.url}/f"])
    download(t, _cfg())
    assert outside.read_bytes() == b"precious"
    assert not t.dest.is_symlink() and t.dest.read_bytes() == PAYLOAD
    assert "range" not in hostile.hits("/f")[0]


def test_symlinked_part_meta_and_dest_are_replaced(tmp_path, hostile, quick):
    hostile.route("/f", ok(PAYLOAD))
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "file.bin.part.json").symlink_to(outside)
    (folder / "file.bin").symlink_to(outside)
    t = _target(folder, [f"{hostile.url}/f"])
    download(t, _cfg())
    assert outside.read_bytes() == b"precious"
    assert not t.dest.is_symlink() and t.dest.read_bytes() == PAYLOAD


def test_symlinked_lock_file_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / ".download.lock").symlink_to(outside)
    with folder_lock(folder, ".download.lock"):
        pass
    assert outside.read_bytes() == b"precious"
    assert not (folder / ".download.lock").is_symlink()


def test_stale_cache_temporaries_are_removed_by_the_next_run(tmp_path, monkeypatch):
    from kmnist_torch.data.kkanji.dataset import KKanji

    folder, npy = _kkanji_root_with_cache(tmp_path, monkeypatch)
    stale = [folder / "cache" / f"{npy.name}.999999.tmp", folder / "cache" / ".index.json.9.tmp"]
    for p in stale:
        p.write_bytes(b"left by kill -9")
    KKanji(tmp_path, split="all")
    assert not any(p.exists() for p in stale)


# -------------------------------------------------------------- 8. errors a user can act on


@pytest.mark.parametrize(
    "var,value,allowed",
    [
        ("KMNIST_TORCH_RETRIES", "-1", "whole number >= 0"),
        ("KMNIST_TORCH_BACKOFF", "-1", "number >= 0"),
        ("KMNIST_TORCH_TIMEOUT", "-1", "number > 0"),
        ("KMNIST_TORCH_TIMEOUT", "abc", "number > 0"),
        ("KMNIST_TORCH_MIN_RATE", "0", "number >= 1"),
        ("KMNIST_TORCH_LOCK_TIMEOUT", "soon", "seconds >= 0"),
    ],
)
def test_bad_setting_is_named_by_the_cli(var, value, allowed, tmp_path, quick, capsys):
    mirror_env(quick, "http://127.0.0.1:9/")
    quick.setenv(var, value)
    rc = main(["download", "kmnist", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and f"${var}={value!r}" in err and allowed in err
    assert "Traceback" not in err


def test_bad_decode_workers_is_named(tmp_path, monkeypatch, capsys):
    from fakedata import write_kkanji_tree

    files = _kkanji_subset(monkeypatch)
    write_kkanji_tree(tmp_path / "KKanji", files)
    monkeypatch.setenv("KMNIST_TORCH_DECODE_WORKERS", "abc")
    rc = main(["download", "kkanji", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "$KMNIST_TORCH_DECODE_WORKERS='abc'" in err and ">= 1" in err


def test_read_only_root_with_a_file_missing(quick, capsys):
    ro = Path("/sys/kmnist_torch_test_root")
    if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("needs a read-only /sys")
    mirror_env(quick, "http://127.0.0.1:9/")
    with pytest.raises(DataFilesError, match="cannot download into"):
        KMNIST(ro, train=False, download=True)
    assert main(["download", "kmnist", "--root", str(ro)]) == 1
    assert "writable root" in capsys.readouterr().err


def test_download_root_below_a_regular_file(tmp_path, quick, capsys):
    mirror_env(quick, "http://127.0.0.1:9/")
    (tmp_path / "file").write_text("x")
    rc = main(["download", "kmnist", "--root", str(tmp_path / "file" / "root")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot download into" in err and "Traceback" not in err


def test_damaged_hash_record_is_treated_as_unverified(tmp_path):
    images, labels = random_split(20)
    raw_dir = write_split(tmp_path, "kmnist", "test", images, labels, fmt="npz")
    record = raw_dir / ".kmnist_torch-verified.json"
    for damage in (b"{not json", b'{"kmnist-test-imgs.npz": {"size": 1}}', b"[1, 2]", b"\xff\xfe"):
        record.write_bytes(damage)
        rec = HashRecord(raw_dir)
        f = raw_dir / "kmnist-test-imgs.npz"
        assert rec.hashes(f)[0] == hashlib.md5(f.read_bytes()).hexdigest()
        with pytest.warns(UserWarning):
            ds = KMNIST(tmp_path, train=False, format="npz", verify=False)
        assert len(ds) == 20


def test_html_page_saved_as_npz_is_named(tmp_path):
    path = tmp_path / "kmnist-test-imgs.npz"
    path.write_bytes(HTML)
    with pytest.raises(FormatError, match="expected an npz file.*HTML page"):
        read_npz(path)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--out", "{tmp}"], "is a folder"),
        (["--out", "{tmp}/m.xyz"], "unknown image extension"),
        (["--out", "{tmp}/m.png", "--per-class", "-3"], "--per-class must be"),
        (["--out", "{tmp}/m.png", "--max-classes", "0"], "--max-classes must be"),
        (["--out", "{tmp}/file/m.png"], "is a file, not a folder"),
    ],
)
def test_montage_arguments_are_checked(extra, message, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["montage", "kmnist", "--root", str(tmp_path)]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_kkanji_split_out_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["kkanji-split", "--out", str(tmp_path / "file" / "s.json"), "--root",
               str(tmp_path)])  # fmt: skip
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------- 9. say what is happening


def test_start_retry_and_mirror_switch_are_said_on_stderr(tmp_path, hostile, quick, capfd):
    hostile.route("/m1/f", raw(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"))
    hostile.route("/m2/f", ok(PAYLOAD))
    t = _target(tmp_path, [f"{hostile.url}/m1/f", f"{hostile.url}/m2/f"])
    download(t, FetchConfig(retries=1, backoff=0, progress=False))
    err = capfd.readouterr().err
    assert f"downloading file.bin (16,384 bytes) from {hostile.url}/m1/f" in err
    assert "retry 1 of 1" in err and "503" in err
    assert f"trying the next mirror, {hostile.url}/m2/f" in err
    assert f"downloading file.bin (16,384 bytes) from {hostile.url}/m2/f" in err


def test_unreachable_host_is_said_at_once(tmp_path, quick, capfd):
    # Port 9 (discard) is closed here: the connection is refused, and the user is told.
    t = _target(tmp_path, ["http://127.0.0.1:9/f"])
    with pytest.raises(DownloadError, match="127.0.0.1:9/f"):
        download(t, _cfg())
    assert "downloading file.bin" in capfd.readouterr().err


def test_verify_compares_the_extracted_copy_with_its_gz(tmp_path, monkeypatch, capsys):
    # Loading reads the extracted idx copy beside a .gz: verify must notice when its bytes
    # changed (size and mtime restored), and --repair rewrites it from the .gz.
    raw_dir, _ = _official_like_root(tmp_path, monkeypatch)
    root = str(tmp_path / "root")
    KMNIST(root, train=False)  # writes the extracted copies
    copy = raw_dir / "t10k-images-idx3-ubyte"
    st = copy.stat()
    data = bytearray(copy.read_bytes())
    data[16:800] = bytes(784)  # image 0 blanked
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main(["verify", "kmnist", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "t10k-images-idx3-ubyte: BAD: differs from t10k-images-idx3-ubyte.gz" in out
    assert main(["verify", "kmnist", "--root", root, "--repair"]) == 0
    assert "t10k-images-idx3-ubyte: repaired (rewritten from the .gz)" in capsys.readouterr().out
    assert main(["verify", "kmnist", "--root", root]) == 0


@pytest.mark.parametrize("mode", ["html", "garbage"])
def test_no_verify_still_refuses_what_is_not_the_file_and_asks_the_next_mirror(
    tmp_path, http_server, fast_net, mode
):
    # Without checksums, the first bytes still tell an HTML page or garbage from a gzip, an
    # npz or a class map: that mirror has failed, nothing lands on disk, the next one serves.
    images, labels = random_split(20)
    good = write_split(tmp_path / "src", "kmnist", "test", images, labels)
    body = b"<!DOCTYPE html><html>not here</html>" if mode == "html" else b"\x00garbage" * 50
    for f in good.iterdir():
        http_server.add(f"/bad/kmnist/{f.name}", body)
        http_server.add(f"/good/kmnist/{f.name}", f.read_bytes())
    mirror_env(fast_net, f"{http_server.url}/bad", f"{http_server.url}/good")
    with pytest.warns(UserWarning, match="verify=False"):
        ds = KMNIST(tmp_path / "root", train=False, download=True, verify=False)
    assert ds.targets.tolist() == labels.tolist()
    raw = tmp_path / "root" / "KMNIST" / "raw"
    assert (raw / "kmnist_classmap.csv").read_bytes().startswith(b"index,codepoint,char")


def test_official_flag_refuses_values_it_does_not_know(monkeypatch):
    from kmnist_torch.download.sources import mirrors

    monkeypatch.delenv("KMNIST_TORCH_MIRRORS", raising=False)
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "off")
    assert mirrors() == []
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "none")
    with pytest.raises(ValueError, match="KMNIST_TORCH_OFFICIAL='none' is not allowed"):
        mirrors()


def test_a_symlink_at_the_final_file_is_kept_never_read(tmp_path, http_server, fast_net):
    # A link may point at the user's own data: loading never follows it and never replaces it
    # unasked (only `verify --repair` or the `download` command replace a file that fails).
    images, labels = random_split(20)
    good = write_split(tmp_path / "src", "kmnist", "test", images, labels)
    for f in good.iterdir():
        http_server.add(f"/kmnist/{f.name}", f.read_bytes())
    mirror_env(fast_net, http_server.url)
    raw = tmp_path / "root" / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"precious")
    (raw / "t10k-labels-idx1-ubyte.gz").symlink_to(precious)
    with pytest.warns(UserWarning, match="verify=False"):
        with pytest.raises(DataFilesError, match="symbolic link") as err:
            KMNIST(tmp_path / "root", train=False, download=True, verify=False)
    assert "--repair" in str(err.value) and "put the file itself there" in str(err.value)
    assert (raw / "t10k-labels-idx1-ubyte.gz").is_symlink()
    assert precious.read_bytes() == b"precious"
