"""``python -m kmnist_torch audit NAME``: what is inside a dataset's images (exact duplicates
within and across classes, blank images, per-class counts; for KMNIST, the black and
duplicated images of the pre-2019 release), written as JSON and shown as a picture. The
measures are :mod:`kmnist_torch.data.audit`'s."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import catalog
from ._args import add_data_options
from ._io import write_json
from .download.sources import resolve_root
from .errors import DataFilesError, FormatError
from .reporting.montage import montage

PICTURE_ROWS = 12  # groups shown in the picture (the JSON lists them all)
PICTURE_PER_ROW = 16


def add_parser(sub: Any) -> None:
    """The ``audit`` subcommand, added to the CLI's subparsers."""
    s = sub.add_parser(
        "audit",
        help="duplicates, blank images and per-class counts of a dataset, as JSON and a picture",
    )
    s.add_argument("name", help="kmnist, k49 or kkanji (the files the root has)")
    s.add_argument("--out", default=None, help="the JSON report (default audit-NAME.json)")
    s.add_argument("--picture", default=None,
                   help="the picture of what was found (default audit-NAME.png)")  # fmt: skip
    add_data_options(s, download=None, device_help=None)
    s.set_defaults(func=cmd_audit)


def _kkanji(root: Path, verify: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    from .data.kkanji.audit import audit_tree, labels_of
    from .data.kkanji.cache import images, open_source

    folder = root / catalog.KKANJI.folder
    with warnings.catch_warnings():
        if not verify:
            warnings.simplefilter("ignore")
        listing = open_source(folder, False, verify)
    arr = images(folder, listing)
    return audit_tree(listing, arr), arr, labels_of(listing)


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a dataset's files; exit 0 whatever is found (the report says it), 1 when the
    files cannot be read."""
    from .data.audit import audit_official

    info = catalog.get(args.name)
    root = resolve_root(args.root)
    out = Path(args.out or f"audit-{info.name}.json")
    picture = Path(args.picture or f"audit-{info.name}.png")
    try:
        if info.name == "kkanji":
            report, images, _ = _kkanji(root, args.verify)
        else:
            report, images, _ = audit_official(info.name, root)
    except (DataFilesError, FormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_json(out, report)
    _picture(report, images, picture, info)
    for line in summary(report):
        print(line)
    print(f"wrote {out} and {picture}")
    return 0


def summary(report: dict) -> list[str]:
    """The report in a few lines."""
    same, blank = report["identical"], report["blank"]
    lines = [
        f"{report['dataset']}: {report['images']:,} images in {report['classes']:,} classes",
        f"identical images: {same['groups']} groups holding {same['images_in_groups']} images "
        f"({same['within_one_class']} within one class, {same['across_classes']} across classes)",
    ]
    for g in same["list"][:5]:
        kind = ", blank" if g["blank"] else ""
        lines.append(f"  {g['size']} identical{kind}, classes: {' / '.join(g['classes'][:8])}"
                     + (" ..." if len(g["classes"]) > 8 else ""))  # fmt: skip
    classes = sorted({b["class"] for b in blank["list"]})
    lines.append(f"blank images: {blank['count']} ({blank['black']} all black), in "
                 f"{len(classes)} classes")  # fmt: skip
    if report.get("copy_artefacts_set_aside"):
        lines.append(f"copy artefacts set aside: {len(report['copy_artefacts_set_aside'])}")
    if "stale_release" in report:
        lines.append(f"stale release: {report['stale_release']['verdict']}")
    return lines


def _picture(report: dict, images: np.ndarray, out: Path, info: catalog.DatasetInfo) -> None:
    """One row of blank images, then one row per group of identical images (the first
    ``PICTURE_ROWS``), labelled; the title says what each row is."""
    rows: list[list[int]] = []
    labels: list[str] = []
    if report["blank"]["list"]:
        rows.append([b["index"] for b in report["blank"]["list"]])
        labels.append("blank")
    for k, g in enumerate(report["identical"]["list"][:PICTURE_ROWS]):
        rows.append([m["index"] for m in g["images"]])
        labels.append(f"same{k + 1}")
    title = (f"{info.title}: audit of {report['images']:,} images. Rows: "
             + ("blank images; " if report["blank"]["list"] else "")
             + "groups of identical images (sameN), with their classes: "
             + "; ".join(f"same{k + 1}: {' '.join(c.split()[-1] for c in g['classes'][:12])}"
                         for k, g in enumerate(report["identical"]["list"][:PICTURE_ROWS]))
             + ("" if rows else "nothing found"))  # fmt: skip
    flat = [i for r in rows for i in r] or [0]
    targets = np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)] or [[0]])
    shown = SimpleNamespace(data=images[np.asarray(flat)], targets=targets.astype(np.int64),
                            classes=labels or ["-"], codepoints=labels or ["-"],
                            romaji=[""] * max(1, len(labels)))  # fmt: skip
    montage(shown, out, PICTURE_PER_ROW, max(1, len(rows)), title=title)
