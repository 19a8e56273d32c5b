"""Kuzushiji-Kanji decoded cache: time to build it from a full-size tree of PNGs (140,424 images
in 3,832 classes) and to load it afterwards.

The tree is generated: class sizes from ../shared/data/real/kkanji/kkanji2-class-counts.tsv
(the real full-set counts) when present, else a synthetic long tail; the images are the real
PNGs of ../shared/data/real/kkanji cycled, else synthetic 64x64 grayscale PNGs.

    python benchmarks/kkanji_cache.py [--n-images 20000] [--workers N] [--workdir DIR]
                                      [--repeats 3] [--out bench-out/kkanji_cache.json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _shared
import numpy as np
import PIL
import torch
from PIL import Image

from kmnist_torch import catalog
from kmnist_torch.data.kkanji.cache import prepare_cache
from kmnist_torch.data.kkanji.dataset import KKanji
from kmnist_torch.data.kkanji.split import write_split_file
from kmnist_torch.settings import decode_workers

SHARED_KKANJI = _shared.KKANJI
FULL_IMAGES = 140424
FULL_CLASSES = 3832


def class_sizes(n_images: int) -> tuple[list[tuple[int, int]], str]:
    """(codepoint, images) per class summing to ``n_images``, and where the shape came from."""
    tsv = SHARED_KKANJI / "kkanji2-class-counts.tsv"
    if tsv.is_file():
        rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line]
        full = [(int(name[2:], 16), int(n)) for name, n in rows]
        source = f"real class counts ({tsv.name})"
    else:  # a long tail like the real one: 1,768 down to 1, many singletons
        ranks = np.arange(1, FULL_CLASSES + 1)
        weights = 1768 / ranks**0.9
        counts = np.maximum(1, np.round(weights * FULL_IMAGES / weights.sum())).astype(int)
        counts[0] += FULL_IMAGES - counts.sum()
        full = [(0x4E00 + i, int(c)) for i, c in enumerate(counts)]
        source = "synthetic long tail"
    total = sum(n for _, n in full)
    if n_images >= total:
        return full, source
    # Scale down, largest remainders first, dropping classes that round to nothing.
    exact = [(cp, n * n_images / total) for cp, n in full]
    sizes = {cp: int(x) for cp, x in exact}
    short = n_images - sum(sizes.values())
    by_remainder = sorted(exact, key=lambda e: e[1] - int(e[1]), reverse=True)
    for cp, _ in by_remainder[:short]:
        sizes[cp] += 1
    return [(cp, n) for cp, n in full if sizes[cp]], source + f", scaled to {n_images}"


def image_pool() -> tuple[list[bytes], str]:
    """PNG files to write, cycled: the real ones here, else synthetic strokes."""
    real = sorted(SHARED_KKANJI.glob("kkanji2-*/kkanji2/U+*/*.png"))
    if real:
        return [p.read_bytes() for p in real], f"{len(real)} real PNGs cycled"
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(512):
        img = np.full((64, 64), 255, np.uint8)
        for _ in range(6):
            r, c = rng.integers(4, 60, 2)
            img[r - 2 : r + 2, max(0, c - 20) : c + 20] = rng.integers(0, 120)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pool.append(buf.getvalue())
    return pool, "512 synthetic PNGs cycled"


def generate(root: Path, sizes: list[tuple[int, int]], pool: list[bytes]) -> int:
    """Write ``root/KKanji/kkanji2/U+XXXX/<16 hex>.png``; returns the bytes written."""
    tree = root / catalog.KKANJI.folder / "kkanji2"
    k = written = 0
    for cp, n in sizes:
        d = tree / f"U+{cp:04X}"
        d.mkdir(parents=True)
        for _ in range(n):
            data = pool[k % len(pool)]
            name = hashlib.blake2b(k.to_bytes(8, "little"), digest_size=8).hexdigest()
            (d / f"{name}.png").write_bytes(data)
            written += len(data)
            k += 1
    return written


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--n-images",
        type=int,
        default=FULL_IMAGES,
        help=f"images in the generated tree (default {FULL_IMAGES}, the full set)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"decoding processes (default: the usable cores, {decode_workers()} here)",
    )
    p.add_argument("--workdir", default=None, help="keep the tree here (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3, help="warm loads to take the median of")
    p.add_argument("--out", default="bench-out/kkanji_cache.json")
    args = p.parse_args()

    sizes, size_source = class_sizes(args.n_images)
    pool, image_source = image_pool()
    n_images, n_classes = sum(n for _, n in sizes), len(sizes)
    full = (n_classes, n_images) == (FULL_CLASSES, FULL_IMAGES)
    workers = args.workers or decode_workers()
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
        if (root / catalog.KKANJI.folder).exists():
            sys.exit(f"{root / catalog.KKANJI.folder} exists; give an empty --workdir")
    else:
        tmp = tempfile.mkdtemp(prefix="kkanji-bench-")
        root = Path(tmp)
    rows: list[tuple[str, float, str]] = []
    split: dict[str, int] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # verify=False on a scaled-down tree warns
            verify = full
            t, written = timed(lambda: generate(root, sizes, pool))
            rows.append(("generate the PNG tree", t, f"{written / 2**20:.0f} MiB of PNG"))
            t, info = timed(lambda: prepare_cache(root, verify=verify, workers=workers))
            rows.append(
                (
                    "build the cache (scan + decode + write)",
                    t,
                    f"{n_images / t:,.0f} images/s with {workers} worker(s)",
                )
            )
            cache_bytes = info["images"].stat().st_size + info["index"].stat().st_size

            loads = {
                'KKanji(split="all"), cache hit': lambda: KKanji(root, "all", verify=verify),
                'KKanji(split="train"), cache hit': lambda: KKanji(root, "train", verify=verify),
                "write_split_file (no decoding)": lambda: write_split_file(
                    root / "split.json", root, verify=verify
                ),
            }
            for label, fn in loads.items():
                first, ds = timed(fn)
                warm = statistics.median(timed(fn)[0] for _ in range(args.repeats))
                rows.append((label + ", first", first, ""))
                rows.append((label + f", median of {args.repeats}", warm, ""))
                if isinstance(ds, dict):  # the split document: what the default split holds
                    split = {
                        "train": len(ds["train"]),
                        "test": len(ds["test"]),
                        "classes": len(ds["classes"]),
                    }
                if isinstance(ds, KKanji) and ds.split == "all":
                    t, total = timed(lambda ds=ds: int(ds.data.sum(dtype=torch.int64)))
                    rows.append(
                        ("read every pixel of the memory-mapped cache", t, f"checksum {total}")
                    )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nKuzushiji-Kanji cache: {n_images:,} images in {n_classes:,} classes "
        f"({size_source}; {image_source}); verify={verify}"
    )
    print(f"cache on disk: {cache_bytes / 2**20:.0f} MiB; cores usable: {decode_workers()}\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'step'.ljust(width)}  {'seconds':>8}  notes")
    for label, seconds, note in rows:
        print(f"{label.ljust(width)}  {seconds:8.3f}  {note}")
    print(
        f"\ndefault split (test_fraction 0.2, seed 0): {split['train']:,} train / "
        f"{split['test']:,} test images in {split['classes']:,} classes"
    )
    result = {
        "benchmark": "kkanji_cache",
        "n_images": n_images,
        "n_classes": n_classes,
        "class_sizes": size_source,
        "images": image_source,
        "verify": verify,
        "workers": workers,
        "cache_bytes": cache_bytes,
        "default_split": split,
        "seconds": {label: round(s, 4) for label, s, _ in rows},
        "notes": {label: note for label, _, note in rows if note},
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
