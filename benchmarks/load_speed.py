"""Time to construct the KMNIST train split (60,000 images) from disk: kmnist_torch.KMNIST
against torchvision.datasets.KMNIST on the same root, same run; plus the real test split with
full verification. Median of several loads after a first (cold) one.

    python benchmarks/load_speed.py [--repeats 7] [--out bench-out/load_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import _shared
import torchvision
from _kmnist_fixture import write_train_split

from kmnist_torch import KMNIST


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of the next ``repeats`` calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="bench-out/load_speed.json")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        source = write_train_split(root)
        rows["torchvision KMNIST train (60,000)"] = timed(
            lambda: torchvision.datasets.KMNIST(str(root), train=True), args.repeats
        )
        rows["kmnist_torch KMNIST train (60,000, mnist, verify=False)"] = timed(
            lambda: KMNIST(root, train=True, verify=False), args.repeats
        )
        if (_shared.KMNIST / "kmnist-test-imgs.npz").is_file():
            real = root / "real"
            raw = real / "KMNIST" / "raw"
            raw.mkdir(parents=True)
            for f in (
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
                "kmnist-test-imgs.npz",
                "kmnist-test-labels.npz",
            ):
                shutil.copy(_shared.KMNIST / f, raw / f)
            for fmt in ("mnist", "npz"):
                rows[f"kmnist_torch KMNIST test (10,000 real, {fmt}, verify=True)"] = timed(
                    lambda fmt=fmt: KMNIST(real, train=False, format=fmt), args.repeats
                )
    print(f"data: {source}; {os.cpu_count()} CPU cores")
    print(f"{'load':62s} {'first s':>9s} {'median s':>9s}")
    for k, (first, med) in rows.items():
        print(f"{k:62s} {first:9.3f} {med:9.3f}")
    tv = rows["torchvision KMNIST train (60,000)"][1]
    ours = rows["kmnist_torch KMNIST train (60,000, mnist, verify=False)"][1]
    print(
        f"ratio torchvision / kmnist_torch (train, median): {tv / ours:.2f} (>= 1 means ours "
        "is no slower)"
    )
    result = {
        "benchmark": "load_speed",
        "cpu_count": os.cpu_count(),
        "data_source": source,
        "seconds": {k: {"first": f, "median": m} for k, (f, m) in rows.items()},
        "ratio_torchvision_over_ours": tv / ours,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
