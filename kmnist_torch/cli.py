"""Command line: ``python -m kmnist_torch available | info | download | verify | resplit | subset
| montage | kkanji-split | kkanji-fewshot-split | audit``. Every command reads the catalog;
nothing here repeats it."""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

from . import catalog
from ._args import ROOT_HELP, Parser, add_data_options, output_problem, run_main
from ._audit import add_parser as add_audit_parser
from ._fewshot_split import add_parser as add_fewshot_split_parser
from .download.fetch import Target
from .download.sources import NO_SOURCE, default_root, mirrors, resolve_root
from .errors import USAGE, DataFilesError, FormatError
from .reporting.montage import montage


def _names(names: list[str]) -> list[str]:
    return [catalog.get(n).name for n in names] if names else list(catalog.DATASETS)


def cmd_available(args: argparse.Namespace) -> int:
    """One line per dataset: name, title, images, classes."""
    for info in catalog.DATASETS.values():
        total = sum(info.split_sizes.values())
        shape = "x".join(map(str, info.image_shape))
        print(f"{info.name:8s} {info.title:18s} {total:>8,} images  {info.num_classes:>5} classes"
              f"  {shape}")  # fmt: skip
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Counts, classes with characters and romaji, per-class counts, files, licence."""
    info = catalog.get(args.name)
    print(f"{info.title} ({info.name})")
    print(f"  {info.description}")
    print(f"  image shape: {info.image_shape[0]}x{info.image_shape[1]} uint8 grayscale")
    if info.smaller_sizes:  # KKanji's image_size option
        smaller, n = " or ".join(f"{s}x{s}" for s in info.smaller_sizes), info.smaller_sizes[0]
        print(f"  also {smaller} by exact 2x2 means: image_size={n} (train: --image-size {n}); "
              "the split stays the same")  # fmt: skip
    for split, n in info.split_sizes.items():
        print(f"  {split}: {n:,} images")
    print(f"  folder: <root>/{info.folder}/   (default root: {default_root()})")
    if info.classes:
        print(f"\n  {'idx':>3}  {'codepoint':9s} char  {'romaji':15s} "
              + "  ".join(f"{s:>6s}" for s in info.class_counts))  # fmt: skip
        for c in info.classes:
            counts = "  ".join(f"{info.class_counts[s][c.index]:>6,}" for s in info.class_counts)
            print(f"  {c.index:>3}  {c.codepoint:9s} {c.char}    {c.romaji:15s} {counts}")
    else:
        print(f"\n  {info.num_classes} classes, named by the folders of the archive")
    print("\n  files (relative to each mirror base):")
    for f in info.files():
        size = f"{f.size:,} bytes" if f.size is not None else "size not published"
        print(f"    {f.path}  {size}")
        print(f"      md5:    {f.md5 or 'not published'}")
        if f.sha256:
            print(f"      sha256: {f.sha256}")
    if info.archive is not None:  # one archive with no published checksum: say what is checked
        note = textwrap.fill("verification: " + catalog.KKANJI_VERIFICATION_NOTE, width=96,
                             initial_indent="  ", subsequent_indent="    ")  # fmt: skip
        print("\n" + note)
    print(f"\n  mirrors tried, in order: {', '.join(mirrors()) or '(none: ' + NO_SOURCE + ')'}")
    print(f"  licence: {info.license}; attribution: {info.attribution}")
    print(f"  cite: {info.citation}")
    return 0


def _checked(ds, verify: bool) -> str:
    """What was checked of a dataset just loaded, in words that never overstate it."""
    if not verify:
        return "checksums not checked (--no-verify)"
    if getattr(ds, "derived", None):
        return f"{ds.derived}, verified against its manifest (nothing downloaded)"
    if getattr(ds, "verified", True):
        return "verified against the published checksums"
    return "size and format checked; no published checksum for some files (see the warning)"


def cmd_download(args: argparse.Namespace) -> int:
    """Download and check every split of each named dataset; carry on past a failure, then
    list every file still missing with its URLs and the path to put it at."""
    from .data.registry import create_dataset
    from .data.verify import missing_files

    root = resolve_root(args.root)
    failed: list[str] = []
    missing: list[Target] = []
    if not args.verify:
        print("--no-verify: checksums are not checked (format checks still are)", file=sys.stderr)
    for name in _names(args.names):
        info = catalog.get(name)
        fmts: list = []
        if info.formats:  # KKanji has none: one tar
            fmts = info.formats if args.format == "all" else [args.format or info.formats[0]]
        jobs = [(None, "all")] if info.archive is not None else [
            (fmt, split) for fmt in fmts for split in info.splits]  # fmt: skip
        for fmt, split in jobs:
            label = f"{name} {split}" + (f" ({fmt})" if fmt else "")
            try:
                if fmt is not None and fmt not in info.formats:
                    raise ValueError(f"{name} has no {fmt!r} format; it has {info.formats}")
                if fmt is not None:
                    _replace_bad(info, root, split, fmt, args.verify)
                kw = {"format": fmt} if fmt is not None and len(info.formats) > 1 else {}
                with warnings.catch_warnings():
                    if not args.verify:  # said once above
                        warnings.filterwarnings("ignore", message=".*verify=False")
                    ds = create_dataset(
                        name, root, split=split, download=True, verify=args.verify, **kw
                    )
                where = getattr(ds, "raw_folder", None) or ds.folder
                print(f"{label}: {len(ds):,} images, {_checked(ds, args.verify)}, in {where}")
            except (DataFilesError, FormatError, ValueError) as exc:
                print(f"error: {label}: {exc}", file=sys.stderr)
                failed.append(label)
        if all(f in info.formats for f in fmts):
            missing += missing_files(info, root, fmts)
    if not failed:
        return 0
    print(f"\n{len(failed)} of the downloads failed: {', '.join(failed)}.", file=sys.stderr)
    if missing:
        print("Files still missing (fetch them by hand, or set $KMNIST_TORCH_MIRRORS):",
              file=sys.stderr)  # fmt: skip
        for t in missing:
            print(t.describe(), file=sys.stderr)
    return 1


def _replace_bad(info: catalog.DatasetInfo, root: Path, split: str, fmt: str, verify: bool):
    """The ``download`` command replaces the official files of a split that are present but
    fail verification (it is asked for, as ``verify --repair`` is), in one transaction with
    those of the pair that are missing: both together or neither, so a partner that cannot be
    fetched leaves the other file as it was. A file there only as its extracted idx copy is
    left to loading (which checks it), and a derived root (with a manifest) is left alone."""
    from .data.arrays import present, raw_folder
    from .download.manifest import manifest_path
    from .download.sources import ensure_files, target_for

    folder = raw_folder(root, info)
    if manifest_path(folder).exists():
        return
    pair = info.splits[split][fmt]
    if not any(present(f, folder) or (folder / f.name).is_symlink() for f in pair):
        return  # nothing there: loading fetches the pair and the class map together
    wanted = [f for f in pair
              if present(f, folder) != "extracted" or (folder / f.name).is_symlink()]  # fmt: skip
    targets = [target_for(f, folder, info.bases) for f in wanted]
    ensure_files(targets, True, verify, name=info.name, replace=True)


def cmd_resplit(args: argparse.Namespace) -> int:
    """Write a KMNIST training set from the real test split alone: 8,000 train / 2,000 test,
    a derived root with a manifest, which trains without --no-verify."""
    from .data.arrays import raw_folder
    from .data.resplit import write_resplit

    source = Path(args.source).expanduser()
    nested = raw_folder(source, catalog.KMNIST)  # a data root given instead of its raw folder
    if not (source / "t10k-images-idx3-ubyte.gz").is_file() and nested.is_dir():
        source = nested
    root = resolve_root(args.root)
    sizes = write_resplit(root, source, args.seed)
    folder = raw_folder(root, catalog.KMNIST)
    print(f"wrote {folder}: the real KMNIST test images of {source} re-split "
          f"{sizes['train']:,} train / {sizes['test']:,} test (seed {args.seed}), with a "
          "manifest (kmnist_torch-derived.json)")  # fmt: skip
    print(f"train on it: python -m kmnist_torch.train --root {root} --no-download")
    return 0


def cmd_subset(args: argparse.Namespace) -> int:
    """Write a stratified subset of a root's splits to another root, with a manifest."""
    from .data.resplit import write_subset

    info = catalog.get(args.name)
    if info.archive is not None:
        print(f"error: {info.name} has no official split to subset; use kkanji-split "
              "--shots or the trainer's --limit-train", file=sys.stderr)  # fmt: skip
        return USAGE
    for flag, n in (("--train", args.train), ("--test", args.test)):
        if n is not None and n < 1:
            print(f"error: {flag} must be a whole number >= 1, got {n}", file=sys.stderr)
            return USAGE
    with warnings.catch_warnings():
        if not args.verify:
            warnings.simplefilter("ignore")
        sizes = write_subset(resolve_root(args.root), info.name, resolve_root(args.out_root),
                             {"train": args.train, "test": args.test}, args.seed,
                             args.verify)  # fmt: skip
    print(f"wrote {args.out_root}: {info.name} subset, "
          + ", ".join(f"{n:,} {split}" for split, n in sizes.items())
          + " (stratified), with a manifest (kmnist_torch-derived.json)")  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file present under the root in full: rehash each one (no remembered hash is
    trusted), decode each split, check KKanji's tar against its record and its decoded cache
    against the PNG tree. Exit 1 naming every bad file; ``--repair`` downloads bad files again
    and rebuilds the KKanji cache."""
    root = resolve_root(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a folder: nothing to verify (pass --root, or set "
              "$KMNIST_TORCH_ROOT to the data folder)", file=sys.stderr)  # fmt: skip
        return 1
    from .data.verify import verify_dataset

    status = 0
    for name in _names(args.names):
        status |= verify_dataset(root, name, args.repair)
    return status


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")


MAX_PER_CLASS = 200  # images in one montage row


def _montage_problem(args: argparse.Namespace) -> str | None:
    """Why montage's arguments cannot work (before any data is read), or None."""
    problem = output_problem(Path(args.out), IMAGE_SUFFIXES)
    if problem is None and args.per_class < 1:
        problem = f"--per-class must be a whole number >= 1, got {args.per_class}"
    if problem is None and args.max_classes < 1:
        problem = f"--max-classes must be a whole number >= 1, got {args.max_classes}"
    if problem is None and args.per_class > MAX_PER_CLASS:
        problem = f"--per-class is at most {MAX_PER_CLASS} (a row that wide is unreadable)"
    if problem is None and args.seed < 0:
        problem = f"--seed must be a whole number >= 0, got {args.seed}"
    return problem


def _montage_dataset(args: argparse.Namespace, root: Path) -> tuple[Any, str]:
    """The split montage draws from, and its name: ``--split``, else the whole of a dataset
    without an official split, else train where it is there, else test."""
    from .data.registry import create_dataset, entry

    e = entry(args.name)
    if e.split_keyword == "split":
        split = args.split or "all"
        ds = create_dataset(args.name, root, split=split, download=args.download,
                            verify=args.verify)  # fmt: skip
        return ds, split
    names = [args.split] if args.split else ["train", "test"]  # none named: whichever is there
    tried: list[str] = []
    reasons: set[str] = set()
    for k, split in enumerate(names):
        try:  # only the last split tried is downloaded
            ds = create_dataset(args.name, root, split=split, verify=args.verify,
                                download=args.download and k == len(names) - 1)  # fmt: skip
            return ds, split
        except DataFilesError as exc:
            tried.append(f"{split} split: {exc}")
            reasons.add(str(exc))
    # Every split tried: say why each failed; a missing-files error (it names the files of
    # both splits) only once.
    raise DataFilesError(reasons.pop() if len(reasons) == 1 else "\n".join(tried))


def cmd_montage(args: argparse.Namespace) -> int:
    """Save a grid of random examples per class, labelled with the character."""
    from .data.registry import entry

    root = resolve_root(args.root)
    problem = _montage_problem(args)
    info = catalog.get(args.name)
    if problem is None and args.split is not None and args.split not in entry(info.name).splits:
        whole = [n for n in catalog.DATASETS if "all" in entry(n).splits]
        problem = f"--split all is for {', '.join(whole)}; {args.name} has train and test"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            if not args.verify:  # the user's explicit choice: said once below, not per file
                warnings.simplefilter("ignore")
            ds, split = _montage_dataset(args, root)
    except (DataFilesError, FormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    title = (f"{info.title} ({info.name}), {split} split\n"
             f"{args.per_class} random images per class (seed {args.seed})")  # fmt: skip
    used_font = montage(ds, Path(args.out), args.per_class, args.max_classes, seed=args.seed,
                        title=title)  # fmt: skip
    note = (
        ""
        if used_font
        else " (no CJK font found: labelled with codepoints; set $KMNIST_TORCH_FONT)"
    )
    if not args.verify:
        print("warning: --no-verify: checksums are not checked", file=sys.stderr)
    print(f"wrote {args.out}{note}")
    return 0


def cmd_kkanji_split(args: argparse.Namespace) -> int:
    """Write the KKanji split's file names as JSON, so a split can be published and reused."""
    from .data.kkanji.split import write_split_file

    problem = output_problem(Path(args.out))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        if not args.verify:
            warnings.simplefilter("ignore")
        try:
            split = write_split_file(args.out, root=args.root, test_fraction=args.test_fraction,
                                seed=args.seed, min_per_class=args.min_per_class,
                                shots=args.shots, download=args.download,
                                verify=args.verify)  # fmt: skip
        except (DataFilesError, FormatError, ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    n_train, n_test = len(split["train"]), len(split["test"])
    print(f"wrote {args.out}: {n_train:,} train / {n_test:,} test file names")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m kmnist_torch``."""
    p = Parser(prog="python -m kmnist_torch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("available", help="list the datasets").set_defaults(func=cmd_available)
    s = sub.add_parser("info", help="counts, classes, files, licence of a dataset")
    s.add_argument("name")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("download", help="download and verify datasets")
    s.add_argument("names", nargs="+")
    formats = sorted({fmt for info in catalog.DATASETS.values() for fmt in info.formats})
    s.add_argument("--format", choices=[*formats, "all"], default=None,
                   help="KMNIST file format (default mnist; K49 has only npz)")  # fmt: skip
    add_data_options(s, download=None, device_help=None)
    s.set_defaults(func=cmd_download)
    s = sub.add_parser("verify", help="check downloaded files against the catalog")
    s.add_argument("names", nargs="*")
    add_data_options(s, download=None, device_help=None, verify=False)
    s.add_argument("--repair", action="store_true",
                   help="download bad files again and rebuild the KKanji cache")  # fmt: skip
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser(
        "resplit",
        help="a KMNIST training set without the official training files: the real test "
        "split cut 8,000 train / 2,000 test (offline, air-gapped machines)",
    )
    s.add_argument("source", metavar="SOURCE_DIR",
                   help="a folder (or data root) holding the real t10k-images-idx3-ubyte.gz "
                   "and t10k-labels-idx1-ubyte.gz")  # fmt: skip
    s.add_argument("--root", default=None, help="the data root to write; " + ROOT_HELP[12:])
    s.add_argument("--seed", type=int, default=0, help="the shuffle before the cut")
    s.set_defaults(func=cmd_resplit)
    s = sub.add_parser("subset", help="a stratified subset of a root, written as another root")
    s.add_argument("name")
    s.add_argument("--out-root", required=True, help="the data root to write")
    s.add_argument("--train", type=int, default=None, help="training images kept (default all)")
    s.add_argument("--test", type=int, default=None, help="test images kept (default all)")
    s.add_argument("--seed", type=int, default=0, help="which images of each class are kept")
    add_data_options(s, download=None, device_help=None)
    s.set_defaults(func=cmd_subset)
    s = sub.add_parser("montage", help="save a grid of examples per class as PNG")
    s.add_argument("name")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=10)
    s.add_argument("--max-classes", type=int, default=49)
    s.add_argument("--split", choices=["train", "test", "all"], default=None,
                   help="default: train if present, else test (all for kkanji)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="which random images per class")
    add_data_options(s, download=False, device_help=None)
    s.set_defaults(func=cmd_montage)
    add_kkanji_parsers(sub)
    add_audit_parser(sub)
    return p


def add_kkanji_parsers(sub: Any) -> None:
    """The ``kkanji-split`` and ``kkanji-fewshot-split`` subcommands."""
    s = sub.add_parser("kkanji-split", help="write the KKanji train/test split as JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-per-class", type=int, default=1)
    s.add_argument("--shots", type=int, default=None)
    add_data_options(s, download=False, device_help=None)
    s.set_defaults(func=cmd_kkanji_split)
    add_fewshot_split_parser(sub)


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run its command; returns the exit status (2: an unknown dataset)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyError as exc:  # unknown dataset name: a usage error, as argparse's are
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    if hasattr(signal, "SIGPIPE"):  # `python -m kmnist_torch info k49 | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return run_main(run, argv, status=lambda code: code)


if __name__ == "__main__":
    sys.exit(main())
