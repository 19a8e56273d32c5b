"""The layout of Kuzushiji-Kanji on disk: file and folder names, class folder names
(``U+XXXX``), the counts of the full set, and the errors and warning of the KKanji modules."""

from __future__ import annotations

import re
import sys
import warnings

from ... import catalog
from ...errors import KKanjiWarning

TAR_NAME = "kkanji.tar"
TREE_NAME = "kkanji2"
RECORD_NAME = "kkanji.tar.record.json"
CACHE_DIR = "cache"
LOCK_NAME = ".kkanji.lock"
SIDE = 64
# Bumped whenever the cache layout or the decoding changes, so old caches are rebuilt.
CACHE_VERSION = 1
# Named in every published split: changing the split algorithm must change this, never silently.
# v2 keeps each group of identical images on one side and blank images out of the test part
# (the audit's findings); where a class has neither, it picks the same images as v1.
SPLIT_VERSION = "kkanji-split-v2"
# Part of every image's rank key (unchanged since v1, so v1's order of each class stands).
RANK_KEY = "kkanji-split-v1"
# A 64x64 grayscale PNG is a few KiB; anything far larger is not one of ours (a tar bomb).
MAX_MEMBER_BYTES = 1 << 20
# Below this many images a process pool costs more than it saves.
POOL_MIN_IMAGES = 4096
CHUNK_IMAGES = 512

CLASS_RE = re.compile(r"U\+([0-9A-Fa-f]{4,6})")
NAME_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_\-]*\.png")


def expected() -> tuple[int, int]:
    """(classes, images) of the full dataset, read from the catalog at call time."""
    info = catalog.KKANJI
    return info.num_classes, info.split_sizes["all"]


def codepoint_name(cp: int) -> str:
    return f"U+{cp:04X}"


def class_codepoint(folder_name: str) -> int | None:
    """The codepoint a class folder names, or None if it is not a valid ``U+XXXX`` name."""
    m = CLASS_RE.fullmatch(folder_name)
    if m is None:
        return None
    cp = int(m.group(1), 16)
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:  # not a character chr() can stand for
        return None
    return cp


def warn(message: str) -> None:
    """Warn at the user's line: the first caller outside this module, however deep we are."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(__package__):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, KKanjiWarning, stacklevel=level)
