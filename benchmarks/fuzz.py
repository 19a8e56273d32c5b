"""The readers of outside bytes under hostile input, at full size: for each class (idx, gzip,
npz, PNG, settings) the worst peak memory (``ru_maxrss`` of a subprocess, less the same
subprocess reading nothing) and the worst time, over named hostile files built at the real
bounds (1 GiB arrays, gzip and zip bombs, a FIFO, a sparse 3 GiB file, 100,000-character
settings), then a long Hypothesis run of the suite's properties (``tests/test_fuzz.py``) with
many more examples.

Run from the repository root, so this checkout's package is the one measured:

    python benchmarks/fuzz.py [--examples 2000] [--quick]

Prints a table and writes ``bench-out/fuzz.json``. ``--quick`` leaves out the 1 GiB files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
# One hostile read in a fresh interpreter: prints the outcome as JSON on stdout.
_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from kmnist_torch.data import formats
from kmnist_torch import settings
from kmnist_torch.errors import UserError
kind, path = sys.argv[2], sys.argv[3]
readers = {
    "idx3": lambda: formats.read_idx(path, 3),
    "idx1": lambda: formats.read_idx(path, 1),
    "gzip": lambda: formats.read_gzip(path),
    "npz": lambda: formats.read_npz(path, (-1, 28, 28)),
    "png": lambda: formats.read_gray_png(path, (64, 64)),
    "setting": lambda: settings.setting(path, 1, path.endswith(("RETRIES", "BYTES", "WORKERS"))),
    "flag": lambda: settings.env_flag(path, True),
    "none": lambda: None,
}
t = time.perf_counter()
try:
    out = readers[kind]()
    size = out.nbytes if hasattr(out, "nbytes") else len(out) if hasattr(out, "__len__") else None
    outcome = "returned " + (f"{size} bytes" if size is not None else repr(out)[:80])
except UserError as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:160]}"
secs = time.perf_counter() - t
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print(json.dumps({"seconds": secs, "outcome": outcome,
                  "hwm_mib": int(hwm[0].split()[1]) / 1024 if hwm else None}))
"""


def run_child(kind: str, path: str, env: dict | None = None) -> dict:
    """One read in a subprocess: its outcome, its seconds, and its peak RSS in MiB."""
    with tempfile.TemporaryFile() as out_fh, tempfile.TemporaryFile() as err_fh:
        argv = [sys.executable, "-c", _CHILD, str(ROOT), kind, path]
        env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(argv, stdout=out_fh, stderr=err_fh, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # a file, not a pipe: it never fills up
        out_fh.seek(0)
        err_fh.seek(0)
        out, err = out_fh.read(), err_fh.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:  # anything but a return or a UserError is a finding
        return {"seconds": None, "outcome": f"CRASH rc={proc.returncode}: {err.decode()[-400:]}",
                "rss_mib": usage.ru_maxrss / 1024}  # fmt: skip
    row = json.loads(out)
    row["rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return row


def _idx_header(dims: tuple[int, ...]) -> bytes:
    return (0x800 | len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def _gzip_of_zeros(path: Path, head: bytes, n_zeros: int) -> None:
    """A gzip of ``head`` then ``n_zeros`` zero bytes, written a MiB at a time (a bomb: about
    1,000 times smaller than what it inflates to)."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh:
        fh.write(comp.compress(head))
        for start in range(0, n_zeros, len(zeros)):
            fh.write(comp.compress(zeros[: min(len(zeros), n_zeros - start)]))
        fh.write(comp.flush())


def _npy_header(shape: tuple[int, ...], version: int = 1, pad_to: int = 0) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    d = {"descr": "|u1", "fortran_order": False, "shape": shape}
    if version == 1:
        np.lib.format.write_array_header_1_0(buf, d)
        return buf.getvalue()
    text = repr(d).encode("latin-1").ljust(pad_to, b" ")
    return b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text


def _zip_stream(path: Path, member: str, head: bytes, n_zeros: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        with zf.open(member, "w", force_zip64=True) as out:
            out.write(head)
            zeros = bytes(1 << 20)
            for start in range(0, n_zeros, len(zeros)):
                out.write(zeros[: min(len(zeros), n_zeros - start)])


def hostile_files(folder: Path, quick: bool) -> list[tuple[str, str, str, str]]:
    """(class, case, reader, path) for every named hostile input, written into ``folder``."""
    import numpy as np

    cases: list[tuple[str, str, str, str]] = []
    n_gib = (GIB // 784) if not quick else 1000  # the most 28x28 images under the 1 GiB cap
    f = folder / "bomb-valid.gz"
    _gzip_of_zeros(f, _idx_header((n_gib, 28, 28)), n_gib * 784)
    cases.append(("idx", f"valid idx.gz of {n_gib:,} images (at the cap), 1,000x compressed",
                  "idx3", str(f)))  # fmt: skip
    f = folder / "bomb-more.gz"
    _gzip_of_zeros(f, _idx_header((10, 28, 28)), (GIB if not quick else 64 << 20))
    cases.append(("idx", "idx.gz: 10 images claimed, 1 GiB of data behind them", "idx3", str(f)))
    f = folder / "claims.gz"
    _gzip_of_zeros(f, _idx_header((4_000_000_000, 28, 28)), 1 << 20)
    cases.append(("idx", "idx.gz header claiming 4e9 x 28 x 28", "idx3", str(f)))
    f = folder / "plain-short.idx"
    f.write_bytes(_idx_header((1_000_000, 28, 28)) + bytes(1000))
    cases.append(("idx", "plain idx claiming 784 MB, 1,000 bytes there", "idx3", str(f)))
    f = folder / "magic.gz"
    f.write_bytes(gzip.compress(_idx_header((7840,)) + bytes(7840)))
    cases.append(("idx", "labels magic where images belong (verify=False)", "idx3", str(f)))
    f = folder / "gzip-bomb.gz"
    _gzip_of_zeros(f, b"", GIB + (1 << 20) if not quick else 64 << 20)
    cases.append(("gzip", "gzip of 1 GiB + 1 MiB zeros, no idx header", "gzip", str(f)))
    f = folder / "npz-valid.npz"
    _zip_stream(f, "arr_0.npy", _npy_header((n_gib, 28, 28)), n_gib * 784)
    cases.append(("npz", f"valid npz of {n_gib:,} images (at the cap), deflated", "npz", str(f)))
    f = folder / "npz-claims.npz"
    _zip_stream(f, "arr_0.npy", _npy_header((10**12, 28, 28)), 1000)
    cases.append(("npz", "npy header claiming 1e12 x 28 x 28", "npz", str(f)))
    f = folder / "npz-header.npz"
    _zip_stream(f, "arr_0.npy", _npy_header((10, 28, 28), 2, 64 << 20), 7840)
    cases.append(("npz", "npy v2 header of 64 MiB", "npz", str(f)))
    f = folder / "npz-directory.npz"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for i in range(200_000):
            zf.writestr(f"{i}.npy", b"")
    cases.append(("npz", "zip with 200,000 entries", "npz", str(f)))
    f = folder / "sparse.npz"
    with open(f, "wb") as fh:
        fh.write(b"PK")
        fh.truncate(3 * GIB)
    cases.append(("npz", "sparse 3 GiB file", "npz", str(f)))
    cases += _png_cases(folder, np)
    for k, reader in (("fifo-idx", "idx3"), ("fifo-npz", "npz"), ("fifo-png", "png")):
        os.mkfifo(folder / k)
        cases.append(({"idx3": "idx", "npz": "npz", "png": "png"}[reader], "a FIFO", reader,
                      str(folder / k)))  # fmt: skip
    return cases


def _png_cases(folder: Path, np) -> list[tuple[str, str, str, str]]:
    from PIL import Image

    cases = []
    f = folder / "sparse.png"
    with open(f, "wb") as fh:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
        fh.write(buf.getvalue())
        fh.truncate(3 * GIB)
    cases.append(("png", "sparse 3 GiB .png", "png", str(f)))
    f = folder / "huge.png"
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # 400 MB of pixels in 400 KB
    f.write_bytes(buf.getvalue())
    cases.append(("png", "20000x20000 PNG (decompression bomb, 400 KB)", "png", str(f)))
    f = folder / "lying.png"
    data = bytearray(buf.getvalue())
    data[16:24] = (64).to_bytes(4, "big") * 2  # the header says 64x64, the data is 20000x20000
    f.write_bytes(bytes(data))
    cases.append(("png", "IHDR says 64x64, data of 20000x20000", "png", str(f)))
    return cases


def setting_cases() -> list[tuple[str, str, str, str, dict]]:
    big = "9" * 100_000  # under the kernel's 128 KiB limit for one environment string
    return [
        ("settings", f"{name}={value[:12]}{'...' if len(value) > 12 else ''}", "setting", name,
         {name: value})
        for name in ("KMNIST_TORCH_TIMEOUT", "KMNIST_TORCH_RETRIES", "KMNIST_TORCH_MIN_RATE")
        for value in ("1e300", "1e-300", str(10**18), big)
    ] + [("settings", "KMNIST_TORCH_OFFICIAL=100,000 chars", "flag", "KMNIST_TORCH_OFFICIAL",
          {"KMNIST_TORCH_OFFICIAL": "y" * 100_000})]  # fmt: skip


def run_hypothesis(examples: int) -> dict:
    """The suite's fuzz tests with ``examples`` examples each, in one pytest subprocess."""
    env = {**os.environ, "KMNIST_FUZZ_EXAMPLES": str(examples), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py",
         "-k", "any or damaged or every_setting", "--durations=0"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if " call " in ln]
    return {"examples_per_test": examples, "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - t, 1), "durations": lines,
            "tail": proc.stdout.splitlines()[-3:]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=2000,
                   help="Hypothesis examples per fuzz test (the suite runs 100)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="leave out the 1 GiB files")
    p.add_argument("--out", default="bench-out/fuzz.json")
    p.add_argument("--build-into", help=argparse.SUPPRESS)  # the files, from a subprocess
    args = p.parse_args(argv)
    if args.build_into:
        print(json.dumps(hostile_files(Path(args.build_into), args.quick)))
        return 0
    rows = []
    base = run_child("none", "")
    print(f"baseline (interpreter + numpy, reading nothing): {base['rss_mib']:.0f} MiB")
    with tempfile.TemporaryDirectory(prefix="kmnist-fuzz-") as tmp:
        # Written by a subprocess: Linux carries a process's peak RSS through fork and exec, so
        # a parent that had built the files would show its own peak in every child's ru_maxrss.
        built = subprocess.run([sys.executable, __file__, "--build-into", tmp]
                               + ["--quick"] * args.quick, capture_output=True, text=True,
                               check=True)  # fmt: skip
        cases = [(*c, {}) for c in json.loads(built.stdout)] + setting_cases()
        for cls, case, reader, path, env in cases:
            r = run_child(reader, path, env)
            r.update({"class": cls, "case": case, "extra_mib": r["rss_mib"] - base["rss_mib"]})
            rows.append(r)
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
            print(f"{cls:8} {case[:52]:52} {secs:>6} s {r['extra_mib']:6.0f} MiB  "
                  f"{r['outcome'][r['outcome'].find(': ') + 2:][:60]}")  # fmt: skip
    worst = {}
    for r in rows:
        w = worst.setdefault(r["class"], {"seconds": 0.0, "extra_mib": 0.0})
        w["seconds"] = max(w["seconds"], r["seconds"] or 0.0)
        w["extra_mib"] = max(w["extra_mib"], r["extra_mib"])
    print("\nworst per class:", json.dumps(worst, indent=1))
    hyp = run_hypothesis(args.examples) if args.examples else None
    if hyp:
        print(f"\nHypothesis, {args.examples} examples per test: rc {hyp['returncode']}, "
              f"{hyp['seconds']} s; " + " ".join(hyp["tail"]))  # fmt: skip
    crashes = [r for r in rows if r["outcome"].startswith("CRASH")]
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
           "baseline_mib": base["rss_mib"], "cases": rows, "worst": worst,
           "hypothesis": hyp}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")
    return 1 if crashes or (hyp and hyp["returncode"]) else 0


if __name__ == "__main__":
    sys.exit(main())
