"""Train and evaluate a classifier on MNIST, KMNIST, K49 or Kuzushiji-Kanji.

    python -m kmnist_torch.train --model preact18 --mixup manifold --dataset kmnist

The command line only: it parses, builds from the registries (``create_dataset`` through
:func:`kmnist_torch.data.splits.load_split`, ``create_model``, ``RECIPES``) and hands the run to
:mod:`kmnist_torch.training.engine`. Every value of a recipe can be overridden by the flag of
the same name (``--epochs``, ``--batch-size``, ``--lr`` ...).

Data-parallel on N processes (one per GPU, or gloo on the CPU), with PyTorch's
``DistributedDataParallel``; the recipe's batch size stays the global batch:

    torchrun --nproc_per_node=4 -m kmnist_torch.train --recipe fast --dataset k49
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._args import Parser, add_data_options, positive_int, run_main
from .data import registry
from .data.registry import dataset_options, list_datasets
from .data.splits import load_split
from .download.sources import resolve_root
from .errors import RecipeError
from .models import modelfile
from .models.registry import create_model, list_models
from .training import cpu, distributed, mixup
from .training.engine import RunState, fit
from .training.jobs import build_job
from .training.recipes import OPTIMIZERS, RECIPES, SCHEDULES, Recipe, default_recipe_name
from .training.runtime import RunDir, determinism, stop_signal

__all__ = [
    "build_parser",
    "exit_status",
    "main",
    "resolve_recipe",
    "run",
]

DATASETS = tuple(list_datasets())
# What a resumed run may change: where files go and how they are fetched, where it runs.
_RESUMABLE_CHANGES = {
    "out",
    "resume",
    "overwrite",
    "stop_after",
    "download",
    "verify",
    "root",
    "progress",
    "device",
    "compile",
    "deterministic",
    "checkpoint_every",
    "threads",
    # A memory layout, like device: runs written before a CPU used channels_last resume.
    "channels_last_active",
    # How the CPU sums weight gradients (training/cpu_conv.py): machine-dependent, like device.
    "gemm_wgrad_active",
}
_CHOICES = {
    "model": list_models(),
    "optimizer": list(OPTIMIZERS),
    "schedule": list(SCHEDULES),
    "mixup": list(mixup.MODES),
    "loss": list(mixup.LOSSES),
}


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _add_run_options(run: argparse._ArgumentGroup) -> None:
    """Where the data is, which seed, which images, where the run goes."""
    run.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="hyperparameter table to start from (default: cnn for simple_cnn, else paper)",
    )
    run.add_argument("--dataset", choices=DATASETS, default="kmnist")
    add_data_options(
        run,
        device_help="torch device (default: cuda if available; under torchrun: cuda (each "
        "rank on cuda:LOCAL_RANK) or cpu)",
    )
    run.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: BatchNorm layers become SyncBatchNorm (statistics over "
        "the global batch)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--bf16",
        choices=cpu.BF16_MODES,
        default="auto",
        help="bf16 autocast: auto (CUDA: the recipe's --amp; CPU: where it has bf16 units, "
        "amx_bf16 or avx512_bf16), on, off",
    )
    run.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU intra-op threads (default: the CPUs other processes leave free now)",
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: a resumed run ends with the same numbers",
    )
    limit_help = (
        "use a stratified subset of N {} images (per-class proportional, the same "
        "subset whatever --seed: kmnist_torch.data.splits.LIMIT_SEED)"
    )
    for which, text in (("train", "training"), ("test", "test")):
        run.add_argument(
            f"--limit-{which}", type=int, default=None, metavar="N", help=limit_help.format(text)
        )
    _add_output_options(run)


def _cadence(text: str) -> tuple[int | None, float | None]:
    """``--checkpoint-every``: ``(steps, None)`` from ``N``, ``(None, seconds)`` from ``Tmin``
    or ``Ts`` (T > 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(min|s|h)?\s*", text)
    unit = {"s": 1, "min": 60, "h": 3600}.get(match[2] if match else None)
    if match and unit is None and "." not in match[1] and int(match[1]) > 0:
        return int(match[1]), None
    if match and unit is not None and 0 < float(match[1]) <= 1e6:
        return None, float(match[1]) * unit
    raise argparse.ArgumentTypeError(
        f"{text!r}: give a number of steps (200) or a time (10min, 90s, 1h)"
    )


def _add_output_options(run: argparse._ArgumentGroup) -> None:
    """Where results go, and resuming and stopping a run."""
    run.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where results.json and the checkpoint go "
        "(default: runs/<dataset>-<recipe>-<model>-<mixup>-seed<seed>)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR's checkpoint, even a finished run's (start afresh if there is "
        "none). Without it an unfinished run in DIR is continued too: the same command line "
        "goes on after a preemption",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="start afresh even if DIR holds a checkpoint"
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="checkpoint and stop once this many epochs are done (time-limited "
        "jobs; exits 0); the same command without it continues",
    )
    run.add_argument(
        "--checkpoint-every",
        type=_cadence,
        default=None,
        metavar="N|Tmin",
        help="also checkpoint inside an epoch: every N steps, or every T minutes (e.g. 10min, "
        "90s): what a kill -9 or a lost worker can lose at most (default: each epoch's end)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal)",
    )


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    """One flag per dataset's own option, from the dataset registry (KKanji's split)."""
    for name, e in registry.DATASETS.items():
        if not e.options:
            continue
        group = p.add_argument_group(f"{name} options (--dataset {name})")
        for flag, option in e.options.items():
            group.add_argument(
                "--" + flag.replace("_", "-"),
                type=option.type,
                default=None,
                choices=option.choices,
                help=option.help,
            )


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`Recipe` field, each overriding the recipe's value."""
    hp = p.add_argument_group("hyperparameters (override the recipe)")
    for f in dataclasses.fields(Recipe):
        flag, kind, text = "--" + f.name.replace("_", "-"), str(f.type), f.metadata["help"]
        if kind == "bool":
            hp.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("tuple"):
            hp.add_argument(flag, type=_parse_floats, default=None, metavar="F,F,...", help=text)
        else:
            cast = {"int": int, "str": str}.get(kind, float)
            hp.add_argument(flag, type=cast, default=None, choices=_CHOICES.get(f.name), help=text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: run options, the datasets' own options, then one flag per
    :class:`Recipe` field."""
    p = Parser(
        prog="python -m kmnist_torch.train",
        description="Train and evaluate a classifier on a Kuzushiji dataset (or MNIST).",
    )
    _add_run_options(p.add_argument_group("run"))
    _add_dataset_options(p)
    _add_recipe_options(p)
    return p


def resolve_recipe(
    args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
) -> tuple[str, Recipe]:
    """The recipe named by ``--recipe`` (or implied by ``--model``) with every flag given on
    the command line applied and mixup's alpha filled in; bad values exit with a usage error."""
    parser = parser or build_parser()
    name = args.recipe or default_recipe_name(args.model)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Recipe)
        if getattr(args, f.name) is not None
    }
    recipe, problems = None, []
    try:
        recipe = RECIPES[name].override(**overrides)
    except RecipeError as exc:
        problems = [f"--{key.replace('_', '-')} {msg}" for key, msg in exc.problems]
    for key in ("limit_train", "limit_test", "stop_after"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            problems.append(f"--{key.replace('_', '-')} must be at least 1")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite exclude each other")
    if problems:
        parser.error("; ".join(problems))
    return name, recipe


def _config(
    name: str, r: Recipe, args: argparse.Namespace, out: Path, device: torch.device
) -> dict:
    """What the run was asked to do: the recipe, then every other option (checked on resume)."""
    config: dict[str, Any] = {"recipe": name, **dataclasses.asdict(r)}
    config["milestones"] = list(r.milestones)
    config.update({k: v for k, v in vars(args).items() if k not in config})
    amp = cpu.bf16_enabled(device, r.amp)
    config.update(  # what the run did, after --bf16 and the CPU's units (training/cpu.py)
        out=str(out),
        amp_active=amp,
        channels_last_active=cpu.channels_last_enabled(device, r.channels_last),
        # Not under torch.compile or bf16 autocast, where oneDNN keeps them (cpu_conv._wanted).
        gemm_wgrad_active=cpu.gemm_wgrad_enabled(device) and not r.compile and not amp,
    )
    # Absolute, so that evaluate and export find the data from any working directory.
    config["root"] = str(resolve_root(args.root).resolve())
    return config


def _model(
    r: Recipe, train_set: Any, device: torch.device, seed: int, meta: dict
) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe's model for ``train_set``'s images and classes, initialised from ``seed``,
    and its model file metadata."""
    in_chans = 1 if train_set.data.dim() == 3 else int(train_set.data.shape[1])
    args = {
        "num_classes": len(train_set.classes),
        "in_chans": in_chans,
        "img_size": int(train_set.data.shape[-1]),
    }
    torch.manual_seed(seed)  # initialisation and dropout
    # preact18 has no dropout layers: --no-dropout changes nothing there.
    options = {"dropout": False} if not r.dropout and r.model == "simple_cnn" else {}
    model = create_model(r.model, **args, **options).to(device)
    model = cpu.prepare_model(model, device, r.channels_last, training=True)
    model_meta = modelfile.model_meta(
        r.model,
        args,
        classes=train_set.classes,
        codepoints=train_set.codepoints,
        romaji=train_set.romaji,
        recipe=r,
        **meta,
    )
    return model, model_meta


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train, evaluate after every epoch, write ``results.json`` and a
    checkpoint to the output folder each epoch, and return the results dict.

    A first Ctrl-C or SIGTERM stops after the current step with a checkpoint
    (``"interrupted": True`` in the results;
    :func:`~kmnist_torch.training.runtime.stop_signal` says which); the same call continues
    it (an unfinished run in the folder is continued; see
    :meth:`~kmnist_torch.training.runtime.RunDir.open`). Where the caller left SIGTERM to its
    default, a SIGTERM ends the process once the checkpoint is written, as it would have
    without the trainer: a script looping over runs does not start the next one.

    Started by ``torchrun`` with several processes, it trains data-parallel: every rank runs
    this function, rank 0 alone writes and prints the epoch lines, and each rank returns the
    same results.
    """
    wall_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe_name, r = resolve_recipe(args, parser)
    main_thread = threading.current_thread() is threading.main_thread()
    term_kills = main_thread and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    ctx, ddp_device = distributed.setup(args.device)
    try:
        if not ctx.is_main:  # rank 0 prints the epoch lines; warnings and errors stay
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                res = _train(args, parser, recipe_name, r, ctx, ddp_device, wall_start)
        else:
            res = _train(args, parser, recipe_name, r, ctx, ddp_device, wall_start)
    except RuntimeError as exc:
        lost = distributed.lost_peer(ctx, exc)
        if lost is None:
            raise
        raise lost from None
    finally:
        distributed.teardown(ctx)
    if term_kills and stop_signal() == signal.SIGTERM:
        # A caller that left SIGTERM alone (a script looping over runs) expects it to end the
        # process: it does, now that the checkpoint is written.
        signal.raise_signal(signal.SIGTERM)
    return res


def _device(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    r: Recipe,
    ctx: distributed.Dist,
    ddp_device: torch.device | None,
) -> torch.device:
    """The device this process trains on; settings that cannot work there are usage errors."""
    if ddp_device is not None:
        args.device = str(ddp_device)
        if not ctx.is_main:
            args.progress = False
        if r.batch_size % ctx.world_size:
            parser.error(
                f"--batch-size {r.batch_size} is the global batch: it must split evenly over "
                f"the {ctx.world_size} processes"
            )
        if args.sync_bn and ddp_device.type != "cuda":
            parser.error("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return device


def _load_splits(args: argparse.Namespace) -> list[Any]:
    """The training and test images the run asked for (limits and the dataset's options)."""
    return [
        load_split(
            args.dataset,
            args.root,
            train,
            limit,
            args.download,
            args.verify,
            **dataset_options(args.dataset, vars(args)),
        )
        for train, limit in ((True, args.limit_train), (False, args.limit_test))
    ]


def _train(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    recipe_name: str,
    r: Recipe,
    ctx: distributed.Dist,
    ddp_device: torch.device | None,
    wall_start: float,
) -> dict[str, Any]:
    device = _device(args, parser, r, ctx, ddp_device)
    cpu.configure(args.bf16, args.threads, device, keep_threads=args.deterministic)
    out = Path(args.out or f"runs/{args.dataset}-{recipe_name}-{r.model}-{r.mixup}-seed{args.seed}")
    config = _config(recipe_name, r, args, out, device)
    config["world_size"] = ctx.world_size
    run_dir = RunDir(out, main=ctx.is_main)
    saved = ctx.from_main(
        lambda: run_dir.open(config, args.resume, args.overwrite, _RESUMABLE_CHANGES)
    )
    try:
        res = _fit(args, recipe_name, r, ctx, device, run_dir, config, saved, wall_start)
    finally:
        run_dir.close()
    if ctx.is_main:
        print(f"run folder {out}: {run_dir.contents()}", flush=True)
    return res


def _fit(
    args: argparse.Namespace,
    recipe_name: str,
    r: Recipe,
    ctx: distributed.Dist,
    device: torch.device,
    run_dir: RunDir,
    config: dict[str, Any],
    saved: dict[str, Any] | None,
    wall_start: float,
) -> dict[str, Any]:
    """Load the data, build the job, restore ``saved`` (a checkpoint) and train."""
    out = run_dir.out
    with determinism(args.deterministic, device):
        if not args.verify:
            print("warning: --no-verify: checksums are not checked", file=sys.stderr)
        train_set, test_set = _load_splits(args)
        data = {
            "limit_train": args.limit_train,
            "limit_test": args.limit_test,
            "options": dataset_options(args.dataset, vars(args)),
        }
        meta = {"dataset": args.dataset, "recipe_name": recipe_name, "data": data}
        model, model_meta = _model(r, train_set, device, args.seed, meta)
        job = build_job(r, train_set, test_set, device, args.seed, (model, model_meta), ctx,
                        args.sync_bn)  # fmt: skip
        state = RunState(job, args.seed)
        if saved is not None:
            state.load_state_dict(saved)
        if saved is not None and ctx.is_main:
            print(f"resuming {out} at epoch {state.epoch + 1}, step {state.step}", file=sys.stderr)
        info = {
            "dataset": args.dataset,
            "model": r.model,
            "num_classes": job.num_classes,
            "num_train": len(train_set.data),
            "num_test": len(test_set.data),
            "image_size": int(train_set.data.shape[-1]),
            "seed": args.seed,
        }
        every = args.checkpoint_every or (None, None)
        return fit(
            job, state, run_dir, config, info, args.stop_after, args.progress, wall_start, every
        )


def exit_status(res: dict[str, Any]) -> int:
    """A run's exit status: 0 finished, or stopped where ``--stop-after`` asked (a stop asked
    for is a success: a job chain's ``afterok`` goes on, and ``"finished": false`` in
    ``results.json`` tells it apart); 128 + the signal that stopped it (130 Ctrl-C, 143
    SIGTERM)."""
    signum = stop_signal()
    return 0 if not res["interrupted"] or signum is None else 128 + signum


def main(argv: list[str] | None = None) -> int:
    """The command line: train (see :func:`run`); errors as one line; a first Ctrl-C or
    SIGTERM checkpoints and stops after the step (exit 128 + the signal); a Ctrl-C pressed
    again a second or more later aborts (see
    :class:`~kmnist_torch.training.runtime.StopRequest`)."""
    return run_main(
        run, argv, status=exit_status, interrupted="aborted; the last checkpoint is kept"
    )


if __name__ == "__main__":
    sys.exit(main())
