"""What a hostile server costs a download: the time to give up on a server that drips one byte
a second (in the status line, so no per-read timeout ever fires), and the bytes written against
servers that never stop sending (a file of known size, and one of unknown size under the cap).

Run from the repository root, so this checkout's package is the one measured:

    python -m benchmarks.hostile_server [--grace 5] [--min-rate 16384] [--cap 67108864]

Prints a table and writes ``bench-out/hostile_server.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socketserver
import tempfile
import threading
import time
from pathlib import Path

from kmnist_torch.download import fetch
from kmnist_torch.download.fetch import Target, download
from kmnist_torch.errors import DownloadError
from kmnist_torch.settings import FetchConfig

KNOWN_SIZE = 5_000  # a file the size of a class map


class _Server:
    """A raw-socket HTTP server on 127.0.0.1 with one behaviour per path; counts bytes sent."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.stop = threading.Event()
        state = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = self.request.recv(4096)
                    if not data:
                        return
                    buf += data
                path = buf.split(b" ", 2)[1].decode()
                state.sent[path] = 0

                def send(b: bytes) -> None:
                    self.request.sendall(b)
                    state.sent[path] += len(b)

                try:
                    if path == "/drip":
                        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n":
                            if state.stop.is_set():
                                return
                            send(bytes([byte]))
                            time.sleep(1.0)
                    else:  # /endless: 200, no Content-Length, zeros until the client hangs up
                        send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                        chunk = bytes(1 << 16)
                        while not state.stop.is_set():
                            send(chunk)
                except OSError:
                    pass

        class TCP(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = TCP(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _watch_size(path: Path, out: list[int], done: threading.Event) -> None:
    """Record the largest size ``path`` reaches (polled every millisecond)."""
    while not done.is_set():
        try:
            out[0] = max(out[0], os.stat(path).st_size)
        except OSError:
            pass
        time.sleep(0.001)


def _run(target: Target, config: FetchConfig) -> tuple[float, int, str]:
    """(seconds to give up, largest size the partial file reached, the error's first line)."""
    part = target.dest.with_name(target.dest.name + ".part")
    peak, done = [0], threading.Event()
    discard = fetch.discard_partial

    def measured_discard(path: Path) -> None:  # the size of a partial just before it goes
        try:
            peak[0] = max(peak[0], os.lstat(path).st_size)
        except OSError:
            pass
        discard(path)

    fetch.discard_partial = measured_discard
    watcher = threading.Thread(target=_watch_size, args=(part, peak, done), daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        download(target, config)
        error = "(no error: downloaded)"
    except DownloadError as exc:
        error = str(exc).splitlines()[1].strip()
    elapsed = time.monotonic() - start
    fetch.discard_partial = discard
    done.set()
    watcher.join()
    return elapsed, peak[0], error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grace", type=float, default=5.0, help="$KMNIST_TORCH_GRACE (s)")
    p.add_argument("--min-rate", type=float, default=16384.0, help="$KMNIST_TORCH_MIN_RATE")
    p.add_argument("--cap", type=int, default=64 << 20, help="$KMNIST_TORCH_MAX_BYTES")
    p.add_argument("--out", default="bench-out/hostile_server.json")
    args = p.parse_args()
    config = FetchConfig(timeout=30.0, retries=3, backoff=1.0, min_rate=args.min_rate,
                         grace=args.grace, max_bytes=args.cap, progress=False,
                         log=lambda m: None)  # fmt: skip
    server = _Server()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cases = [
                ("drip 1 byte/s in the status line", "/drip", KNOWN_SIZE),
                ("endless body, known size 5000 B", "/endless", KNOWN_SIZE),
                (f"endless body, unknown size (cap {args.cap} B)", "/endless", None),
            ]
            for i, (what, path, size) in enumerate(cases):
                target = Target(dest=Path(tmp) / f"file{i}.bin", urls=[server.url + path],
                                size=size)  # fmt: skip
                bound = config.deadline_for(size if size is not None else args.cap)
                elapsed, peak, error = _run(target, config)
                rows.append({
                    "case": what,
                    "deadline_s": round(bound, 2),
                    "gave_up_after_s": round(elapsed, 2),
                    "bytes_written_peak": peak,
                    "bytes_server_sent": server.sent.get(path, 0),
                    "files_left": sorted(q.name for q in Path(tmp).iterdir()),
                    "error": error,
                })  # fmt: skip
    finally:
        server.close()
    print(f"{'case':46s} {'deadline s':>10s} {'gave up s':>9s} {'written B':>11s}  error")
    for r in rows:
        print(f"{r['case']:46s} {r['deadline_s']:>10.1f} {r['gave_up_after_s']:>9.2f} "
              f"{r['bytes_written_peak']:>11,}  {r['error'][:70]}")  # fmt: skip
    doc = {
        "settings": {
            "grace_s": args.grace,
            "min_rate_Bps": args.min_rate,
            "cap_B": args.cap,
            "timeout_s": 30.0,
            "retries": 3,
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },  # fmt: skip
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
