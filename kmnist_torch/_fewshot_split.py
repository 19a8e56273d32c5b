"""``python -m kmnist_torch kkanji-fewshot-split --out FILE``: the few-shot partition of the
KKanji classes (base / validation / novel) written as JSON, its sha256 printed for citing. The
partition is :mod:`kmnist_torch.data.kkanji.fewshot`'s."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from ._args import add_data_options, output_problem
from .errors import DataFilesError, FormatError


def add_parser(sub: Any) -> None:
    """The ``kkanji-fewshot-split`` subcommand, added to the CLI's subparsers. The defaults
    are the partition's own (None here: importing it would import torch at every start)."""
    s = sub.add_parser(
        "kkanji-fewshot-split",
        help="write the KKanji few-shot partition (base / val / novel classes) as JSON",
    )
    s.add_argument("--out", required=True, help="the JSON file to write")
    s.add_argument("--seed", type=int, default=0, help="which classes are drawn")
    s.add_argument("--n-val", type=int, default=None, help="validation classes (default 100)")
    s.add_argument("--n-novel", type=int, default=None, help="novel classes (default 200)")
    s.add_argument("--min-images", type=int, default=None,
                   help="fewest usable images of a val or novel class (default 20: 5 shots + "
                   "15 queries)")  # fmt: skip
    add_data_options(s, download=False, device_help=None)
    s.set_defaults(func=cmd_fewshot_split)


def cmd_fewshot_split(args: argparse.Namespace) -> int:
    """Write the partition; exit 1 with one line when the tree or the arguments cannot give
    it, 2 when ``--out`` cannot be written."""
    from .data.kkanji.fewshot import write_partition

    out = Path(args.out)
    problem = output_problem(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        if not args.verify:
            warnings.simplefilter("ignore")
        try:
            given = {k: getattr(args, k) for k in ("n_val", "n_novel", "min_images")}
            path, sha = write_partition(
                out,
                args.root,
                seed=args.seed,
                download=args.download,
                verify=args.verify,
                **{k: v for k, v in given.items() if v is not None},
            )
        except (DataFilesError, FormatError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    doc = json.loads(path.read_text(encoding="utf-8"))
    print(
        f"wrote {path}: {len(doc['base']):,} base / {len(doc['val']):,} val / "
        f"{len(doc['novel']):,} novel classes ({doc['partition_version']}, seed {args.seed})"
    )
    print(f"sha256 {sha}")  # fmt: skip
    return 0
