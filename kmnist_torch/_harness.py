"""The harness's files (:mod:`kmnist_torch.reproduce`): ``table.md`` and ``results.json``,
written after each cell, what they say about the run as a whole, and what a rerun with the same
settings takes back from them (the cells finished already)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import atomic_write
from .reporting.fewshot_table import render as render_fewshot
from .reporting.longtail import longtail_table
from .reporting.table import (
    check_cells,
    dataset_title,
    finish_cell,
    pct,
    render_table,
    targets_record,
)
from .training.runtime import device_name

# What a cell takes from the table, not from an earlier run (targets change with the table).
TABLE_FIGURES = ("title", "metric", "upstream_old", "upstream_today", "target", "target_source",
                 "tolerance", "comparable")  # fmt: skip


def write_outputs(
    out: Path, cells: list[dict[str, Any]], meta: dict[str, Any], tolerance: float | None
) -> list[str]:
    """Write table.md and results.json into ``out``; return the --check failures."""
    failures = check_cells(cells, tolerance)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Reproduction of the Kuzushiji benchmark table\n\n"
        f"{meta['command']}\n\nMachine: {meta['machine']}; torch {meta['torch']}.\n\n"
    )
    table = header + render_table(cells, tolerance) + longtail_section(cells)
    table += fewshot_section(meta)
    atomic_write(out / "table.md", table, fsync=False)
    payload = {
        **meta,
        "targets": targets_record(tolerance),
        "cells": cells,
        "failures": failures,
    }
    atomic_write(out / "results.json", json.dumps(payload, indent=2) + "\n", fsync=False)
    return failures


def longtail_section(cells: list[dict[str, Any]]) -> str:
    """The table's long-tail section: one row per cell with a long-tail record (KKanji's),
    empty where there is none."""
    rows = [(c["title"], c["longtail"]) for c in cells if c.get("longtail") and not c["error"]]
    if not rows:
        return ""
    return "\n## KKanji long tail\n\n" + longtail_table(rows)


def fewshot_section(meta: dict[str, Any]) -> str:
    """The table's few-shot section (``--fewshot``): the few-shot command's own table, empty
    where the run had none."""
    doc = meta.get("fewshot")
    return "" if not doc else "\n## KKanji few-shot\n\n" + render_fewshot(doc)


def machine(device: str | None) -> str:
    """The machine as the table's header names it: the GPU used, if any, and the CPUs."""
    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs"
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        return f"{device_name(device or 'cuda')}; {cpu}"
    return f"no GPU used; {cpu}"


def run_meta(
    args: argparse.Namespace, argv: list[str] | None, devices: list[str] | None, comparable: bool
) -> dict[str, Any]:
    """What results.json says about the run as a whole."""
    return {
        "command": "python -m kmnist_torch.reproduce " + " ".join(argv or sys.argv[1:]),
        "machine": machine(args.device or (devices[0] if devices else None)),
        "devices": devices,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "verified": args.verify,
        "quick": args.quick,
        "comparable": comparable,
        "recipe": args.recipe,
        "seed": args.seed,
        "resplit": args.resplit is not None,
        "settings": rerun_settings(args),
    }


def rerun_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a rerun must share with an earlier run in its ``--out`` to keep its finished cells."""
    keys = ("quick", "epochs", "limit_train", "limit_test", "recipe", "seed", "verify", "root")
    settings = {**{k: getattr(args, k) for k in keys}, "resplit": args.resplit is not None,
                "resplit_seed": args.resplit_seed}  # fmt: skip
    # Only when given, so a run from before --image-size existed keeps its finished cells.
    if getattr(args, "image_size", None) is not None:
        settings["image_size"] = args.image_size
    return settings


def still_to_run(cells: list[dict[str, Any]], out: Path, settings: dict) -> list[dict[str, Any]]:
    """The cells an earlier run with the same settings did not finish in ``out`` (its
    results.json); the finished ones take its figures (and today's targets), not run again."""
    try:
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return cells
    except (OSError, ValueError) as exc:
        print(f"note: {out / 'results.json'} unreadable ({exc}): every cell runs", file=sys.stderr)
        return cells
    if earlier.get("settings") != settings:
        print(f"note: {out / 'results.json'} holds a run with other settings: every cell runs")
        return cells
    finished = {(c["row"], c["dataset"]): c for c in earlier.get("cells", [])
                if c.get("error") is None and c.get("ours") is not None}  # fmt: skip
    todo = []
    for cell in cells:
        old = finished.get((cell["row"], cell["dataset"]))
        if old is None:
            todo.append(cell)
            continue
        cell.update({k: v for k, v in old.items() if k not in TABLE_FIGURES})
        finish_cell(cell, old["accuracy"], old["balanced_accuracy"])
        print(f"== {cell['title']} on {dataset_title(cell['dataset'])}: done in an earlier run")
        report(cell)
    return todo


def report(cell: dict[str, Any]) -> None:
    print(
        f"   {cell['title']} on {dataset_title(cell['dataset'])}, {cell['metric']}: "
        f"{pct(cell['ours'])}"
        + (f" (target {pct(cell['target'])})" if cell["target"] is not None else "")
        + (f"  ERROR {cell['error']}" if cell["error"] else ""),
        flush=True,
    )
