"""Reproduce the upstream benchmark table: every (row, dataset) cell run here, side by side with
upstream's figures, written to OUT/table.md and OUT/results.json.

    python -m kmnist_torch.reproduce --datasets mnist kmnist k49 \\
        --rows knn cnn preact18 preact18-input preact18-manifold --out reproduce-out --check
    python -m kmnist_torch.reproduce --datasets kmnist --rows knn cnn --out smoke --quick
    python -m kmnist_torch.reproduce --resplit SOURCE_DIR --rows knn cnn --out resplit-out

Rows: ``knn`` is kmnist_torch.models.knn.knn_predict (scikit-learn's 4-NN, exactly), ``ncm``
the nearest class mean on the pixels (kmnist_torch.models.ncm, no upstream figure); the others
train with kmnist_torch.train (``cnn``: the Keras benchmark network and recipe; ``preact18*``:
PreActResNet-18, no mixup / input mixup / manifold mixup, recipe ``--recipe``, default
``paper``). The metric is top-1 accuracy, balanced accuracy for K49 (as upstream) and KKanji.
Both kinds of row read the data through kmnist_torch.data.splits.load_split (the same stratified
``--limit-*`` subsets).

Targets are upstream's figures on today's data where upstream published them, else on the data
released before 2019-02-05 (MNIST never changed). ``--check`` exits 1 when a cell falls more
than its row's tolerance below its target, or when a cell fails to run. ``--quick`` is a CPU
smoke test on a few hundred images (no targets apply). KKanji (``--datasets kkanji``) is our
own extension of the table, with the KKanji class's default split: no targets; each KKanji
cell gets a long-tail record (head / middle / tail classes), and ``--fewshot`` adds the KKanji
few-shot benchmark (:mod:`kmnist_torch.fewshot`) and its table.

``--resplit SOURCE_DIR`` runs the KMNIST rows on real images where the official training
images are out of reach: the real KMNIST test split (SOURCE_DIR holds
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``)
re-split 8,000 train / 2,000 test and written as an official-format root in ``--root``
(default OUT/resplit-data). Not the benchmark protocol: no target applies. ``--resplit``
without SOURCE_DIR uses a root written before (e.g. carried to a machine without the source);
``--write-only`` writes the root and stops.

``--devices 0,1,2,3`` (or ``cpu,cpu``) runs the cells concurrently, one worker process per
listed device, each taking the next cell as it finishes one; the table is the one a sequential
run gives (each cell seeds its own run, whichever process and device of a kind run it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shlex
import signal
import sys
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from . import catalog
from ._args import Parser, Stopped, add_data_options, run_main
from ._cells import PIXEL_ROWS, dataset_options, run_longtail, run_pixels
from ._fanout import spread
from ._harness import (
    fewshot_section,
    longtail_section,
    report,
    run_meta,
    still_to_run,
    write_outputs,
)
from .data.arrays import raw_folder
from .data.registry import DATASETS
from .data.resplit import RESPLIT_TEST, RESPLIT_TRAIN, write_resplit
from .errors import DataFilesError, UserError, WriteError
from .reporting.table import (
    ROWS,
    UPSTREAM_OLD,
    dataset_title,
    finish_cell,
    new_cell,
    render_table,
)
from .training.recipes import RECIPES
from .training.runtime import stop_signal

# --quick: sizes for a CPU smoke run of a few minutes over every cell (the pixel rows':
# kmnist_torch._cells.QUICK_PIXELS).
QUICK_TRAIN = (
    "--epochs 1 --limit-train 256 --limit-test 256 --batch-size 32 --eval-batch-size 256"
).split()
# What a trained cell keeps of its run's results.
RUN_KEYS = ("device_seconds", "wall_seconds", "device", "images_per_second", "best_test_accuracy",
            "best_test_balanced_accuracy", "epochs_done", "num_train", "num_test")  # fmt: skip

# ---------------------------------------------------------------------------- the re-split


def _prepare_resplit(args: argparse.Namespace) -> None:
    """Write (or find) the re-split root and point the run at it, as a cut-down KMNIST run."""
    args.root = args.root or str(Path(args.out) / "resplit-data")
    raw = raw_folder(Path(args.root), catalog.KMNIST)
    if args.resplit:
        sizes = write_resplit(args.root, args.resplit, args.resplit_seed)  # 8,000 / 2,000
        print(f"wrote {raw}: real KMNIST test images re-split "
              f"{sizes['train']:,} train / {sizes['test']:,} test")  # fmt: skip
    elif (raw / "train-images-idx3-ubyte.gz").is_file():
        print(f"using the re-split already in {raw}")
    else:
        raise DataFilesError(f"{raw} holds no re-split; pass --resplit SOURCE_DIR to write one")
    # Not the official files: no target applies. --quick keeps its own small sizes.
    args.datasets, args.download, args.verify = ["kmnist"], False, False
    if not args.quick:
        args.limit_train = args.limit_train or RESPLIT_TRAIN
        args.limit_test = args.limit_test or RESPLIT_TEST


# --------------------------------------------------------------------------- running cells


def train_argv(cell: dict[str, Any], args: argparse.Namespace, out: Path) -> list[str]:
    """The ``python -m kmnist_torch.train`` arguments of a trained cell."""
    spec = ROWS[cell["row"]]
    recipe = "cnn" if cell["row"] == "cnn" else args.recipe
    # --resume: a rerun after an interruption continues each run where it stopped (a run
    # that finished is not repeated). Progress: a bar on a terminal, plain lines in a log;
    # none from the --devices workers on a terminal (their bars would share one line).
    argv = ["--dataset", cell["dataset"], "--model", spec["model"], "--mixup", spec["mixup"],
            "--recipe", recipe, "--seed", str(args.seed), "--out", str(out),
            "--resume"]  # fmt: skip
    if getattr(args, "devices", None) and sys.stderr.isatty():
        argv.append("--no-progress")
    if args.root is not None:
        argv += ["--root", str(args.root)]
    if args.device is not None:
        argv += ["--device", args.device]
    argv.append("--download" if args.download else "--no-download")
    if not args.verify:
        argv.append("--no-verify")
    if args.quick:
        argv += QUICK_TRAIN
        if args.device is None:
            argv += ["--device", "cpu"]
    options = dataset_options(cell["dataset"], args)  # KKanji's --image-size
    for flag, value in (
        *((f"--{k.replace('_', '-')}", v) for k, v in options.items()),
        ("--epochs", args.epochs),
        ("--limit-train", args.limit_train),
        ("--limit-test", args.limit_test),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_trained(cell: dict[str, Any], args: argparse.Namespace) -> None:
    """Train one cell with kmnist_torch.train and take its last epoch's scores."""
    from . import train

    out = Path(args.out) / "runs" / f"{cell['dataset']}-{cell['row']}"
    argv = train_argv(cell, args, out)
    cell["train_argv"] = argv
    res = train.run(argv)
    if res.get("interrupted"):  # a signal stopped it after a step, with a checkpoint
        raise Stopped(stop_signal() or signal.SIGINT)
    for key in RUN_KEYS:
        cell[key] = res.get(key)
    cell["run_dir"] = str(out)
    # The last epoch, not the best: picking the best epoch on the test set flatters a run.
    finish_cell(cell, res["test_accuracy"], res["test_balanced_accuracy"])
    run_longtail(cell, args, out)


def build_parser() -> argparse.ArgumentParser:
    """The harness's command line."""
    p = Parser(
        prog="python -m kmnist_torch.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Default: the datasets of upstream's table, in the registry's order.
    upstream = [d for d in DATASETS if any(d == dataset for _, dataset in UPSTREAM_OLD)]
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=upstream)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--out", default="reproduce-out", metavar="DIR",
                   help="table.md, results.json, runs/ (default: reproduce-out)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="CPU smoke run on a few hundred images")
    p.add_argument("--check", action="store_true", help="exit 1 if a cell misses its target")
    p.add_argument("--tolerance", type=float, default=None, metavar="POINTS",
                   help="one tolerance for all rows, in points (default: per row)")  # fmt: skip
    add_data_options(
        p,
        root_help="data folder (default: $KMNIST_TORCH_ROOT or ~/.cache/kmnist_torch; with "
        "--resplit, OUT/resplit-data)",
    )
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="run cells concurrently, one process per device: GPU indices or "
                   "devices, comma-separated (0,1,2,3; cuda:0,cuda:1; cpu,cpu)")  # fmt: skip
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="recipe of the preact18 rows (default paper; cnn has its own)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    p.add_argument("--image-size", type=int, default=None, choices=catalog.KKANJI.sizes,
                   help="KKanji cells: images brought to this size (KKanji's image_size; "
                   "default 64, as published)")  # fmt: skip
    for which, text in (("train", "training images (kmnist_torch.data.splits)"),
                        ("test", "test images")):  # fmt: skip
        p.add_argument(f"--limit-{which}", type=int, default=None, metavar="N",
                       help=f"a stratified subset of N {text}")  # fmt: skip
    p.add_argument("--fewshot", action="store_true",
                   help="also run the KKanji few-shot benchmark (kmnist_torch.fewshot; "
                   "a smoke run with --quick) into OUT/fewshot, and add its table")  # fmt: skip
    p.add_argument("--fewshot-args", default="", metavar="ARGS",
                   help="more arguments for the few-shot command, as one string: its budget "
                   "or partition (e.g. \"--train-episodes 600 --base-steps 700\")")  # fmt: skip
    _add_resplit_options(p.add_argument_group("real-image re-split (KMNIST rows only)"))
    return p


def fewshot_argv(args: argparse.Namespace) -> list[str]:
    """The ``python -m kmnist_torch.fewshot`` arguments of ``--fewshot``: the harness's data
    options, device, seed and (KKanji's) image size; a smoke run with ``--quick``."""
    argv = ["--out", str(Path(args.out) / "fewshot"), "--seed", str(args.seed)]
    if args.root is not None:
        argv += ["--root", str(args.root)]
    argv.append("--download" if args.download else "--no-download")
    if not args.verify:
        argv.append("--no-verify")
    if args.device is not None:
        argv += ["--device", args.device]
    if args.image_size is not None:
        argv += ["--image-size", str(args.image_size)]
    if args.quick:
        argv.append("--quick")
    return argv + shlex.split(args.fewshot_args)


def _add_resplit_options(rs: argparse._ArgumentGroup) -> None:
    """``--resplit`` and its companions."""
    rs.add_argument("--resplit", nargs="?", const="", default=None, metavar="SOURCE_DIR",
                    help="run on the real KMNIST test split re-split 8,000/2,000, written from "
                    "SOURCE_DIR into --root (no SOURCE_DIR: --root holds one already)")  # fmt: skip
    rs.add_argument("--resplit-seed", type=int, default=0, help="seed of the 8,000/2,000 cut")
    rs.add_argument("--write-only", action="store_true", help="write the re-split and stop")


def _interrupted(cell: dict[str, Any], signum: int) -> None:
    cell["error"] = f"interrupted ({signal.Signals(signum).name}): the same command resumes it"


def _run_cell(cell: dict[str, Any], args: argparse.Namespace) -> None:
    """Run one cell, recording an error in it instead of raising (but not a signal: the cell
    is marked interrupted, and the signal stops the harness; nor a failed write, a full disk
    the next cells would meet too: it stops the harness with one line)."""
    t0 = time.perf_counter()
    try:
        (run_pixels if cell["row"] in PIXEL_ROWS else run_trained)(cell, args)
    except KeyboardInterrupt as exc:
        _interrupted(cell, exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
        raise
    except WriteError as exc:
        cell["error"] = f"{type(exc).__name__}: {exc}"
        raise
    except Exception as exc:  # one failing cell must not lose the others' results
        cell["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)  # the message says what to do
        else:
            traceback.print_exc()
    finally:
        if cell["wall_seconds"] is None:
            cell["wall_seconds"] = time.perf_counter() - t0


def parse_devices(text: str) -> list[str]:
    """``--devices``: ``0,1`` -> ``["cuda:0", "cuda:1"]``; device names pass through."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise ValueError("--devices lists no device")
    return [f"cuda:{d}" if d.isdigit() else d for d in devices]


def _cell_in_worker(
    args: dict[str, Any], cpu_threads: int, cell: dict[str, Any], device: str
) -> dict[str, Any]:
    """One cell in a worker process of the fan-out (``args``: the harness's) on ``device``;
    the cell, marked interrupted where a signal stopped it."""
    if torch.device(device).type == "cpu":  # CPU workers share the cores
        torch.set_num_threads(cpu_threads)
    print(f"== {cell['title']} on {dataset_title(cell['dataset'])}: {device}", flush=True)
    with contextlib.suppress(Stopped):
        _run_cell(cell, argparse.Namespace(**{**args, "device": device}))
    return cell


def _fan_out(
    cells: list[dict[str, Any]], args: argparse.Namespace, devices: list[str], done: Any
) -> None:
    """Run ``cells`` on ``devices``, one worker process each
    (:func:`kmnist_torch._fanout.spread`), every worker taking the next cell when it finishes
    one. ``done(cell)`` is called in this process, one cell at a time, as each finishes; cells
    are updated in place. A signal stops every worker after its step, then the harness."""
    n_cpu = sum(torch.device(d).type == "cpu" for d in devices)
    work = functools.partial(
        _cell_in_worker, vars(args), max(1, torch.get_num_threads() // max(n_cpu, 1))
    )

    def finished(i: int, result: Any, device: str) -> None:
        if isinstance(result, Stopped):
            _interrupted(cells[i], result.signum)
        elif isinstance(result, BrokenProcessPool):  # the worker died under this cell
            cells[i]["error"] = (
                f"its worker process on {device} died (a crash, kill -9, the out-of-memory "
                "killer); the same command runs this cell again"
            )
        elif isinstance(result, BaseException):  # a full disk (raised below), or a bug
            cells[i]["error"] = f"worker on {device}: {type(result).__name__}: {result}"
        else:
            cells[i].update(result)
        done(cells[i])
        if isinstance(result, WriteError):  # the next cells would meet the full disk too
            raise result

    spread(cells, devices, work, finished)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str] | None]:
    """The harness's arguments, and the devices of ``--devices`` (None: run in this process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_only and args.resplit is None:
        parser.error("--write-only goes with --resplit SOURCE_DIR")
    if args.fewshot:  # its arguments checked now, not after hours of cells
        from . import fewshot

        try:
            fewshot.build_parser().parse_args(fewshot_argv(args))
        except ValueError as exc:  # shlex: an unbalanced quote
            parser.error(f"--fewshot-args: {exc}")
        except SystemExit:
            parser.error("--fewshot-args: the few-shot command refuses them (its message is above)")
    if args.devices is None:
        return args, None
    if args.device is not None:
        parser.error("--device and --devices exclude each other")
    try:
        devices = parse_devices(args.devices)
        for d in devices:
            torch.device(d)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--devices {args.devices}: {exc}")
    return args, devices


def _run_cells(
    cells: list[dict[str, Any]],
    args: argparse.Namespace,
    devices: list[str] | None,
    meta: dict[str, Any],
    tolerance: float | None,
) -> list[str]:
    """Run every cell not finished in ``--out`` already (in this process, or fanned out over
    ``devices``), writing the outputs after each; return the --check failures."""
    out = Path(args.out)
    todo = still_to_run(cells, out, meta["settings"])

    def done(cell: dict[str, Any]) -> None:
        write_outputs(out, cells, meta, tolerance)
        report(cell)

    try:
        if devices is not None and todo:
            _fan_out(todo, args, devices, done)
        for cell in todo if devices is None else []:
            print(f"== {cell['title']} on {dataset_title(cell['dataset'])}", flush=True)
            try:
                _run_cell(cell, args)
            finally:
                write_outputs(out, cells, meta, tolerance)
            report(cell)
    finally:
        failures = write_outputs(out, cells, meta, tolerance)
    return failures


def run(argv: list[str] | None = None) -> int:
    """Run every requested cell, writing the outputs after each; return the exit status."""
    args, devices = _parse(argv)
    if args.resplit is not None:
        _prepare_resplit(args)
        if args.write_only:
            return 0
    tolerance = None if args.tolerance is None else args.tolerance / 100
    # A smoke run, cut-down data or files not checked against the published checksums is not
    # a reproduction: no targets apply to it (it could pass or fail on other data).
    comparable = not (
        args.quick or args.epochs or args.limit_train or args.limit_test or not args.verify
    )
    meta = run_meta(args, argv, devices, comparable)
    cells = [new_cell(r, d, comparable) for d in args.datasets for r in args.rows]
    out = Path(args.out)
    try:
        failures = _run_cells(cells, args, devices, meta, tolerance)
    except Stopped:
        finished = sum(c["ours"] is not None for c in cells)
        print(f"{finished} of {len(cells)} cells done: {out / 'table.md'} and "
              f"{out / 'results.json'} hold them", file=sys.stderr)  # fmt: skip
        raise
    if args.fewshot:
        from . import fewshot

        print("== KKanji few-shot: python -m kmnist_torch.fewshot " + " ".join(fewshot_argv(args)))
        meta["fewshot"] = fewshot.run(fewshot_argv(args))
        failures = write_outputs(out, cells, meta, tolerance)
    print()
    print(render_table(cells, tolerance) + longtail_section(cells) + fewshot_section(meta))
    print(f"wrote {out / 'table.md'} and {out / 'results.json'}")
    errors = [c for c in cells if c["error"]]
    if args.check and failures:
        print("--check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if errors:
        print(f"{len(errors)} cell(s) did not run", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: run the harness (see :func:`run`); errors as one line; Ctrl-C or
    SIGTERM stops it after the current step (exit 128 + the signal), and the same command
    resumes it."""
    stopped = "stopped; run the same command again to resume (finished cells are kept)"
    return run_main(run, argv, status=lambda code: code, interrupted=stopped)


if __name__ == "__main__":
    sys.exit(main())
