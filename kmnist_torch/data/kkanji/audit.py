"""The audit of a Kuzushiji-Kanji tree (:mod:`kmnist_torch.data.audit` on its decoded images),
and the two facts of it the default split uses: the groups of identical images and the blank
images. Those are kept beside the decoded cache (``cache/audit-<fingerprint>.json``), so they
are computed once per tree."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..._io import write_json
from ..audit import BLANK_SHARE, INK_LEVEL, audit_images, blank_mask, identical_groups
from .layout import CACHE_DIR, codepoint_name
from .tree import Listing

FACTS_VERSION = f"kkanji-audit-v1 ink>={INK_LEVEL} blank<{BLANK_SHARE}"


@dataclass
class Facts:
    """What the split needs to know of the images, by cache index."""

    groups: list[list[int]]  # identical images, two or more each
    blank: np.ndarray  # bool, one per image

    def summary(self, labels: np.ndarray | None = None) -> dict[str, int]:
        cross = 0
        if labels is not None:
            cross = sum(1 for g in self.groups if len(set(labels[g].tolist())) > 1)
        return {
            "identical_groups": len(self.groups),
            "images_in_identical_groups": sum(len(g) for g in self.groups),
            "groups_across_classes": cross,
            "blank_images": int(self.blank.sum()),
        }


def _facts_path(folder: Path, listing: Listing) -> Path:
    return folder / CACHE_DIR / f"audit-{listing.fingerprint[:20]}.json"


def facts(folder: Path, listing: Listing, images: np.ndarray) -> Facts:
    """The identical groups and blank images of this tree: read from beside the cache when
    they were computed for exactly this tree and these measures, else computed (and kept
    there where the folder is writable)."""
    path = _facts_path(folder, listing)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc["fingerprint"] == listing.fingerprint and doc["version"] == FACTS_VERSION:
            groups = [list(map(int, g)) for g in doc["groups"]]
            picked = np.asarray([i for g in groups for i in g] + doc["blank"], np.int64)
            if picked.size and not (0 <= picked.min() and picked.max() < listing.total):
                raise ValueError("an index outside the tree: computed again")
            blank = np.zeros(listing.total, bool)
            blank[np.asarray(doc["blank"], np.int64)] = True
            return Facts(groups, blank)
    found = Facts(identical_groups(images), blank_mask(images))
    doc = {"version": FACTS_VERSION, "fingerprint": listing.fingerprint,
           "groups": found.groups, "blank": np.flatnonzero(found.blank).tolist()}  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only root: computed again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, doc, indent=None)
    return found


def labels_of(listing: Listing) -> np.ndarray:
    """The class position (in the listing) of every image, in cache order."""
    return np.repeat(np.arange(len(listing.counts)), listing.counts)


def audit_tree(listing: Listing, images: np.ndarray) -> dict[str, Any]:
    """The full audit of a tree: duplicates (within and across classes, with their classes),
    blank images, per-class counts, and the copy artefacts set aside when it was read."""
    classes = [f"{codepoint_name(cp)} {chr(cp)}" for cp in listing.codepoints]
    report: dict[str, Any] = {"dataset": "kkanji", "tree": str(listing.tree)}
    report.update(audit_images(images, labels_of(listing), classes, listing.relpaths()))
    report["copy_artefacts_set_aside"] = listing.artefacts
    report["checked_against_shipped_digest"] = listing.digest_checked
    return report
