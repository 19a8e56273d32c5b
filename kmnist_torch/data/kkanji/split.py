"""Reproducible Kuzushiji-Kanji splits: stratified, deterministic (a keyed sha256 of seed,
codepoint and file name, exact decimal arithmetic), and publishable as JSON."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ... import catalog
from ..._io import write_json
from ...download.sources import resolve_root
from .archive import read_record
from .cache import Listing, open_source
from .layout import SPLIT_VERSION, codepoint_name, expected


def check_split_args(test_fraction: float, seed: int, min_per_class: int, shots: int | None):
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a number, got {test_fraction!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    for name, value, low in (("seed", seed, None), ("min_per_class", min_per_class, 1),
                             ("shots", shots, 1)):  # fmt: skip
        if value is None and name == "shots":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


def _rank(seed: int, cp: int, names: list[str]) -> list[int]:
    """Positions of ``names`` in the seeded order of the class: a keyed hash of each name, so
    the order depends on nothing but (seed, codepoint, name), on any machine and any NumPy."""
    prefix = f"{SPLIT_VERSION}|{int(seed)}|{codepoint_name(cp)}|"
    keys = [hashlib.sha256((prefix + n).encode()).digest() for n in names]
    return sorted(range(len(names)), key=lambda i: (keys[i], names[i]))


@dataclass
class Split:
    classes: list[int]  # positions in the listing of the kept classes, in order
    train: np.ndarray  # flat cache indices, sorted
    test: np.ndarray
    labels: np.ndarray  # class index (after renumbering) of every cached image, -1 if dropped


def make_split(
    listing: Listing, test_fraction: float, seed: int, min_per_class: int, shots: int | None
) -> Split:
    # Exact decimal arithmetic: floor(50 * 0.29) is 14 as a person computes it, not 14.499...
    frac = Fraction(repr(float(test_fraction)))
    labels = np.full(listing.total, -1, np.int64)
    train: list[int] = []
    test: list[int] = []
    kept: list[int] = []
    offset = 0
    for pos, (cp, names) in enumerate(zip(listing.codepoints, listing.names)):
        n = len(names)
        if n >= min_per_class:
            labels[offset : offset + n] = len(kept)
            kept.append(pos)
            order = _rank(seed, cp, names)
            n_test = math.floor(n * frac)
            test.extend(offset + i for i in order[:n_test])
            rest = order[n_test:]
            train.extend(offset + i for i in (rest if shots is None else rest[:shots]))
        offset += n
    if not kept:
        raise ValueError(f"min_per_class={min_per_class} leaves no class")
    return Split(kept, np.array(sorted(train), np.int64), np.array(sorted(test), np.int64),
                  labels)  # fmt: skip


def write_split_file(
    out_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_per_class: int = 1,
    shots: int | None = None,
    download: bool = False,
    verify: bool = True,
) -> dict:
    """Write the KKanji split of these arguments as JSON (arguments, classes with their counts,
    the files of each part) to ``out_path`` and return the same document. Only file names are
    read: no image is decoded."""
    check_split_args(test_fraction, seed, min_per_class, shots)
    folder = resolve_root(root) / catalog.KKANJI.folder
    listing = open_source(folder, download, verify)
    parts = make_split(listing, test_fraction, seed, min_per_class, shots)
    paths = listing.relpaths()
    train_counts = np.bincount(parts.labels[parts.train], minlength=len(parts.classes))
    test_counts = np.bincount(parts.labels[parts.test], minlength=len(parts.classes))
    rec = read_record(folder)
    n_classes, n_images = expected()
    doc = {
        "dataset": "Kuzushiji-Kanji",
        "split_version": SPLIT_VERSION,
        "arguments": {
            "test_fraction": test_fraction,
            "seed": int(seed),
            "min_per_class": int(min_per_class),
            "shots": None if shots is None else int(shots),
        },
        "source": {
            "classes": len(listing.codepoints),
            "images": listing.total,
            "complete": (len(listing.codepoints), listing.total) == (n_classes, n_images),
            # Of the sorted file list: the same on any machine that has the same files.
            "files_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
            "tar_sha256": rec["sha256"] if rec else None,
        },
        "licence": catalog.LICENSE,
        "attribution": catalog.ATTRIBUTION,
        "classes": [
            {
                "index": i,
                "codepoint": codepoint_name(listing.codepoints[p]),
                "char": chr(listing.codepoints[p]),
                "train": int(train_counts[i]),
                "test": int(test_counts[i]),
            }
            for i, p in enumerate(parts.classes)
        ],
        "train": [paths[i] for i in parts.train],
        "test": [paths[i] for i in parts.test],
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, doc)
    return doc
