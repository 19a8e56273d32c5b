"""What hostile inputs cost the after-training commands: each case is one real command line
(``predict``, ``evaluate``) in a fresh process, given a hostile model file, image or run folder;
the table shows its exit code, its last stderr line, its wall time and its peak memory (the
child's own ``ru_maxrss``, from ``os.wait4``), beside the same command on good inputs.

Run from the repository root, so this checkout's package is the one measured:

    python benchmarks/hostile_after.py [--out bench-out/hostile_after.json] [--fuzz 2000]

``--fuzz N`` then runs ``tests/test_fuzz_after.py`` with N examples per property.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, as the children get it


def _child(argv: list[str], timeout: float = 600) -> dict:
    """Run ``argv`` and return its exit code, last stderr line, wall seconds and peak MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    tail = lines[-1] if lines else ""
    return {
        "exit": proc.returncode,
        "last_line": tail[:160],
        "traceback": any(ln.startswith("Traceback") for ln in lines),
        "seconds": round(wall, 2),
        "peak_mib": round(usage.ru_maxrss / 1024, 1),
    }


def _model_cases(work: Path) -> dict[str, Path]:
    import torch

    from kmnist_torch.models.metadata import meta_sha256

    good = work / "run" / "model.pt"
    doc = torch.load(good, weights_only=True)

    def edited(name: str, resign: bool = True, **meta) -> Path:
        new = {**doc, "meta": {**doc["meta"], **meta}}
        if resign:
            new["meta_sha256"] = meta_sha256(new["meta"])
        torch.save(new, work / name)
        return work / name

    huge = {"num_classes": 10**7, "in_chans": 1, "img_size": 28}
    cases = {
        "good model.pt": good,
        "10**7 classes (re-signed)": edited("classes.pt", model_args=huge, classes=["a"] * 10**5),
        "img_size 4096 (re-signed)": edited(
            "size.pt", model_args={**huge, "num_classes": 10, "img_size": 4096}
        ),
        "image_size 10**6 (re-signed)": edited("image.pt", image_size=10**6),
        "classes edited, not re-signed": edited("edit.pt", False, classes=list("abcdefghij")),
    }
    weights = dict(doc["state_dict"])
    weights["fc1.weight"] = torch.zeros(1).expand(*weights["fc1.weight"].shape)
    torch.save({**doc, "state_dict": weights}, work / "stride0.pt")
    cases["a weight of stride 0 over 4 bytes"] = work / "stride0.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(work / "deflated.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    cases["deflated zip entries"] = work / "deflated.pt"
    raw = bytearray(good.read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 10 : end + 16] = struct.pack("<HI", 0xFFFF, 0xFFFFFFF0)  # a vast directory
    (work / "directory.pt").write_bytes(bytes(raw))
    cases["zip directory claiming 4 GB"] = work / "directory.pt"
    with open(work / "sparse.pt", "wb") as fh:
        fh.truncate((1 << 30) + 1)
    cases["1 GiB + 1 sparse file"] = work / "sparse.pt"
    return cases


def _image_cases(work: Path) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    from kmnist_torch import predict

    side = predict.MAX_SIDE
    rng = np.random.default_rng(0)
    cases = {}
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(work / "good.png")
    cases["good 28x28 PNG"] = work / "good.png"
    Image.new("L", (100_000, 1), 255).save(work / "strip.png")
    cases["1 x 100,000 PNG"] = work / "strip.png"
    # The largest images accepted, compressible (under the file-size bound) but fully decoded.
    tile = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(np.tile(tile, (side // 64, side // 64, 1)), "RGBA").save(work / "rgba.png")
    cases[f"{side} x {side} RGBA PNG (largest accepted)"] = work / "rgba.png"
    ramp = np.tile(np.linspace(0, 1, side, dtype=np.float32), (side, 1))
    Image.fromarray(ramp, "F").save(work / "f.tif", compression="tiff_adobe_deflate")
    cases[f"{side} x {side} float TIFF (deflated)"] = work / "f.tif"
    Image.new("L", (3, side), 255).save(work / "tall.png")
    cases[f"3 x {side} PNG (padded to {side} x {side})"] = work / "tall.png"
    header = bytearray((work / "good.png").read_bytes())
    header[16:24] = struct.pack(">II", 50_000, 50_000)
    header[29:33] = struct.pack(">I", zlib.crc32(bytes(header[12:29])))
    (work / "claims.png").write_bytes(bytes(header))
    cases["PNG header claiming 50,000 x 50,000"] = work / "claims.png"
    os.mkfifo(work / "fifo.png")
    cases["a FIFO"] = work / "fifo.png"
    with open(work / "sparse.png", "wb") as fh:
        fh.truncate(predict.MAX_FILE_BYTES + 1)
    cases["64 MiB + 1 sparse file"] = work / "sparse.png"
    return cases


def _run_cases(work: Path) -> dict[str, Path]:
    good = work / "run"
    cases = {"good run folder": good}

    def folder(name: str, results: bytes | None = None) -> Path:
        path = work / name
        path.mkdir()
        (path / "model.pt").write_bytes((good / "model.pt").read_bytes())
        if results is not None:
            (path / "results.json").write_bytes(results)
        return path

    os.mkfifo(folder("fifo") / "results.json")
    cases["results.json a FIFO"] = work / "fifo"
    with open(folder("sparse") / "results.json", "wb") as fh:
        fh.truncate(1 << 30)
    cases["results.json 1 GiB sparse"] = work / "sparse"
    cases["results.json 8 MB of '['"] = folder("deep", b"[" * (8 << 20))
    zeros = b"[" + b"0," * ((8 << 20) // 2 - 2) + b"0]"
    cases["results.json 8 MB list of zeros"] = folder("zeros", zeros)
    linked = folder("linked", (good / "results.json").read_bytes())
    (work / "outside").mkdir()
    (linked / "eval-test").symlink_to(work / "outside")
    cases["eval-test a link outside"] = linked
    return cases


def _prepare(work: Path) -> None:
    import numpy as np
    import torch

    from kmnist_torch import catalog
    from kmnist_torch.data.resplit import write_split
    from kmnist_torch.models.modelfile import model_meta, save_model
    from kmnist_torch.models.registry import create_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    labels = (np.arange(1000) % 10).astype(np.uint8)
    write_split(work / "data", "kmnist", "test", images, labels, fmt="mnist")
    args = {"num_classes": 10, "in_chans": 1, "img_size": 28}
    torch.manual_seed(0)
    chars = [c.char for c in catalog.KMNIST.classes]
    meta = model_meta("simple_cnn", args, "kmnist", chars, recipe_name="cnn", data={})
    (work / "run").mkdir()
    save_model(work / "run" / "model.pt", create_model("simple_cnn", **args), meta)
    config = {"dataset": "kmnist", "root": str(work / "data"), "limit_test": None}
    (work / "run" / "results.json").write_text(json.dumps({"config": config}))


def _prepare_all(work: Path) -> list[tuple[str, str, list[str]]]:
    """Write every case under ``work``; (kind, case, argv) for each."""
    _prepare(work)
    py = [sys.executable, "-m"]
    cases = []
    for name, path in _model_cases(work).items():
        argv = [*py, "kmnist_torch.predict", str(path), str(work / "good.png")]
        cases.append(("model file", name, argv))
    for name, path in _image_cases(work).items():
        cases.append(("image", name, [*py, "kmnist_torch.predict", str(work / "run"), str(path)]))
    for name, path in _run_cases(work).items():
        argv = [*py, "kmnist_torch.evaluate", str(path), "--device", "cpu", "--no-verify"]
        cases.append(("run folder", name, argv))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out/hostile_after.json")
    parser.add_argument("--fuzz", type=int, default=0, metavar="N", help="examples per property")
    parser.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:  # in a child: torch never enters the measuring process
        print(json.dumps(_prepare_all(Path(args.prepare))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # A child's peak memory starts at its parent's size (Linux keeps the high-water mark
        # across fork and exec): this process stays small, and the cases are written by another.
        made = subprocess.run(
            [sys.executable, __file__, "--prepare", tmp], capture_output=True, text=True, check=True
        )
        for kind, name, argv in json.loads(made.stdout):
            rows.append({"kind": kind, "case": name, **_child(argv)})
            print(_line(rows[-1]), flush=True)
    doc = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
           "cpus": os.cpu_count(), "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.fuzz:
        env = {**os.environ, "FUZZ_AFTER_EXAMPLES": str(args.fuzz), "PYTHONPATH": str(ROOT)}
        test = [sys.executable, "-m", "pytest", "-q", "tests/test_fuzz_after.py", "--durations=0"]
        return subprocess.call(test, cwd=ROOT, env=env)
    return 0


def _line(row: dict) -> str:
    return (
        f"{row['kind']:>10} | {row['case']:<42} | exit {row['exit']:>3} | "
        f"{row['seconds']:6.2f} s | {row['peak_mib']:7.1f} MiB | {row['last_line'][:90]}"
    )


if __name__ == "__main__":
    sys.exit(main())
