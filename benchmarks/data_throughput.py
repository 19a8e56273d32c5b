"""One shuffled epoch of the KMNIST train split in batches of 256: TensorLoader against
torchvision's KMNIST + ToTensor() + DataLoader (workers 0 and 2), same machine, same run.

    python benchmarks/data_throughput.py [--device cpu|cuda] [--out bench-out/data_throughput.json]

Prints images/s and the ratio; writes JSON. Target: TensorLoader at least 50x the per-item path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from _kmnist_fixture import write_train_split
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from kmnist_torch import KMNIST, TensorLoader
from kmnist_torch.training.runtime import device_name


def epoch_images_per_second(loader, device: torch.device) -> float:
    """Iterate one epoch, touching each batch on ``device``; images per second."""
    n = 0
    checksum = torch.zeros((), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        checksum += x.sum() + y.to(device).sum()
        n += len(y)
    float(checksum)  # waits for the device
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="bench-out/data_throughput.json")
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_train_split(root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # verify=False: the tiled split has no catalog md5
            ours = KMNIST(root, train=True, verify=False)
        rows = {}
        loader = TensorLoader(ours, args.batch_size, shuffle=True, device=device, seed=0)
        epoch_images_per_second(loader, device)  # warm-up (device copy, allocator)
        rows["kmnist_torch.TensorLoader"] = epoch_images_per_second(loader, device)
        tv = torchvision.datasets.KMNIST(str(root), train=True, transform=ToTensor())
        for workers in (0, 2):
            dl = DataLoader(
                tv,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                pin_memory=device.type == "cuda",
            )
            rows[f"torchvision KMNIST+ToTensor+DataLoader(workers={workers})"] = (
                epoch_images_per_second(dl, device)
            )
    ref = max(v for k, v in rows.items() if k.startswith("torchvision"))
    ratio = rows["kmnist_torch.TensorLoader"] / ref
    print(
        f"one shuffled epoch of 60,000 KMNIST-format images, batch {args.batch_size}, "
        f"device {device}, {os.cpu_count()} CPU cores"
    )
    print(f"data: {source}")
    print(f"{'loader':58s} {'images/s':>12s}")
    for k, v in rows.items():
        print(f"{k:58s} {v:>12,.0f}")
    print(f"ratio TensorLoader / best torchvision DataLoader: {ratio:.1f}x (target >= 50x)")
    result = {
        "benchmark": "data_throughput",
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "images": 60000,
        "data_source": source,
        "images_per_second": rows,
        "ratio_vs_best_torchvision": ratio,
        "target_ratio": 50,
        "meets_target": ratio >= 50,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
