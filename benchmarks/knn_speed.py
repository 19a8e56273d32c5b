"""The 4-NN baseline: kmnist_torch.models.knn.knn_predict against scikit-learn, same data, same run.

Real images where ../shared is beside the checkout (the KMNIST test split re-split into
--train/--test images), else synthetic uint8 images of those sizes. Prints a table, writes JSON
(--out), and exits 1 if the two disagree on any prediction.

    python benchmarks/knn_speed.py                       # 8,000 / 2,000 real images
    python benchmarks/knn_speed.py --train 60000 --test 10000 --synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import _shared
import numpy as np
import torch

from kmnist_torch.data import formats
from kmnist_torch.models.knn import default_device, knn_predict
from kmnist_torch.training.runtime import device_name


def load_data(
    n_train: int, n_test: int, synthetic: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(train images, train labels, test images, test labels, description of the source)."""
    real = None if synthetic else _shared.real_kmnist_test_npz()
    if real is not None:
        images_file = real[0]
        images = formats.read_npz(images_file, (-1, 28, 28))
        labels = formats.read_npz(real[1], (-1,))
        if n_train + n_test > len(images):
            raise SystemExit(
                f"the real KMNIST test split has {len(images)} images, fewer than "
                f"--train {n_train} + --test {n_test}; pass --synthetic for larger sizes"
            )
        source = f"real KMNIST test split ({images_file}), first {n_train} / next {n_test}"
        return (
            images[:n_train],
            labels[:n_train],
            images[n_train : n_train + n_test],
            labels[n_train : n_train + n_test],
            source,
        )
    rng = np.random.default_rng(seed)

    # Sparse strokes on black, like the characters, so the neighbours are not all equidistant.
    def fake(n: int) -> np.ndarray:
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        return np.where(rng.random((n, 28, 28)) < 0.25, x, 0).astype(np.uint8)

    return (
        fake(n_train),
        rng.integers(0, 10, n_train),
        fake(n_test),
        rng.integers(0, 10, n_test),
        f"synthetic uint8 images (seed {seed})",
    )


def time_ours(train, labels, test, device, batch_size, repeats, candidates=None, screen=None):
    """Best wall time over ``repeats`` runs (after one warm-up on CUDA) and the predictions."""
    if device.type == "cuda":
        knn_predict(train[:1000], labels[:1000], test[:100], device=device)
    best, pred = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pred = knn_predict(
            train,
            labels,
            test,
            batch_size=batch_size,
            device=device,
            candidates=candidates,
            screen=screen,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, pred.numpy()


def time_sklearn(train, labels, test, n_jobs, repeats):
    """Best wall time of fit + predict, as upstream's script runs it, and the predictions."""
    from sklearn.neighbors import KNeighborsClassifier

    best, pred = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf = KNeighborsClassifier(n_neighbors=4, weights="distance", n_jobs=n_jobs)
        clf.fit(train.reshape(len(train), -1), labels)
        pred = clf.predict(test.reshape(len(test), -1))
        best = min(best, time.perf_counter() - t0)
    return best, pred


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; return the exit status (1 if predictions disagree)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=8000, help="training images (default 8000)")
    p.add_argument("--test", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--synthetic", action="store_true", help="synthetic images even if real exist")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="test images per batch (auto)")
    p.add_argument("--candidates", type=int, default=None, help="the screen's shortlist (0: off)")
    p.add_argument(
        "--screen",
        choices=["default", "on", "off"],
        default="default",
        help="the projection screen (kmnist_torch.models.knn_pca): default, on or off",
    )
    p.add_argument("--repeats", type=int, default=1, help="best of N runs (default 1)")
    p.add_argument("--sklearn-jobs", type=int, default=-1, help="n_jobs (upstream: -1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/knn_speed.json")
    args = p.parse_args(argv)

    import sklearn

    device = torch.device(args.device) if args.device else default_device()
    train, labels, test, truth, source = load_data(args.train, args.test, args.synthetic, args.seed)
    screen = {"default": None, "on": True, "off": False}[args.screen]
    ours_s, ours = time_ours(
        train, labels, test, device, args.batch_size, args.repeats, args.candidates, screen
    )
    sk_s, ref = time_sklearn(train, labels, test, args.sklearn_jobs, args.repeats)
    mismatches = int((ours != ref).sum())
    name = device_name(device)
    result = {
        "source": source,
        "train_images": len(train),
        "test_images": len(test),
        "ours_seconds": ours_s,
        "sklearn_seconds": sk_s,
        "speedup": sk_s / ours_s,
        "ours_test_per_second": len(test) / ours_s,
        "sklearn_test_per_second": len(test) / sk_s,
        "accuracy": float((ours == truth).mean()),
        "sklearn_accuracy": float((ref == truth).mean()),
        "mismatches": mismatches,
        "device": str(device),
        "device_name": name,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "sklearn_jobs": args.sklearn_jobs,
        "repeats": args.repeats,
        "candidates": args.candidates,
        "screen": args.screen,
    }
    print(f"4-NN (k=4, distance weights) on {source}")
    print(
        f"{len(train)} train x {len(test)} test, ours on {device} ({name}), {os.cpu_count()} CPUs"
    )
    print(f"| {'method':<34} | {'seconds':>8} | {'test img/s':>10} | {'accuracy':>8} |")
    print(f"| {'-' * 34} | {'-' * 8}:| {'-' * 10}:| {'-' * 8}:|")
    rows = [
        (f"scikit-learn {sklearn.__version__} (n_jobs={args.sklearn_jobs})", sk_s, ref),
        (f"kmnist_torch knn_predict ({device})", ours_s, ours),
    ]
    for name, secs, pred in rows:
        acc = 100 * float((pred == truth).mean())
        print(f"| {name:<34} | {secs:>8.3f} | {len(test) / secs:>10.0f} | {acc:>7.2f}% |")
    print(f"speed-up {sk_s / ours_s:.2f}x; predictions differing: {mismatches} of {len(test)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
