"""What is inside a dataset's images: exact duplicates (within a class and across classes, with
their labels), blank images, and per-class counts, as one JSON-ready report.

The measures:

- **identical**: two images are identical when their uint8 pixels are equal (every pixel).
- **blank**: an image is blank when fewer than :data:`BLANK_SHARE` (0.5%) of its pixels reach
  :data:`INK_LEVEL` (128, half intensity: the characters are light strokes on black). That is
  fewer than 21 of 4,096 pixels of a 64x64 KKanji image and fewer than 4 of 784 of a 28x28 one.
  In the full Kuzushiji-Kanji tree this finds exactly its 28 all-black images; its faintest
  real character has 34 such pixels.

KMNIST's first release held black and duplicated images; the release of
:data:`~kmnist_torch.catalog.STALE_RELEASE_DATE` removed them, under the same file names. An
audit of KMNIST says which of the files present are a known stale release (by md5) and counts
the black and duplicated images, so an audit of the pre-2019 files finds what the fix removed.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import catalog
from .._io import hash_file
from ..errors import DataFilesError, FormatError

INK_LEVEL = 128
BLANK_SHARE = 0.005
MEASURES = {
    "identical": "the uint8 pixels are equal, every one",
    "blank": f"fewer than {BLANK_SHARE:.1%} of the pixels are >= {INK_LEVEL} (no character)",
    "black": "every pixel is 0",
}


def ink_pixels(images: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """How many pixels of each image reach :data:`INK_LEVEL` (in chunks: a memory map is not
    read whole into memory)."""
    out = np.empty(len(images), np.int64)
    for s in range(0, len(images), chunk):
        part = np.asarray(images[s : s + chunk])
        out[s : s + len(part)] = (part >= INK_LEVEL).reshape(len(part), -1).sum(axis=1)
    return out


def blank_mask(images: np.ndarray) -> np.ndarray:
    """True for each blank image (see the module's measures)."""
    pixels = int(np.prod(images.shape[1:])) if len(images.shape) > 1 else 1
    return ink_pixels(images) < BLANK_SHARE * pixels


def identical_groups(images: np.ndarray) -> list[list[int]]:
    """Groups (of two or more) of the indices of identical images, each sorted, ordered by
    their first index. Images are bucketed by a 128-bit hash, then compared byte for byte."""
    buckets: dict[bytes, list[int]] = defaultdict(list)
    for i in range(len(images)):
        buckets[hashlib.blake2b(np.asarray(images[i]).tobytes(), digest_size=16).digest()].append(i)
    groups = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        by_bytes: dict[bytes, list[int]] = defaultdict(list)  # a collision is split, not merged
        for i in members:
            by_bytes[np.asarray(images[i]).tobytes()].append(i)
        groups += [g for g in by_bytes.values() if len(g) > 1]
    return sorted(groups)


def audit_images(
    images: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]
) -> dict[str, Any]:
    """The audit of ``images`` (N x H x W uint8) with their ``labels`` (class indices into
    ``classes``) and ``names`` (how each image is named in the report: a file or
    ``split[index]``)."""
    labels = np.asarray(labels, np.int64)
    ink = ink_pixels(images)
    blank = ink < BLANK_SHARE * int(np.prod(images.shape[1:]))
    groups = identical_groups(images)
    per_class = np.bincount(labels, minlength=len(classes))
    blank_count = np.bincount(labels[blank], minlength=len(classes))
    out_groups, dup_count = _describe_groups(groups, labels, blank, classes, names)
    return {
        "images": int(len(images)),
        "classes": len(classes),
        "measures": MEASURES,
        "identical": {
            "groups": len(groups),
            "images_in_groups": int(sum(len(g) for g in groups)),
            "images_beyond_the_first_of_each_group": int(sum(len(g) - 1 for g in groups)),
            "within_one_class": sum(1 for g in out_groups if not g["cross_class"]),
            "across_classes": sum(1 for g in out_groups if g["cross_class"]),
            "list": out_groups,
        },
        "blank": {
            "count": int(blank.sum()),
            "black": int(sum(1 for i in np.flatnonzero(blank) if not np.asarray(images[i]).any())),
            "list": [
                {
                    "index": int(i),
                    "name": names[i],
                    "class": classes[int(labels[i])],
                    "ink_pixels": int(ink[i]),
                }
                for i in np.flatnonzero(blank)
            ],  # fmt: skip
        },
        "per_class": [
            {
                "class": c,
                "images": int(per_class[k]),
                "in_identical_groups": int(dup_count[k]),
                "blank": int(blank_count[k]),
            }  # fmt: skip
            for k, c in enumerate(classes)
        ],
    }


def _describe_groups(groups, labels, blank, classes, names) -> tuple[list[dict], np.ndarray]:
    """Each group as the report lists it, and how many images of each class are in one."""
    dup_count = np.zeros(len(classes), np.int64)
    out_groups = []
    for g in groups:
        glabels = sorted({int(labels[i]) for i in g})
        for k in glabels:
            dup_count[k] += int((labels[g] == k).sum())
        out_groups.append({
            "size": len(g),
            "cross_class": len(glabels) > 1,
            "blank": bool(blank[g[0]]),
            "classes": [classes[k] for k in glabels],
            "images": [{"index": int(i), "name": names[i], "class": classes[int(labels[i])]}
                       for i in g],
        })  # fmt: skip
    return out_groups, dup_count


def stale_files(info: catalog.DatasetInfo, folder: Path) -> list[dict[str, str]]:
    """The files of ``info`` in ``folder`` (or its ``raw/``) that are a known stale release,
    by md5, with what they are."""
    found = []
    for remote in info.files():
        if not remote.stale_md5:
            continue
        for place in (folder / "raw" / remote.name, folder / remote.name):
            if place.is_file():
                md5 = hash_file(place)[0]
                if md5 in remote.stale_md5:
                    found.append({"file": str(place), "md5": md5, "is": remote.stale_md5[md5]})
    return found


def load_splits(name: str, root: Path) -> dict[str, Any]:
    """Every official split of ``name`` (KMNIST, K49) that ``root`` has files for, in the first
    format that loads, read without checksums (an audit looks at stale and altered files too).
    A :class:`DataFilesError` when none loads."""
    from .mnist import K49, KMNIST, MNIST

    info = catalog.get(name)
    cls = {"kmnist": KMNIST, "k49": K49, "mnist": MNIST}[info.name]
    found: dict[str, Any] = {}
    errors = []
    for split in info.split_sizes:
        for fmt in info.formats:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kw = {"format": fmt} if len(info.formats) > 1 else {}
                    found[split] = cls(root, train=split == "train", verify=False, **kw)
                break
            except (DataFilesError, FormatError) as exc:
                errors.append(str(exc).splitlines()[0])
    if not found:
        raise DataFilesError(
            f"audit {info.name}: no split of {info.title} could be read under {root}: "
            + "; ".join(errors[:2])
        )
    return found


def audit_official(name: str, root: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The audit of KMNIST or K49 over every split present (duplicates across the train/test
    boundary included), with the stale-release check; also the images and labels audited."""
    info = catalog.get(name)
    splits = load_splits(name, root)
    images = np.concatenate([ds.data.numpy() for ds in splits.values()])
    labels = np.concatenate([ds.targets.numpy() for ds in splits.values()])
    names = [f"{s}[{i}]" for s, ds in splits.items() for i in range(len(ds))]
    classes = [f"{c.codepoint} {c.char}" for c in info.classes]
    report = {"dataset": info.name, "splits": {s: len(ds) for s, ds in splits.items()}}
    report.update(audit_images(images, labels, classes, names))
    crossing = [g for g in report["identical"]["list"]
                if len({im["name"].split("[")[0] for im in g["images"]}) > 1]  # fmt: skip
    report["identical"]["across_train_and_test"] = len(crossing)
    if not any(f.stale_md5 for f in info.files()):
        return report, images, labels
    stale = stale_files(info, root / info.folder)
    report["stale_release"] = {
        "fix": f"the {catalog.STALE_RELEASE_DATE} release removed black and duplicated images",
        "stale_files": stale,
        "black_images": report["blank"]["black"],
        "identical_groups": report["identical"]["groups"],
        "verdict": _verdict(stale, report),
    }
    return report, images, labels


def _verdict(stale: list, report: dict) -> str:
    black, groups = report["blank"]["black"], report["identical"]["groups"]
    if stale or black or groups:
        known = f"{len(stale)} file(s) of the stale release; " if stale else ""
        return (f"{known}{black} black images and {groups} groups of identical images: what the "
                f"{catalog.STALE_RELEASE_DATE} fix removed. Download the current files again "
                "(python -m kmnist_torch download ... after deleting these).")  # fmt: skip
    return f"no black and no duplicated image: not the pre-{catalog.STALE_RELEASE_DATE} data"
