"""Shared fixtures: a real HTTP server on 127.0.0.1 with scripted failures, the real files in
../shared/data/real (skipped cleanly where absent), a root holding some of them and a mirror
serving them, and writers of the official formats."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

SHARED_REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real"


class Server:
    """An HTTP/1.1 file server on 127.0.0.1 whose answers can be scripted per path.

    ``add(path, data)`` serves bytes; ``script(path, *actions)`` makes the next requests of that
    path answer, in order: ``404``/``500``/any status, ``"drop:N"`` (send the headers of the
    whole file, N bytes, then close), ``"stall"`` (send nothing until the client gives up),
    ``"norange"`` (ignore a Range header). Every request is kept in ``requests`` as
    ``(path, headers)``.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.actions: dict[str, deque] = defaultdict(deque)
        self.requests: list[tuple[str, dict]] = []
        self.stop = threading.Event()
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                state.requests.append((path, dict(self.headers)))
                action = state.actions[path].popleft() if state.actions[path] else None
                if action == "stall":
                    state.stop.wait(30)
                    return
                if isinstance(action, int):
                    self.send_error(action)
                    return
                data = state.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and action != "norange" and rng.startswith("bytes="):
                    start = int(rng[6:].split("-", 1)[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if isinstance(action, str) and action.startswith("drop:"):
                    self.wfile.write(body[: int(action[5:])])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, data: bytes) -> None:
        """Serve ``data`` at ``path`` (starting with "/")."""
        self.files[path] = data

    def add_file(self, path: str, file: os.PathLike | str) -> None:
        """Serve the bytes of a file on disk at ``path``."""
        self.files[path] = Path(file).read_bytes()

    def script(self, path: str, *actions) -> None:
        """Make the next requests of ``path`` answer with ``actions``, in order."""
        self.actions[path].extend(actions)

    def hits(self, path: str) -> list[dict]:
        """The headers of every request made for ``path``."""
        return [h for p, h in self.requests if p == path]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def one_thread():
    """The machine is shared: keep a training test on one core (``pytestmark`` of the model,
    mixup and trainer tests, and the KKanji trainer test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def http_server():
    """A fresh scripted HTTP server on 127.0.0.1."""
    server = Server()
    yield server
    server.close()


@pytest.fixture
def fast_net(monkeypatch):
    """Short timeouts and no back-off, so failure tests take seconds; no official host."""
    monkeypatch.setenv("KMNIST_TORCH_TIMEOUT", "1")
    monkeypatch.setenv("KMNIST_TORCH_RETRIES", "2")
    monkeypatch.setenv("KMNIST_TORCH_BACKOFF", "0")
    monkeypatch.delenv("KMNIST_TORCH_MIRRORS", raising=False)
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "0")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return monkeypatch


def mirror_env(monkeypatch, *bases: str) -> None:
    """Point the package at these mirror bases only (the official host stays last)."""
    monkeypatch.setenv("KMNIST_TORCH_MIRRORS", ",".join(bases))


@pytest.fixture
def real_dir():
    """../shared/data/real, or skip where this checkout has no copy of it."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real Kuzushiji files not available ({SHARED_REAL} is absent)")
    return SHARED_REAL


@pytest.fixture
def real_root(real_dir, tmp_path):
    """Real official files placed by hand in a root: ``real_root(*names, dataset="kmnist",
    fmt="mnist", gunzip=False)`` copies each of ``names`` (paths under
    ``../shared/data/real/<dataset>``; default: the dataset's official test split in ``fmt``)
    into ``tmp_path/<Folder>/raw`` under its own file name (with ``gunzip``, decompressed to the
    name without ``.gz``, as torchvision extracts it) and returns that raw folder. Call it again
    to add files. A test asking for it needs ``real_dir``, so it is marked ``real_data``."""

    def put(*names: str, dataset: str = "kmnist", fmt: str = "mnist", gunzip: bool = False):
        from kmnist_torch import catalog

        info = catalog.get(dataset)
        raw = tmp_path / info.folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in names or [f.name for f in info.splits["test"][fmt]]:
            src = real_dir / dataset / name
            if gunzip:
                (raw / src.name.removesuffix(".gz")).write_bytes(gzip.decompress(src.read_bytes()))
            else:
                shutil.copy(src, raw / src.name)
        return raw

    return put


@pytest.fixture
def real_mirror(http_server, fast_net, real_dir):
    """A mirror on 127.0.0.1 serving the real official KMNIST and K49 files there are (the
    only mirror: no official host)."""
    for sub in ("kmnist", "k49"):
        for f in sorted((real_dir / sub).iterdir()):
            if f.is_file():
                http_server.add(f"/{sub}/{f.name}", f.read_bytes())
    mirror_env(fast_net, http_server.url)
    return http_server


def make_target(dest_dir: Path, urls: list[str], data: bytes, **kw):
    """A download target for ``data``: its size, md5 and sha256, at ``dest_dir/file.bin``."""
    import hashlib

    from kmnist_torch.download.fetch import Target

    return Target(
        dest=dest_dir / "file.bin",
        urls=urls,
        size=len(data),
        md5=hashlib.md5(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
        **kw,
    )


TIMING = {"images_per_second", "train_seconds", "test_seconds"}


def epoch_numbers(res: dict) -> list[dict]:
    """A run's per-epoch records without the timings: what two runs must agree on."""
    return [{k: v for k, v in e.items() if k not in TIMING} for e in res["epochs"]]


def run_script_json(tmp_path: Path, name: str, text: str):
    """Run ``text`` as the script ``tmp_path / name`` in a fresh Python with the repository on
    its path (a process of its own, as the harness is); what it printed, read as JSON."""
    script = tmp_path / name
    script.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_data: needs the real files in ../shared/data/real (skips cleanly)"
    )


def pytest_collection_modifyitems(config, items):
    """Every test that asks for the real files carries the ``real_data`` marker, so
    ``-m "not real_data"`` runs exactly what a fresh clone without ../shared can run."""
    for item in items:
        if "real_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
