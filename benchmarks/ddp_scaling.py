"""Data-parallel scaling: training images/s of ``torchrun -m kmnist_torch.train`` at world
sizes 1, 2, ... on the CPU (gloo) and, where there are GPUs, on CUDA (NCCL, one GPU a rank).

Every run trains the same recipe at the same global batch on a KMNIST split written by
``_kmnist_fixture`` (real test images tiled, else random ones) and reports the trainer's own
global figure (``images_per_second`` of its ``results.json``: all ranks' images over rank 0's
training time, evaluation excluded). On the CPU the cores are shared out: each of N ranks gets
``cores / N`` threads, so N=2 uses the machine no more than N=1 does.

    python benchmarks/ddp_scaling.py                                  # CPU 1, 2; GPUs 1 .. n
    python benchmarks/ddp_scaling.py --model preact18 --batch-size 256 --train 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _kmnist_fixture import write_train_split

from kmnist_torch.training.runtime import device_name

REPO = Path(__file__).resolve().parent.parent


def run(root: Path, out: Path, device: str, world: int, threads: int, args) -> dict:
    """One torchrun training run; its results.json."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}", "-m", "kmnist_torch.train",
        "--root", str(root), "--no-download", "--no-verify", "--out", str(out), "--overwrite",
        "--device", device, "--no-progress", "--model", args.model,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--limit-train", str(args.train), "--limit-test", "1000",
    ]  # fmt: skip
    # The package may be installed from another checkout: run this one.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"world size {world} on {device} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="simple_cnn", help="simple_cnn (cnn recipe) or preact18")
    p.add_argument("--batch-size", type=int, default=128, help="the global batch")
    p.add_argument("--epochs", type=int, default=2, help="images/s is over all of them")
    p.add_argument("--train", type=int, default=6000, help="training images")
    p.add_argument("--cpu-worlds", default="1,2", help="world sizes on the CPU ('' for none)")
    p.add_argument("--out", default="bench-out/ddp_scaling.json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    plans = [("cpu", int(w)) for w in args.cpu_worlds.split(",") if w.strip()]
    gpus = torch.cuda.device_count()
    plans += [("cuda", w) for w in (1, 2, 4, 8) if w <= gpus]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        source = write_train_split(root, n=args.train)
        for device, world in plans:
            threads = max(1, cores // world) if device == "cpu" else 1
            res = run(root, Path(tmp) / f"{device}-{world}", device, world, threads, args)
            rows.append(
                {
                    "device": device,
                    "device_name": res["device"] if device == "cuda" else device_name("cpu"),
                    "world_size": res["world_size"],
                    "threads_per_rank": threads if device == "cpu" else None,
                    "images_per_second": res["images_per_second"],
                    "train_seconds": sum(e["train_seconds"] for e in res["epochs"]),
                    "last_test_accuracy": res["test_accuracy"],
                }
            )
    base = {r["device"]: r["images_per_second"] for r in rows if r["world_size"] == 1}
    print(f"{args.model}, global batch {args.batch_size}, {args.train} images x {args.epochs}")
    print(f"{'device':<8}{'ranks':>6}{'threads':>8}{'images/s':>12}{'x of 1':>8}")
    for r in rows:
        r["speedup"] = r["images_per_second"] / base[r["device"]] if r["device"] in base else None
        speed = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        print(
            f"{r['device']:<8}{r['world_size']:>6}{r['threads_per_rank'] or '-':>8}"
            f"{r['images_per_second']:>12,.0f}{speed:>8}"
        )
    payload = {
        "benchmark": "ddp_scaling",
        "model": args.model,
        "global_batch": args.batch_size,
        "train_images": args.train,
        "epochs": args.epochs,
        "data": source,
        "machine": f"{platform.machine()}, {cores} CPUs"
        + (f", {gpus} x {torch.cuda.get_device_name(0)}" if gpus else ""),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
