"""The few-shot benchmark on Kuzushiji-Kanji: train on the base classes, evaluate on episodes
of the novel classes.

    python -m kmnist_torch.fewshot --root data --out runs/fewshot

Loads the images and the class partition (base / validation / novel) with
:func:`kmnist_torch.data.kkanji.fewshot.load_fewshot`, trains what the methods need
(:mod:`kmnist_torch.training.fewshot_train`; a method whose model file ``OUT/<method>.pt``
exists with the same settings is loaded, not trained again), evaluates every (method, way,
shot) on the same seeded novel-class episodes (:mod:`kmnist_torch.training.fewshot`) and
writes ``OUT/results.json`` and ``OUT/table.md``
(:func:`kmnist_torch.reporting.fewshot_table.render`), both atomically and only at the end:
Ctrl-C (exit 130) leaves the model files already written and no half-written results.

Methods: ``ncm`` (nearest class mean on pixels), ``protonet`` (Prototypical Networks, Conv-4),
``baseline`` (Conv-4 trained as a classifier on the base classes, its features used with
nearest class mean).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ._args import Parser, add_data_options, positive_int, run_main
from ._io import atomic_write, folder_lock, write_json
from .data.kkanji.fewshot import MIN_IMAGES, N_NOVEL, N_VAL, load_fewshot
from .data.kkanji.resize import SIZES
from .errors import TrainError
from .models.protonet import flat
from .reporting.fewshot_table import render
from .training import cpu
from .training.fewshot import (
    Setting,
    class_members,
    draw_episodes,
    embed_all,
    evaluate_cell,
    require_classes,
    used_rows,
)
from .training.fewshot_train import (
    TRAINED,
    Budget,
    Part,
    embedding_from,
    load_trained,
    preflight,
    save_model,
    train_baseline,
    train_protonet,
)
from .training.runtime import determinism, device_name

__all__ = ["build_parser", "main", "run"]

METHODS = ("ncm", "protonet", "baseline")
RESULTS_FORMAT = "kmnist_torch-fewshot-results-v1"
EPISODES = 600
# --quick: a smoke run (tests, CI): a few steps of each kind, a few episodes per cell.
QUICK = {
    "episodes": 5,
    "train_episodes": 4,
    "train_way": 5,
    "base_steps": 4,
    "base_batch": 32,
    "val_episodes": 2,
    "val_checks": 1,
}
_HELP = {
    "train_way": "classes per training episode (protonet)",
    "train_shot": "support images per class in training episodes",
    "train_query": "query images per class in training episodes",
    "train_episodes": "protonet's training episodes",
    "lr": "protonet's Adam learning rate",
    "lr_halve_every": "halve protonet's learning rate every this many episodes",
    "distance": "protonet's training distance: the paper's squared or the plain Euclidean",
    "base_steps": "the base classifier's training steps",
    "base_batch": "the base classifier's batch size",
    "base_lr": "the base classifier's Adam learning rate",
    "val_way": "classes per validation episode",
    "val_shot": "support images per class in validation episodes",
    "val_query": "query images per class in validation episodes",
    "val_episodes": "validation episodes per check",
    "val_checks": "validation checks per training (the best one's weights are kept)",
}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_budget_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("training budget (defaults: the full run; --quick: a smoke run)")
    for field in dataclasses.fields(Budget):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = f"{QUICK[field.name]} with --quick" if field.name in QUICK else ""
        text = f"{_HELP[field.name]} (default {default}{'; ' + shown if shown else ''})"
        if field.name == "distance":
            group.add_argument(flag, choices=["squared", "euclidean"], default=None, help=text)
        else:
            kind = _positive_float if isinstance(default, float) else positive_int
            group.add_argument(
                flag,
                type=kind,
                default=None,
                metavar="X" if kind is _positive_float else "N",
                help=text,
            )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = Parser(
        prog="python -m kmnist_torch.fewshot",
        description="The Kuzushiji-Kanji few-shot benchmark: train on the base classes, "
        "evaluate N-way K-shot episodes of the novel classes; writes results.json and table.md.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for models and results")
    add_data_options(p, download=False, device_help="torch device (default: cuda if available)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ways", nargs="+", type=positive_int, default=[5, 20], metavar="N")
    p.add_argument("--shots", nargs="+", type=positive_int, default=[1, 5], metavar="K")
    p.add_argument("--queries", type=positive_int, default=15, metavar="Q")
    episodes = f"evaluation episodes per cell (default {EPISODES}; 5 with --quick)"
    p.add_argument("--episodes", type=positive_int, default=None, metavar="N", help=episodes)
    p.add_argument("--image-size", type=int, choices=SIZES, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the episodes")
    part = p.add_argument_group("the class partition (kkanji-fewshot-split's arguments)")
    part.add_argument("--partition-seed", type=int, default=0, help="its seed (default 0)")
    part.add_argument("--n-val", type=int, default=N_VAL, help=f"validation classes ({N_VAL})")
    part.add_argument("--n-novel", type=positive_int, default=N_NOVEL,
                      help=f"novel classes ({N_NOVEL})")  # fmt: skip
    needs = f"usable images a validation or novel class needs ({MIN_IMAGES})"
    part.add_argument("--min-images", type=positive_int, default=MIN_IMAGES, help=needs)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: the cores other processes leave free)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps and episodes")
    _add_budget_options(p)
    return p


def resolve(args: argparse.Namespace) -> tuple[Budget, int]:
    """The training budget and the episodes per cell: flags given, else --quick's, else the
    full run's defaults."""
    values = {}
    for field in dataclasses.fields(Budget):
        given = getattr(args, field.name)
        quick = QUICK.get(field.name) if args.quick else None
        values[field.name] = given if given is not None else quick
    budget = Budget(**{k: v for k, v in values.items() if v is not None})
    episodes = args.episodes or (QUICK["episodes"] if args.quick else EPISODES)
    return budget, episodes


def _parts(fs: Any) -> dict[str, Part]:
    """The base, validation and novel classes' usable images."""
    parts = {}
    for name in ("base", "val", "novel"):
        classes = sorted(int(c) for c in getattr(fs.partition, name))
        idx = class_members(fs.targets, classes, fs.usable)
        parts[name] = Part(fs.data[idx], fs.targets[idx], classes, idx)
    return parts


def _settings(method: str, args: argparse.Namespace, budget: Budget, fs: Any) -> dict[str, Any]:
    """What ``method``'s model file must have been trained with to be used again."""
    return {
        **budget.of(method),
        "image_size": args.image_size,
        "seed": args.seed,
        "partition_sha256": fs.partition_sha256,
    }


def _trained(method: str, args: argparse.Namespace, budget: Budget, parts: dict, fs: Any,
             device: torch.device, doc: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """``method``'s model file's document: ``doc`` (loaded before any training) where its
    file exists with these settings, else trained and written."""
    settings = _settings(method, args, budget, fs)
    path = Path(args.out) / f"{method}.pt"
    if doc is not None:
        print(f"{method}: {path} was trained with these settings: not trained again")
        return {**doc, "resumed": True}
    train = train_protonet if method == "protonet" else train_baseline
    doc = train(parts["base"], parts["val"], budget, args.seed, device, args.image_size)
    save_model(path, method, settings, doc)
    print(
        f"{method}: trained {doc['history'][-1]['step']:,} {doc['unit']}s in "
        f"{doc['train_seconds']:.1f} s; kept the weights of {doc['unit']} {doc['chosen_step']:,} "
        f"(validation {100 * doc['val_accuracy']:.2f}%); wrote {path}",
        flush=True,
    )
    return {**doc, "resumed": False}


def _evaluate(method: str, embed: Any, novel: Part, episodes: dict[Setting, list],
              device: torch.device) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """Every setting's cell for one method; the seconds the novel features took."""
    start = time.perf_counter()
    rows = used_rows(*episodes.values())
    features = embed_all(embed, novel.images, device, f"{method} features", rows)
    embed_seconds = time.perf_counter() - start
    cells = []
    for setting, drawn in episodes.items():
        cell = {"method": method, **evaluate_cell(features, novel.labels, drawn, setting)}
        cells.append(cell)
        print(
            f"{method} {setting.name}: {100 * cell['mean']:.2f} ± {100 * cell['ci95']:.2f}% "
            f"({setting.episodes} episodes, {cell['seconds']:.1f} s)",
            flush=True,
        )
    return cells, round(embed_seconds, 3)


def _summary(method: str, doc: dict[str, Any] | None, embed_seconds: float) -> dict[str, Any]:
    """What results.json says of a method's training (not its weights)."""
    out: dict[str, Any] = {"feature_seconds": embed_seconds}
    if doc is not None:
        keep = ("history", "chosen_step", "val_accuracy", "unit", "train_seconds", "resumed",
                "base_classes", "epochs")  # fmt: skip
        out["training"] = {k: doc[k] for k in keep if k in doc}
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _benchmark(args: argparse.Namespace, budget: Budget, episodes: int,
               device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Load, train, evaluate: the results document."""
    start = time.perf_counter()
    fs = load_fewshot(args.root, args.image_size, args.partition_seed, args.verify, args.download,
                      args.n_val, args.n_novel, args.min_images)  # fmt: skip
    parts = _parts(fs)
    settings = [Setting(w, k, args.queries, episodes) for w in args.ways for k in args.shots]
    for setting in settings:  # before any training: a cell that cannot be measured says so now
        require_classes(parts["novel"].labels, parts["novel"].classes, setting, "novel")
    preflight(parts["base"], parts["val"], budget, args.methods)
    print(
        f"kkanji few-shot: {len(parts['base'].classes):,} base, {len(parts['val'].classes):,} "
        f"validation, {len(parts['novel'].classes):,} novel classes (partition sha256 "
        f"{fs.partition_sha256[:12]}...), {args.image_size}x{args.image_size}, on "
        f"{device_name(device)}",
        flush=True,
    )
    novel = parts["novel"]
    # The same episodes for every method: the methods are compared on paired episodes.
    # Keyed on the dataset's indices: the episodes EpisodeSampler(fs.targets, novel classes,
    # exclude=~fs.usable) draws, as the docs say.
    episodes = {s: draw_episodes(novel.labels, novel.classes, s, args.seed, novel.index)
                for s in settings}  # fmt: skip
    # Every model file is checked before anything trains: a stale one stops the run now.
    ready = {m: load_trained(Path(args.out) / f"{m}.pt", m, _settings(m, args, budget, fs))
             for m in args.methods if m in TRAINED}  # fmt: skip
    cells, methods = [], {}
    for method in args.methods:
        doc = None
        if method in TRAINED:
            doc = _trained(method, args, budget, parts, fs, device, ready[method])
        embed = flat if doc is None else embedding_from(doc, args.image_size, device)
        got, embed_seconds = _evaluate(method, embed, novel, episodes, device)
        cells += got
        methods[method] = _summary(method, doc, embed_seconds)
    return {
        "format": RESULTS_FORMAT,
        "dataset": "kkanji",
        "image_size": args.image_size,
        "seed": args.seed,
        "partition_seed": args.partition_seed,
        "partition_sha256": fs.partition_sha256,
        "partition": {
            k: {"classes": len(p.classes), "images": len(p.labels)} for k, p in parts.items()
        },  # fmt: skip
        "budget": dataclasses.asdict(budget),
        "methods": methods,
        "cells": cells,
        "machine": _machine(device),
        "arguments": vars(args),
        "seconds": round(time.perf_counter() - start, 3),
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train and evaluate, write ``results.json`` and ``table.md``; returns
    the results document."""
    args = build_parser().parse_args(argv)
    # Each asked for once, in the order given.
    args.methods = list(dict.fromkeys(args.methods))
    args.ways, args.shots = list(dict.fromkeys(args.ways)), list(dict.fromkeys(args.shots))
    budget, episodes = resolve(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu.configure(threads=args.threads, device=device)
    out = Path(args.out)
    if os.path.lexists(out) and not out.is_dir():
        raise TrainError(f"{out} is not a folder: name a folder with --out")
    if not args.verify:
        print("warning: --no-verify: checksums are not checked", file=sys.stderr)
    with folder_lock(out, what="running a few-shot benchmark"):
        with determinism(True, device):
            doc = _benchmark(args, budget, episodes, device)
        # results.json last: it marks a finished run (each file is written atomically).
        atomic_write(out / "table.md", render(doc))
        write_json(out / "results.json", doc, indent=1)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return doc


def main(argv: list[str] | None = None) -> int:
    """The command line (see :func:`run`); errors as one line; Ctrl-C exits 130 with no
    results written (model files already written stay, and the same command reuses them)."""
    return run_main(
        run, argv, interrupted="interrupted; results not written (trained models are kept)"
    )


if __name__ == "__main__":
    sys.exit(main())
