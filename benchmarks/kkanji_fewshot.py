"""The KKanji few-shot partition and episodes on a decoded cache, read only: how many classes
are eligible, how the classes and images fall into base / val / novel for the default
arguments, the partition's sha256, and the seconds the episode sampler takes for 600 episodes.

It reads ``KKanji/cache/index-*.json`` and ``images-*.npy`` (memory-mapped, read only) and
nothing else, so it can run on a tree it must not write to (``load_fewshot`` keeps the audit's
facts beside the cache). The sha256 is the one ``python -m kmnist_torch kkanji-fewshot-split``
prints for that tree (the same document, built by the same function).

    python benchmarks/kkanji_fewshot.py /path/to/root/KKanji [--seed 0 --n-val 100 --n-novel 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from kmnist_torch.data.audit import blank_mask, identical_groups
from kmnist_torch.data.kkanji.fewshot import (
    MIN_IMAGES,
    N_NOVEL,
    N_VAL,
    EpisodeSampler,
    make_partition,
    partition_document,
    partition_text,
    usable_mask,
)
from kmnist_torch.data.kkanji.tree import Listing


def _listing(folder: Path) -> tuple[Listing, np.ndarray]:
    index_path = max((folder / "cache").glob("index-*.json"), key=lambda p: p.stat().st_mtime)
    index = json.loads(index_path.read_text(encoding="utf-8"))
    images = np.load(folder / "cache" / index_path.name.replace("index-", "images-")
                     .replace(".json", ".npy"), mmap_mode="r")  # fmt: skip
    names: dict[str, list[str]] = {}
    for path in index["files"]:  # kkanji2/U+XXXX/<name>.png, cache order
        _, cls, name = path.split("/")
        names.setdefault(cls, []).append(name)
    folders = list(names)
    cps = [int(f[2:], 16) for f in folders]
    assert [f"U+{cp:04X}" for cp in cps] == index["codepoints"]
    listing = Listing(folder / "kkanji2", folders, cps, [names[f] for f in folders],
                      index["fingerprint"])  # fmt: skip
    assert listing.relpaths() == index["files"] and listing.counts == index["counts"]
    return listing, images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a data root's KKanji/ folder with a decoded cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-val", type=int, default=N_VAL)
    p.add_argument("--n-novel", type=int, default=N_NOVEL)
    args = p.parse_args()
    start = time.perf_counter()
    listing, images = _listing(Path(args.folder))
    blank = blank_mask(images)
    groups = identical_groups(images)
    labels = np.repeat(np.arange(len(listing.counts)), listing.counts)
    usable = usable_mask(listing.total, blank, groups, labels)
    counts = np.bincount(labels[usable], minlength=len(listing.counts))
    cps = [f"U+{cp:04X}" for cp in listing.codepoints]
    part = make_partition(counts.tolist(), cps, args.seed, args.n_val, args.n_novel)
    args_doc = {"seed": args.seed, "n_val": args.n_val, "n_novel": args.n_novel,
                "min_images": MIN_IMAGES}  # fmt: skip
    doc = partition_document(listing, counts, int(blank.sum()), part, args_doc)
    sha = hashlib.sha256(partition_text(doc).encode()).hexdigest()
    print(f"{listing.total:,} images in {len(cps):,} classes; {int(blank.sum())} blank, "
          f"{len(groups)} groups of identical images; {int(usable.sum()):,} usable "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    eligible = counts >= MIN_IMAGES
    print(f"classes with >= {MIN_IMAGES} usable images: {int(eligible.sum()):,} "
          f"({int(counts[eligible].sum()):,} images)")  # fmt: skip
    print("| part | classes | usable images | images per class (min / median / max) |")
    print("| --- | --- | --- | --- |")
    for name in ("base", "val", "novel"):
        c = counts[list(getattr(part, name))]
        print(f"| {name} | {len(c):,} | {int(c.sum()):,} ({c.sum() / counts.sum():.1%}) | "
              f"{c.min()} / {int(np.median(c))} / {c.max()} |")  # fmt: skip
    print(f"partition {doc['partition_version']} seed {args.seed}: sha256 {sha}")
    for n, k in [(n, k) for n in (5, 20) for k in (1, 5) if n <= len(part.novel)]:
        t = time.perf_counter()
        s = EpisodeSampler(labels, part.novel, n, k, 15, 600, seed=args.seed, exclude=~usable)
        total = sum(len(ep) for ep in s)
        print(f"{n}-way {k}-shot 15-query: 600 episodes ({total:,} indices) in "
              f"{time.perf_counter() - t:.2f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
