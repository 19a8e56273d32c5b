"""Reproducible Kuzushiji-Kanji splits: stratified, deterministic (a keyed sha256 of seed,
codepoint and file name, exact decimal arithmetic), guided by the audit (each group of
identical images on one side, blank images never in the test part), publishable as JSON."""

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
from .audit import Facts, facts
from .cache import images as load_images
from .cache import open_source
from .layout import RANK_KEY, SPLIT_VERSION, codepoint_name, expected
from .tree import Listing

SPLIT_RULE = (
    "each group of identical images is on one side (a group spanning classes, in training); "
    "blank images are never in the test part"
)


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
    prefix = f"{RANK_KEY}|{int(seed)}|{codepoint_name(cp)}|"
    keys = [hashlib.sha256((prefix + n).encode()).digest() for n in names]
    return sorted(range(len(names)), key=lambda i: (keys[i], names[i]))


@dataclass
class Split:
    classes: list[int]  # positions in the listing of the kept classes, in order
    train: np.ndarray  # flat cache indices, sorted
    test: np.ndarray
    labels: np.ndarray  # class index (after renumbering) of every cached image, -1 if dropped


def make_split(
    listing: Listing,
    test_fraction: float,
    seed: int,
    min_per_class: int,
    shots: int | None,
    found: Facts | None = None,
) -> Split:
    """The split of these arguments. In each class the images are taken in their seeded
    order, a group of identical images as one unit at the place of its first member, into the
    test part while it holds at most ``floor(n * test_fraction)`` images; blank images and
    groups of identical images spanning classes stay in training (``found``: the audit's
    facts; None: no image is identical to another and none is blank)."""
    # Exact decimal arithmetic: floor(50 * 0.29) is 14 as a person computes it, not 14.499...
    frac = Fraction(repr(float(test_fraction)))
    labels = np.full(listing.total, -1, np.int64)
    unit_of, train_only = _constraints(listing, found)
    train: list[int] = []
    test: list[int] = []
    kept: list[int] = []
    offset = 0
    for pos, (cp, names) in enumerate(zip(listing.codepoints, listing.names)):
        n = len(names)
        if n >= min_per_class:
            labels[offset : offset + n] = len(kept)
            kept.append(pos)
            order = [offset + i for i in _rank(seed, cp, names)]
            chosen = _fill_test(order, math.floor(n * frac), unit_of, train_only)
            test.extend(chosen)
            rest = [i for i in order if i not in chosen]
            train.extend(rest if shots is None else rest[:shots])
        offset += n
    if not kept:
        raise ValueError(f"min_per_class={min_per_class} leaves no class")
    return Split(kept, np.array(sorted(train), np.int64), np.array(sorted(test), np.int64),
                  labels)  # fmt: skip


def _constraints(listing: Listing, found: Facts | None) -> tuple[dict[int, list[int]], set]:
    """(image -> the members of its group, for groups inside one class; images that must stay
    in training: blank ones and members of groups spanning classes)."""
    if found is None:
        return {}, set()
    class_of = np.repeat(np.arange(len(listing.counts)), listing.counts)
    unit_of: dict[int, list[int]] = {}
    train_only = set(np.flatnonzero(found.blank).tolist())
    for g in found.groups:
        if len(set(class_of[g].tolist())) > 1:
            train_only.update(g)
        else:
            unit_of.update((i, g) for i in g)
    return unit_of, train_only


def _fill_test(order: list[int], n_test: int, unit_of: dict, train_only: set) -> set[int]:
    chosen: set[int] = set()
    for i in order:
        if len(chosen) >= n_test:
            break
        if i in chosen or i in train_only:
            continue
        unit = unit_of.get(i, [i])
        if len(chosen) + len(unit) <= n_test:
            chosen.update(unit)
    return chosen


def _source(folder: Path, listing: Listing, paths: list[str]) -> dict:
    """What the split was made from, for the split file."""
    rec = read_record(folder)
    n_classes, n_images = expected()
    return {
        "classes": len(listing.codepoints),
        "images": listing.total,
        "complete": (len(listing.codepoints), listing.total) == (n_classes, n_images),
        # Of the sorted file list: the same on any machine that has the same files.
        "files_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "tar_sha256": rec["sha256"] if rec else None,
        "checked_against_shipped_digest": listing.digest_checked,
        "copy_artefacts_set_aside": len(listing.artefacts),
    }


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
    the audit's findings the split obeyed, the files of each part) to ``out_path`` and return the
    same document. The images are read from the decoded cache (built first if needed)."""
    check_split_args(test_fraction, seed, min_per_class, shots)
    folder = resolve_root(root) / catalog.KKANJI.folder
    listing = open_source(folder, download, verify)
    found = facts(folder, listing, load_images(folder, listing))
    parts = make_split(listing, test_fraction, seed, min_per_class, shots, found)
    paths = listing.relpaths()
    train_counts = np.bincount(parts.labels[parts.train], minlength=len(parts.classes))
    test_counts = np.bincount(parts.labels[parts.test], minlength=len(parts.classes))
    doc = {
        "dataset": "Kuzushiji-Kanji",
        "split_version": SPLIT_VERSION,
        "arguments": {
            "test_fraction": test_fraction,
            "seed": int(seed),
            "min_per_class": int(min_per_class),
            "shots": None if shots is None else int(shots),
        },
        "source": _source(folder, listing, paths),
        "audit": {
            **found.summary(np.repeat(np.arange(len(listing.counts)), listing.counts)),
            "rule": SPLIT_RULE,
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
