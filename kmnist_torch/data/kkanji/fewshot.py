"""The few-shot protocol of Kuzushiji-Kanji: a class-disjoint partition of the 3,832 classes
into base / validation / novel, published as JSON with its sha256, and an episode sampler
(N-way, K-shot, Q-query) that is a ``DataLoader`` batch sampler, the same on every machine.

Every random choice is a keyed sha256 rank, as in :mod:`.split`: the partition ranks classes
by ``sha256("kkanji-fewshot-v1|<seed>|U+XXXX")``, the sampler ranks the classes of episode
``e`` by ``sha256("episodes-v1|<seed>|<e>|class|<c>")`` and the images of class ``c`` in it by
``sha256("episodes-v1|<seed>|<e>|<c>|<i>")``. Nothing depends on NumPy's or Python's random
streams, on the order episodes are drawn in, or on the library versions.

Default partition sizes (``n_novel=200``, ``n_val=100``, ``min_images=20``), and why. A novel
or validation class must give 5 shots + 15 queries (the usual 5-shot episode), so only classes
with at least 20 usable images are eligible: 1,080 of the 3,832 (126,694 of the 140,396
usable images). Omniglot's usual split keeps 1,200 of its 1,623 characters (74%) for training and
miniImageNet 64 of its 100 classes; here 200 novel classes (ten times the 20-way episode, so
two 20-way episodes share 2 classes on average and the mean over 600 episodes is not the mean
over a few classes) and 100 validation classes (five times the 20-way episode, for model
selection, as miniImageNet's 16 validation classes are fewer than its 20 novel ones) leave 780
eligible classes and every class with fewer than 20 images to base: 75% of the usable images
(seed 0), for the base classifier and the episodic training.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ... import catalog
from ..._io import atomic_write
from ...download.sources import resolve_root
from .audit import facts
from .cache import images as load_images
from .cache import open_source
from .dataset import KKanji
from .layout import codepoint_name
from .resize import check_size, downsample
from .tree import Listing

# Named in every partition file and in its rank key: a change of the algorithm changes it.
PARTITION_VERSION = "kkanji-fewshot-v1"
# The rank key of the episode sampler (part of every episode's hashes).
EPISODE_VERSION = "episodes-v1"
N_VAL = 100
N_NOVEL = 200
MIN_IMAGES = 20  # 5 shots + 15 queries
USABLE_RULE = (
    "blank images are left out, and of a group of identical images only the first of a group "
    "inside one class is kept (none of a group spanning classes)"
)


def _whole(name: str, value, low: int) -> int:
    """``value`` as an int if it is a whole number >= ``low``, else a ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _codepoint(cp) -> int:
    """A codepoint given as an int or as ``"U+XXXX"``."""
    if isinstance(cp, str) and cp.startswith("U+"):
        return int(cp[2:], 16)
    return _whole("a codepoint", cp, 0)


@dataclass(frozen=True)
class Partition:
    """Class indices (into ``KKanji(root, split="all").classes``, codepoint order) of the three
    parts: disjoint, together every class, each sorted."""

    base: tuple[int, ...]
    val: tuple[int, ...]
    novel: tuple[int, ...]


def make_partition(
    counts: Sequence[int],
    codepoints: Sequence[int | str],
    seed: int = 0,
    n_val: int = N_VAL,
    n_novel: int = N_NOVEL,
    min_images: int = MIN_IMAGES,
) -> Partition:
    """The partition of these arguments.

    Args:
        counts: usable images of each class (blank images left out), in class order.
        codepoints: each class's codepoint (an int or ``"U+XXXX"``), in the same order.
        seed: which classes are drawn.
        n_val: validation classes, drawn among the classes with at least ``min_images``
            usable images.
        n_novel: novel classes, drawn among the same; every class not drawn is base.
        min_images: the fewest usable images of a validation or novel class (default 20: 5
            shots + 15 queries).

    The eligible classes are ranked by ``sha256("kkanji-fewshot-v1|<seed>|U+XXXX")``: the
    first ``n_novel`` are novel, the next ``n_val`` validation. A class's part depends only on
    the seed, its codepoint and which classes are eligible, never on the class order given.
    """
    seed = _whole("seed", seed, 0)
    n_val = _whole("n_val", n_val, 0)
    n_novel = _whole("n_novel", n_novel, 1)
    min_images = _whole("min_images", min_images, 1)
    counts = [_whole("counts[...]", n, 0) for n in counts]
    cps = [_codepoint(cp) for cp in codepoints]
    if len(counts) != len(cps):
        raise ValueError(f"{len(counts)} counts for {len(cps)} codepoints: give one per class")
    if len(set(cps)) != len(cps):
        raise ValueError("codepoints repeat: give each class's codepoint once")
    eligible = [c for c, n in enumerate(counts) if n >= min_images]
    if n_val + n_novel > len(eligible):
        raise ValueError(
            f"n_val + n_novel = {n_val + n_novel}, but only {len(eligible)} of the {len(cps)} "
            f"classes have at least min_images={min_images} usable images: ask for at most "
            f"{len(eligible)} classes, or lower min_images"
        )
    if n_val + n_novel >= len(cps):
        raise ValueError(
            f"n_val + n_novel = {n_val + n_novel} leaves no base class of the {len(cps)}: ask "
            f"for at most {len(cps) - 1}"
        )
    prefix = f"{PARTITION_VERSION}|{seed}|"

    def key(c: int) -> tuple[bytes, int]:
        return hashlib.sha256((prefix + codepoint_name(cps[c])).encode()).digest(), cps[c]

    ranked = sorted(eligible, key=key)
    novel = ranked[:n_novel]
    val = ranked[n_novel : n_novel + n_val]
    drawn = set(novel) | set(val)
    base = [c for c in range(len(cps)) if c not in drawn]
    return Partition(tuple(base), tuple(sorted(val)), tuple(sorted(novel)))


def usable_mask(n: int, blank: np.ndarray, groups: list[list[int]], labels: np.ndarray):
    """Which of ``n`` images a few-shot episode may use: not blank, and of a group of
    identical images inside one class only its first (so a support image is never its own
    query), none of a group spanning classes (one picture, two labels)."""
    usable = ~np.asarray(blank, bool)
    for g in groups:
        members = sorted(g)
        if len(set(labels[members].tolist())) > 1:
            usable[members] = False
        else:
            usable[members[1:]] = False
    return usable


@dataclass
class FewShotData:
    """The whole tree for few-shot work (see :func:`load_fewshot`)."""

    data: torch.Tensor  # uint8, N x S x S
    targets: torch.Tensor  # int64, N: class index of every image
    classes: list[str]  # the kanji, codepoint order
    codepoints: list[str]  # "U+XXXX"
    partition: Partition
    usable: torch.Tensor  # bool, N
    partition_sha256: str  # of the partition file's bytes
    document: dict = field(repr=False)  # the partition file's content


def partition_text(doc: dict) -> str:
    """The partition file's exact text (what :func:`write_partition` writes and its sha256
    is taken of)."""
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def partition_document(
    listing: Listing, counts: np.ndarray, blank: int, part: Partition, args: dict
) -> dict:
    """The partition file's content: arguments, rule, what the tree is (classes, images, a
    sha256 of its file names, blank and usable images), the three parts as codepoints and the
    usable images of every class. Nothing in it depends on the machine or on the run (not
    whether a digest was checked, not where the tree came from), so the same tree and
    arguments give the same sha256 everywhere."""
    cps = [codepoint_name(cp) for cp in listing.codepoints]
    paths = listing.relpaths()
    return {
        "dataset": "Kuzushiji-Kanji",
        "partition_version": PARTITION_VERSION,
        "arguments": args,
        "rule": (
            f"val and novel: ranked by sha256('{PARTITION_VERSION}|<seed>|U+XXXX') among the "
            f"classes with at least min_images usable images; base: every other class; "
            f"usable images: {USABLE_RULE}"
        ),
        "source": {
            "classes": len(cps),
            "images": listing.total,
            # Of the sorted file list: the same on any machine that has the same files.
            "files_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
            "blank_images": blank,
            "usable_images": int(counts.sum()),
        },
        "licence": catalog.LICENSE,
        "attribution": catalog.ATTRIBUTION,
        "base": [cps[c] for c in part.base],
        "val": [cps[c] for c in part.val],
        "novel": [cps[c] for c in part.novel],
        "usable_per_class": {cp: int(n) for cp, n in zip(cps, counts)},
    }


def load_fewshot(
    root: str | os.PathLike | None = None,
    image_size: int = 32,
    seed: int = 0,
    verify: bool = True,
    download: bool = False,
    n_val: int = N_VAL,
    n_novel: int = N_NOVEL,
    min_images: int = MIN_IMAGES,
) -> FewShotData:
    """Every image of the tree (as ``KKanji(root, split="all")`` has them, brought to
    ``image_size`` by :func:`.resize.downsample`), which of them are usable (the audit's blank
    images and second copies out), and the partition of the usable counts with its sha256."""
    check_size(image_size)
    folder = resolve_root(root) / catalog.KKANJI.folder
    listing = open_source(folder, download, verify)
    arr = load_images(folder, listing)
    found = facts(folder, listing, arr)
    labels = np.repeat(np.arange(len(listing.counts)), listing.counts)
    usable = usable_mask(listing.total, found.blank, found.groups, labels)
    counts = np.bincount(labels[usable], minlength=len(listing.counts))
    cps = [codepoint_name(cp) for cp in listing.codepoints]
    part = make_partition(counts.tolist(), cps, seed, n_val, n_novel, min_images)
    args = {"seed": int(seed), "n_val": int(n_val), "n_novel": int(n_novel),
            "min_images": int(min_images)}  # fmt: skip
    doc = partition_document(listing, counts, int(found.blank.sum()), part, args)
    return FewShotData(
        # At 64 the memory map as it is, not a 575 MB copy.
        data=torch.from_numpy(downsample(arr, image_size)),
        targets=torch.from_numpy(labels.astype(np.int64)),
        classes=[chr(cp) for cp in listing.codepoints],
        codepoints=cps,
        partition=part,
        usable=torch.from_numpy(usable),
        partition_sha256=hashlib.sha256(partition_text(doc).encode()).hexdigest(),
        document=doc,
    )


def write_partition(
    path: str | os.PathLike,
    source: FewShotData | KKanji | str | os.PathLike | None = None,
    seed: int = 0,
    n_val: int = N_VAL,
    n_novel: int = N_NOVEL,
    min_images: int = MIN_IMAGES,
    download: bool = False,
    verify: bool = True,
) -> tuple[Path, str]:
    """Write the partition as JSON to ``path`` (atomically) and return ``(path, sha256 of
    the file)``. ``source`` is a :class:`FewShotData` (its partition is written; the other
    arguments are not used), a :class:`KKanji` dataset (its root, with its ``verify``) or a
    data root (None: the default root), loaded with the other arguments."""
    if isinstance(source, KKanji):
        source, verify = source.root, source.verify
    if not isinstance(source, FewShotData):
        source = load_fewshot(source, 64, seed, verify, download, n_val, n_novel, min_images)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, partition_text(source.document))  # the very text the sha256 is of
    return out, source.partition_sha256


# ------------------------------------------------------------------------------ the episodes


class EpisodeSampler(Sampler[list[int]]):
    """N-way, K-shot, Q-query episodes as lists of dataset indices, for
    ``DataLoader(dataset, batch_sampler=sampler)``.

    Each episode is ``n_way * (k_shot + q_query)`` indices, class-major (easyfsl's
    ``TaskSampler`` layout): for each of the episode's classes, in episode order, its
    ``k_shot`` support images then its ``q_query`` queries. Episode ``e`` takes the ``n_way``
    classes of ``classes`` ranked first by ``sha256("episodes-v1|<seed>|<e>|class|<c>")``, and
    of each class the images ranked first by ``sha256("episodes-v1|<seed>|<e>|<c>|<i>")``
    (``c`` the class index, ``i`` the dataset index): ``sampler.episode(e)`` is the same on
    every machine whatever was drawn before, and a 5-way episode is the first five classes of
    the 20-way episode of the same seed and number.

    Args:
        labels: every image's class (tensor, array or list of ints), dataset order.
        classes: the class indices episodes may use (for example ``partition.novel``).
        n_way: classes per episode.
        k_shot: support images per class.
        q_query: query images per class.
        episodes: ``len(sampler)``; iteration yields episodes ``0 .. episodes - 1``.
        seed: which episodes.
        exclude: images never used: dataset indices, or a bool mask of every image (True:
            excluded; for example ``~data.usable`` of :func:`load_fewshot`).
        ids: the dataset index each of ``labels`` stands for (default: its position), used in
            the image ranks, increasing. Given a subset's labels with their dataset indices,
            the sampler draws the dataset's own episodes, as positions into the subset.

    Raises:
        ValueError: an argument out of range, or a class of ``classes`` with fewer than
            ``k_shot + q_query`` usable images (all such classes are named).
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        classes: Sequence[int],
        n_way: int,
        k_shot: int,
        q_query: int,
        episodes: int,
        seed: int = 0,
        exclude: torch.Tensor | np.ndarray | Iterable[int] | None = None,
        ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.n_way = _whole("n_way", n_way, 1)
        self.k_shot = _whole("k_shot", k_shot, 1)
        self.q_query = _whole("q_query", q_query, 0)
        self.episodes = _whole("episodes", episodes, 0)
        self.seed = _whole("seed", seed, 0)
        lab = _int_array("labels", labels)
        self.classes = tuple(_whole("a class index", c, 0) for c in _int_array("classes", classes))
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes repeat: give each class index once")
        if self.n_way > len(self.classes):
            raise ValueError(f"n_way={self.n_way} but only {len(self.classes)} classes given")
        keep = _kept(len(lab), exclude)
        self._ids = None if ids is None else _int_array("ids", ids)
        if self._ids is not None and (
            len(self._ids) != len(lab) or (len(lab) > 1 and (np.diff(self._ids) <= 0).any())
        ):
            raise ValueError(f"ids must be {len(lab)} increasing dataset indices, one per label")
        order = np.argsort(lab, kind="stable")
        order = order[keep[order]]
        sorted_lab = lab[order]
        self._pools: dict[int, list[int]] = {}
        need = self.k_shot + self.q_query
        short = []
        for c in self.classes:
            lo = int(np.searchsorted(sorted_lab, c, "left"))
            hi = int(np.searchsorted(sorted_lab, c, "right"))
            self._pools[c] = order[lo:hi].tolist()
            if hi - lo < need:
                short.append(f"{c} ({hi - lo})")
        if short:
            raise ValueError(
                f"k_shot + q_query = {need}, but {len(short)} of the classes have fewer usable "
                f"images: {', '.join(short[:10])}{' ...' if len(short) > 10 else ''}; leave "
                "them out of classes, or lower k_shot or q_query"
            )

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[list[int]]:
        for e in range(self.episodes):
            yield self.episode(e)

    def episode_classes(self, e: int) -> list[int]:
        """The class indices of episode ``e``, in episode order."""
        e = _whole("episode", e, 0)
        prefix = f"{EPISODE_VERSION}|{self.seed}|{e}|class|"

        def key(c: int) -> tuple[bytes, int]:
            return hashlib.sha256(f"{prefix}{c}".encode()).digest(), c

        return heapq.nsmallest(self.n_way, self.classes, key=key)

    def episode(self, e: int) -> list[int]:
        """The dataset indices of episode ``e`` (any ``e >= 0``), class-major."""
        out: list[int] = []
        need = self.k_shot + self.q_query
        for c in self.episode_classes(e):
            start = hashlib.sha256(f"{EPISODE_VERSION}|{self.seed}|{e}|{c}|".encode())

            def key(i: int, start=start, ids=self._ids) -> tuple[bytes, int]:
                h = start.copy()
                i = i if ids is None else int(ids[i])  # the dataset index the rank is keyed on
                h.update(b"%d" % i)
                return h.digest(), i

            out += heapq.nsmallest(need, self._pools[c], key=key)
        return out


def _kept(n: int, exclude) -> np.ndarray:
    """The images not excluded: ``exclude`` is None, dataset indices, or a bool mask of all
    ``n`` images (True: excluded, as ``~data.usable``)."""
    keep = np.ones(n, bool)
    if exclude is None:
        return keep
    if isinstance(exclude, torch.Tensor):
        exclude = exclude.detach().cpu().numpy()
    if not isinstance(exclude, (np.ndarray, Sequence)):  # a set, a generator: its indices
        try:
            exclude = list(exclude)
        except TypeError:
            what = f"exclude must be image indices or a bool mask, got {exclude!r}"
            raise ValueError(what) from None
    mask = np.asarray(exclude)
    if mask.dtype == bool:
        if mask.shape != (n,):
            raise ValueError(f"exclude as a mask must have one bool per image ({n}), got "
                             f"{mask.shape}")  # fmt: skip
        return ~mask
    ex = _int_array("exclude", exclude)
    if ex.size and (ex.min() < 0 or ex.max() >= n):
        raise ValueError(f"exclude holds indices outside 0..{n - 1}")
    keep[ex] = False
    return keep


def _int_array(name: str, values) -> np.ndarray:
    """``values`` as a 1-d int64 array, or a ValueError."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of whole numbers: {exc}") from None
    if arr.size == 0:
        arr = arr.astype(np.int64).reshape(-1)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-d sequence of whole numbers, got {arr.dtype} "
                         f"{arr.shape}")  # fmt: skip
    return arr.astype(np.int64)


def split_episode(
    images: torch.Tensor, labels: torch.Tensor, n_way: int, k_shot: int, q_query: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One episode's batch (from :class:`EpisodeSampler`'s layout) as ``(support_x,
    support_y, query_x, query_y)``, the labels renumbered ``0 .. n_way - 1`` in episode order:
    easyfsl's ``episodic_collate_fn`` output, except that easyfsl numbers the classes in the
    iteration order of a Python set of the labels rather than in episode order."""
    n_way = _whole("n_way", n_way, 1)
    k_shot = _whole("k_shot", k_shot, 1)
    q_query = _whole("q_query", q_query, 0)
    per = k_shot + q_query
    labels = torch.as_tensor(labels)
    if len(images) != n_way * per or labels.shape != (n_way * per,):
        raise ValueError(f"an episode of {n_way} x ({k_shot} + {q_query}) images needs "
                         f"{n_way * per} images and labels, got {len(images)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    blocks = labels.reshape(n_way, per)
    if not bool((blocks == blocks[:, :1]).all()) or len(set(blocks[:, 0].tolist())) != n_way:
        raise ValueError("not an episode: each class's images must be together (class-major, "
                         "support then queries) and the classes distinct")  # fmt: skip
    y = torch.arange(n_way).repeat_interleave(per).reshape(n_way, per)
    x = images.reshape(n_way, per, *images.shape[1:])
    rest = images.shape[1:]
    return (x[:, :k_shot].reshape(-1, *rest), y[:, :k_shot].reshape(-1),
            x[:, k_shot:].reshape(-1, *rest), y[:, k_shot:].reshape(-1))  # fmt: skip
