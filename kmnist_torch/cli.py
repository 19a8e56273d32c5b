"""Command line: ``python -m kmnist_torch available | info | download | verify | montage |
kkanji-split``. Every command reads the catalog; nothing here repeats it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import warnings
from pathlib import Path

from . import catalog
from ._args import add_data_options
from ._io import HashRecord
from .download.fetch import Target, check
from .download.sources import NO_SOURCE, default_root, mirrors, resolve_root, target_for
from .errors import DataFilesError, FormatError
from .reporting.montage import montage


def _create(name: str, root: Path, **kwargs):
    """The dataset ``name`` from the registry (imported here: the catalog commands need no
    torch)."""
    from .data.registry import create_dataset

    return create_dataset(name, root, **kwargs)


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
    if info.name == "kkanji":
        note = textwrap.fill("verification: " + catalog.KKANJI_VERIFICATION_NOTE, width=96,
                             initial_indent="  ", subsequent_indent="    ")  # fmt: skip
        print("\n" + note)
    print(f"\n  mirrors tried, in order: {', '.join(mirrors()) or '(none: ' + NO_SOURCE + ')'}")
    print(f"  licence: {catalog.LICENSE}; attribution: {catalog.ATTRIBUTION}")
    print(f"  cite: {catalog.CITATION}")
    return 0


def _still_missing(info: catalog.DatasetInfo, root: Path, fmts: list[str]) -> list[Target]:
    """The official files of ``info`` (in ``fmts``) that are in no usable form under ``root``."""
    if info.archive is not None:  # KKanji: the tar, unless the tree is extracted
        folder = root / info.folder
        if (folder / "kkanji2").is_dir() or (folder / info.archive.name).is_file():
            return []
        return [target_for(info.archive, folder, info.bases, shown=True)]
    from .data.arrays import present, raw_folder

    folder = raw_folder(root, info)
    remotes = [f for pairs in info.splits.values() for fmt in fmts for f in pairs.get(fmt, ())]
    if info.classmap is not None:
        remotes.append(info.classmap)
    return [
        target_for(f, folder, info.bases, shown=True) for f in remotes if not present(f, folder)
    ]


def _checked(ds, verify: bool) -> str:
    """What was checked of a dataset just loaded, in words that never overstate it."""
    if not verify:
        return "checksums not checked (--no-verify)"
    if getattr(ds, "verified", True):
        return "verified against the published checksums"
    return "size and format checked; no published checksum for some files (see the warning)"


def cmd_download(args: argparse.Namespace) -> int:
    """Download and check every split of each named dataset; carry on past a failure, then
    list every file still missing with its URLs and the path to put it at."""
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
                kw: dict = {"split": split} if fmt is None else {"train": split == "train"}
                if fmt is not None and len(info.formats) > 1:
                    kw["format"] = fmt
                with warnings.catch_warnings():
                    if not args.verify:  # said once above
                        warnings.filterwarnings("ignore", message=".*verify=False")
                    ds = _create(name, root, download=True, verify=args.verify, **kw)
                where = getattr(ds, "raw_folder", None) or ds.folder
                print(f"{label}: {len(ds):,} images, {_checked(ds, args.verify)}, in {where}")
            except (DataFilesError, FormatError, ValueError) as exc:
                print(f"error: {label}: {exc}", file=sys.stderr)
                failed.append(label)
        if all(f in info.formats for f in fmts):
            missing += _still_missing(info, root, fmts)
    if not failed:
        return 0
    print(f"\n{len(failed)} of the downloads failed: {', '.join(failed)}.", file=sys.stderr)
    if missing:
        print("Files still missing (fetch them by hand, or set $KMNIST_TORCH_MIRRORS):",
              file=sys.stderr)  # fmt: skip
        for t in missing:
            print(t.describe(), file=sys.stderr)
    return 1


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
    status = 0
    for name in _names(args.names):
        info = catalog.get(name)
        if info.name == "kkanji":
            status |= _verify_kkanji(root, info, args.repair)
        else:
            status |= _verify_arrays(root, info, args.repair)
    return status


def _copy_problem(gz: Path, copy: Path) -> str | None:
    """Why ``copy`` is not the decompressed content of ``gz`` (the extracted idx file kept
    beside it, which loading reads), or None."""
    from .data.formats import read_gzip

    try:
        same = read_gzip(gz) == copy.read_bytes()
    except (FormatError, OSError) as exc:
        return f"cannot compare it with {gz.name} ({exc})"
    if same:
        return None
    return f"differs from {gz.name}, which it was extracted from (rewritten from it on repair)"


def _verify_arrays(root: Path, info, repair: bool) -> int:
    """Rehash every file of ``info`` under ``root`` in whichever form it is there (the
    official file, or only the idx file extracted from it), then decode each complete split."""
    from .data.arrays import extracted_target, present, raw_folder
    from .download.sources import ensure_files

    name = info.name
    folder = raw_folder(root, info)
    record = HashRecord(folder)
    found = False
    status = 0
    for split, formats in info.splits.items():
        for fmt, pair in formats.items():
            forms = [present(f, folder) for f in pair]
            found = found or any(forms)
            checked = []  # (target, problem, whether a published checksum was compared)
            for remote, form in zip(pair, forms):
                if form == "official":
                    t = target_for(remote, folder, info.bases)
                elif form == "extracted":
                    t = extracted_target(remote, folder)
                else:
                    continue
                known = bool(t.md5 or t.sha256)
                checked.append((t, check(t, True, record, full=True), known))
                copy = extracted_target(remote, folder)
                if form == "official" and copy is not None and copy.dest.is_file():
                    # The extracted copy is what loading reads: it must be the .gz's content.
                    checked.append((copy, _copy_problem(t.dest, copy.dest), True))
            for t, problem, known in checked:
                verdict = "OK" if known else "OK (size only: no published checksum to check)"
                print(f"{name} {t.dest.name}: {verdict if problem is None else 'BAD: ' + problem}")
            bad = [t for t, problem, _ in checked if problem]
            if bad and repair:
                for t in bad:
                    t.dest.unlink(missing_ok=True)
                    record.forget(t.dest.name)
                try:  # fetch the official files now missing; loading re-extracts the copies
                    targets = [target_for(f, folder, info.bases) for f in pair]
                    ensure_files(targets, True, True, name=name)
                    for t in bad:
                        how = "downloaded again" if t.dest.suffix else "rewritten from the .gz"
                        print(f"{name} {t.dest.name}: repaired ({how})")
                    bad, forms = [], ["official"] * len(pair)
                except DataFilesError as exc:
                    print(f"{name} {split} ({fmt}): repair failed: {exc}")
            if bad:
                status = 1
            elif all(forms):  # a whole split: decode it too
                kw = {"format": fmt} if len(info.formats) > 1 else {}
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # said per file above
                        ds = _create(name, root, train=split == "train", **kw)
                    print(f"{name} {split} ({fmt}): decodes, {len(ds):,} images")
                except (DataFilesError, FormatError) as exc:
                    print(f"{name} {split} ({fmt}): BAD: {exc}")
                    status = 1
    if not found:
        print(f"{name}: not downloaded ({folder})")
    return status


def _verify_kkanji(root: Path, info, repair: bool) -> int:
    import shutil

    from ._io import hash_file
    from .data.kkanji import archive, cache, layout

    folder = root / info.folder
    if not folder.exists():
        print(f"kkanji: not downloaded ({folder})")
        return 0
    bad: list[str] = []
    tar, tree = folder / layout.TAR_NAME, folder / layout.TREE_NAME
    tar_bad = tree_bad = False
    try:
        rec = archive.read_record(folder)
    except DataFilesError as exc:
        rec, tar_bad = None, True
        bad.append(str(exc))
    if tar.is_file() and rec is not None:
        _, sha = hash_file(tar)
        if sha != rec["sha256"] or tar.stat().st_size != rec["size"]:
            tar_bad = True
            bad.append(f"{tar}: sha256 {sha} differs from the one recorded ({rec['sha256']})")
    listing = None
    if tree.is_dir():
        try:
            listing = cache.scan_tree(tree, verify=True)
        except DataFilesError as exc:
            tree_bad = True
            bad.append(str(exc))
    elif not tar.is_file():
        print(f"kkanji: not downloaded ({folder})")
        return 0
    cache_problems = cache.check_cache(folder, listing) if listing is not None else []
    bad += cache_problems
    png_bad = any(".png" in p.split(":")[0] for p in cache_problems)
    for line in bad:
        print(f"kkanji: BAD: {line}")
    if bad and repair:
        try:
            if tar_bad:
                tar.unlink(missing_ok=True)
            if tree_bad or png_bad or tar_bad:
                shutil.rmtree(tree, ignore_errors=True)
            cache.remove_cache(folder)
            prepared = cache.prepare_cache(root, download=True)
            print(f"kkanji: repaired: {prepared['n_images']:,} images, cache rebuilt at "
                  f"{prepared['images']}")  # fmt: skip
            return 0
        except (DataFilesError, FormatError, OSError) as exc:
            print(f"kkanji: repair failed: {exc}")
            return 1
    if bad:
        return 1
    if listing is not None:
        has_cache = cache.cache_paths(folder, listing.fingerprint)[1].is_file()
        note = "; decoded cache checked against the PNGs" if has_cache else "; no cache yet"
        print(f"kkanji: OK, {listing.total:,} images in {len(listing.codepoints):,} classes{note}")
    else:
        print(f"kkanji: OK, {tar} matches its record (not extracted yet)")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")


def _output_problem(out: Path, suffixes: tuple[str, ...] | None = None) -> str | None:
    """Why ``out`` cannot be written as a file (before any work is done), or None."""
    if out.is_dir():
        return f"--out {out} is a folder; name a file in it"
    if suffixes is not None and out.suffix.lower() not in suffixes:
        return f"--out {out}: unknown image extension {out.suffix or '(none)'!r}; use one of " + (
            ", ".join(suffixes)
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"--out {out}: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK):
                return f"--out {out}: {parent} is not writable"
            break
    return None


MAX_PER_CLASS = 200  # images in one montage row


def cmd_montage(args: argparse.Namespace) -> int:
    """Save a grid of random examples per class, labelled with the character."""
    root = resolve_root(args.root)
    problem = _output_problem(Path(args.out), IMAGE_SUFFIXES)
    if problem is None and args.per_class < 1:
        problem = f"--per-class must be a whole number >= 1, got {args.per_class}"
    if problem is None and args.max_classes < 1:
        problem = f"--max-classes must be a whole number >= 1, got {args.max_classes}"
    if problem is None and args.per_class > MAX_PER_CLASS:
        problem = f"--per-class is at most {MAX_PER_CLASS} (a row that wide is unreadable)"
    if problem is None and args.seed < 0:
        problem = f"--seed must be a whole number >= 0, got {args.seed}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    info = catalog.get(args.name)
    split = args.split
    try:
        with warnings.catch_warnings():
            if not args.verify:  # the user's explicit choice: said once below, not per file
                warnings.simplefilter("ignore")
            if info.name == "kkanji":
                split = split or "all"
                ds = _create(args.name, root, split=split, download=args.download,
                             verify=args.verify)  # fmt: skip
            elif split == "all":
                print(f"error: --split all is for kkanji; {args.name} has train and test",
                      file=sys.stderr)  # fmt: skip
                return 2
            else:
                names = [split] if split else ["train", "test"]  # none named: whichever is there
                tried: list[str] = []
                for k, name in enumerate(names):
                    last = k == len(names) - 1
                    try:
                        fetch_it = args.download and last
                        ds = _create(args.name, root, train=name == "train", download=fetch_it,
                                     verify=args.verify)  # fmt: skip
                        split = name
                        break
                    except DataFilesError as exc:
                        tried.append(f"{name} split: {exc}")
                        if last:  # every split tried: say why each one failed
                            raise DataFilesError("\n".join(tried)) from exc
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

    problem = _output_problem(Path(args.out))
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
    p = argparse.ArgumentParser(prog="python -m kmnist_torch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("available", help="list the datasets").set_defaults(func=cmd_available)
    s = sub.add_parser("info", help="counts, classes, files, licence of a dataset")
    s.add_argument("name")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("download", help="download and verify datasets")
    s.add_argument("names", nargs="+")
    s.add_argument("--format", choices=["mnist", "npz", "all"], default=None,
                   help="KMNIST file format (default mnist; K49 has only npz)")  # fmt: skip
    add_data_options(s, download=None, device_help=None)
    s.set_defaults(func=cmd_download)
    s = sub.add_parser("verify", help="check downloaded files against the catalog")
    s.add_argument("names", nargs="*")
    add_data_options(s, download=None, device_help=None, verify=False)
    s.add_argument("--repair", action="store_true",
                   help="download bad files again and rebuild the KKanji cache")  # fmt: skip
    s.set_defaults(func=cmd_verify)
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
    s = sub.add_parser("kkanji-split", help="write the KKanji train/test split as JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-per-class", type=int, default=1)
    s.add_argument("--shots", type=int, default=None)
    add_data_options(s, download=False, device_help=None)
    s.set_defaults(func=cmd_kkanji_split)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGPIPE"):  # `python -m kmnist_torch info k49 | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return args.func(args)
    except KeyError as exc:  # unknown dataset name
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DataFilesError, FormatError, ValueError, OSError) as exc:
        # Everything a user can act on (a bad setting, a read-only or misplaced root, a damaged
        # file) as one line, never a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
