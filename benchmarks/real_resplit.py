"""Real-image runs where the official training images are out of reach: the real KMNIST test
split (10,000 images, from ../shared) re-split into 8,000 training and 2,000 test images,
written as a KMNIST root in the official idx.gz format, then scored by the reproduction harness.

This is not the benchmark protocol (a sixth of the training data, a different test set), so the
harness marks the cells as not comparable and applies no target; what it shows is how each row
does on real Kuzushiji images, measured, on the machine it runs on.

    python benchmarks/real_resplit.py --rows knn cnn --out bench-out/real-resplit
    python benchmarks/real_resplit.py --rows preact18-manifold --recipe fast --out DIR  # a GPU
    python benchmarks/real_resplit.py --write-only --root DIR     # just write the data root
    python benchmarks/real_resplit.py --root DIR --rows knn ...   # use a root written before

Any other option is passed on to benchmarks/reproduce.py (``--epochs``, ``--device``, ...).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from kmnist_torch.formats import read_idx, write_idx  # noqa: E402

SHARED_KMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "kmnist"
N_TRAIN, N_TEST = 8000, 2000


def write_root(root: Path, source: Path = SHARED_KMNIST, seed: int = 0) -> dict[str, int]:
    """Write ``root/KMNIST/raw/`` with the real test split shuffled by ``seed`` and cut
    8,000/2,000 (train-*.gz, t10k-*.gz and the class map); returns the split sizes."""
    images_gz = source / "t10k-images-idx3-ubyte.gz"
    if not images_gz.is_file():
        raise SystemExit(
            f"{images_gz} is absent: this benchmark needs the real KMNIST test split "
            "(../shared/data/real/kmnist beside the checkout)."
        )
    x = read_idx(images_gz, 3)
    y = read_idx(source / "t10k-labels-idx1-ubyte.gz", 1)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_TEST]
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, idx in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x[idx])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y[idx])
    shutil.copy(source / "kmnist_classmap.csv", raw / "kmnist_classmap.csv")
    return {"train": len(train), "test": len(test)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="write the data here (default: a temp dir)")
    p.add_argument("--write-only", action="store_true", help="write the root and stop")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 8,000/2,000 cut")
    args, rest = p.parse_known_args(argv)
    tmp = None if args.root else tempfile.mkdtemp(prefix="kmnist-resplit-")
    root = Path(args.root or tmp)
    try:
        raw = root / "KMNIST" / "raw"
        if args.root and not args.write_only and (raw / "train-images-idx3-ubyte.gz").is_file():
            # Written before (e.g. here, then carried to a GPU machine that has no ../shared).
            print(f"using the re-split already in {raw}")
        else:
            sizes = write_root(root, seed=args.split_seed)
            print(f"wrote {raw}: real KMNIST test images re-split "
                  f"{sizes['train']:,} train / {sizes['test']:,} test")  # fmt: skip
        if args.write_only:
            return 0
        import reproduce

        # The limits mark the cells as not comparable with upstream: no target applies.
        return reproduce.main(["--datasets", "kmnist", "--root", str(root), "--no-download",
                               "--no-verify", "--limit-train", str(N_TRAIN),
                               "--limit-test", str(N_TEST), *rest])  # fmt: skip
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
