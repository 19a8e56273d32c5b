"""The long-tail report of a classifier on an imbalanced dataset (KKanji): top-1 and balanced
accuracy over the whole test set, and the same for the head, middle and tail classes taken
separately, the classes grouped by how many TRAINING images each had (the ImageNet-LT
"many / medium / few-shot" protocol):

- head: classes with at least :data:`HEAD_MIN` (100) training images;
- tail: classes with at most :data:`TAIL_MAX` (10) training images;
- middle: the classes in between.

A group's top-1 is over the group's test images (every image weighs the same, as ImageNet-LT
reports "many/medium/few"); its balanced accuracy is the mean recall of its classes. A class
with no test image is simply not counted: it adds neither a class nor an image to its group
(the record says how many such classes each group has, ``classes_without_test``). On KKanji's
default split every class of 1 to 4 images is one (``floor(n * 0.2) = 0`` test images).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .scores import accuracy, balanced_accuracy

HEAD_MIN = 100  # a head class has at least this many training images
TAIL_MAX = 10  # a tail class has at most this many training images
GROUPS = ("head", "middle", "tail")


def class_groups(
    train_counts: Sequence[int] | np.ndarray | torch.Tensor,
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> np.ndarray:
    """The group of every class from its number of training images: 0 head (``>= head_min``),
    1 middle, 2 tail (``<= tail_max``); an int64 array, one entry per class."""
    if not 0 <= tail_max < head_min:
        raise ValueError(
            f"need 0 <= tail_max < head_min, got tail_max={tail_max}, head_min={head_min}"
        )
    counts = np.asarray(torch.as_tensor(train_counts).cpu().numpy()).reshape(-1)
    if counts.size and counts.min() < 0:
        raise ValueError("train_counts must be 0 or more")
    groups = np.ones(len(counts), dtype=np.int64)
    groups[counts >= head_min] = 0
    groups[counts <= tail_max] = 2
    return groups


def longtail_scores(
    pred: Any,
    target: Any,
    train_counts: Sequence[int] | np.ndarray | torch.Tensor,
    head_min: int = HEAD_MIN,
    tail_max: int = TAIL_MAX,
) -> dict[str, Any]:
    """Top-1 and balanced accuracy overall and per group (see the module's docstring).

    Args:
        pred: predicted class indices, one per test image (tensor or array).
        target: the true class indices, as long as ``pred``.
        train_counts: training images of every class (index = class); every class in
            ``target`` must have an entry.
        head_min: a class with at least this many training images is in the head.
        tail_max: a class with at most this many training images is in the tail.

    Returns:
        ``top1``, ``balanced_accuracy``, ``test_images``, ``classes`` (with a test image),
        ``thresholds`` and ``groups``: per group ``classes``, ``test_images``,
        ``train_images``, ``classes_without_test``, ``top1`` and ``balanced_accuracy`` (None
        where the group has no test image).
    """
    p = torch.as_tensor(pred).reshape(-1).long().cpu()
    t = torch.as_tensor(target).reshape(-1).long().cpu()
    if p.shape != t.shape:
        raise ValueError(f"{len(p)} predictions but {len(t)} targets")
    if len(t) == 0:
        raise ValueError("no test images: the long-tail scores of an empty set are undefined")
    counts = np.asarray(torch.as_tensor(train_counts).cpu().numpy()).reshape(-1)
    if t.min() < 0 or int(t.max()) >= len(counts):
        raise ValueError(
            f"targets run from {int(t.min())} to {int(t.max())} but train_counts has "
            f"{len(counts)} classes"
        )
    groups = class_groups(counts, head_min, tail_max)
    support = np.bincount(t.numpy(), minlength=len(counts))
    record: dict[str, Any] = {
        "top1": accuracy(p, t),
        "balanced_accuracy": balanced_accuracy(p, t),
        "test_images": len(t),
        "classes": int((support > 0).sum()),
        "thresholds": {"head_min": head_min, "tail_max": tail_max},
        "groups": {},
    }
    image_group = torch.from_numpy(groups)[t]
    for g, name in enumerate(GROUPS):
        members = groups == g
        rows = image_group == g
        n = int(rows.sum())
        record["groups"][name] = {
            "classes": int((members & (support > 0)).sum()),
            "test_images": n,
            "train_images": int(counts[members].sum()),
            "classes_without_test": int((members & (support == 0)).sum()),
            "top1": accuracy(p[rows], t[rows]) if n else None,
            "balanced_accuracy": balanced_accuracy(p[rows], t[rows]) if n else None,
        }
    return record


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def longtail_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table of ``(model title, longtail_scores record)`` rows: top-1 and balanced
    accuracy overall, then top-1 / balanced per group, then each group's classes and test
    images (the same for every row that used the same split)."""
    if not rows:
        return ""
    th = rows[0][1]["thresholds"]
    names = {
        "head": f"Head (≥ {th['head_min']})",
        "middle": "Middle",
        "tail": f"Tail (≤ {th['tail_max']})",
    }
    out = [
        "| Model | Top-1 | Balanced | " + " | ".join(names[g] for g in GROUPS) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(GROUPS),
    ]
    for title, rec in rows:
        cells = [
            f"{_pct(rec['groups'][g]['top1'])} / {_pct(rec['groups'][g]['balanced_accuracy'])}"
            for g in GROUPS
        ]
        out.append(
            f"| {title} | {_pct(rec['top1'])} | {_pct(rec['balanced_accuracy'])} | "
            + " | ".join(cells)
            + " |"
        )

    def sizes(rec: dict[str, Any]) -> str:
        return "; ".join(
            f"{names[g].lower()}: {rec['groups'][g]['classes']:,} classes, "
            f"{rec['groups'][g]['test_images']:,} test images"
            for g in GROUPS
        )

    # Each row's groups, once where every row has the same (rows of one split).
    told = list(dict.fromkeys(sizes(rec) for _, rec in rows))
    out.append("")
    if len(told) == 1:
        out.append(f"Groups: {told[0]}.")
    else:
        out += [f"- {title}: {sizes(rec)}" for title, rec in rows]
    out += [
        "",
        f"Groups by training images per class: head ≥ {th['head_min']}, tail ≤ "
        f"{th['tail_max']}, middle between; a group's cell is top-1 over its test images / "
        "balanced accuracy over its classes. Classes without a test image are not counted.",
    ]
    return "\n".join(out) + "\n"
