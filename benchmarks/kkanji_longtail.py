"""The Kuzushiji-Kanji long-tail benchmark on the CPU: 4-NN and nearest class mean on the 64x64
pixels, the simple CNN through the trainer, and PreActResNet-18 (a run, or by default its
measured training speed and what one epoch would take here), each scored on the default split's
test part overall and on the head / middle / tail classes (kmnist_torch.reporting.longtail).

    python benchmarks/kkanji_longtail.py --root ROOT --out DIR [--cnn-epochs 2]
        [--image-size 32] [--preact-epochs E | --preact-steps 30] [--skip knn ...]
        [--no-verify]

ROOT holds ``KKanji/kkanji2/`` (the full tree; only read). Written to DIR: ``kkanji-split.json``
(the split, ``python -m kmnist_torch kkanji-split``'s file) with its sha256,
``rows/<row>.json`` per row as it finishes, ``runs/`` (the trainer's runs), and
``kkanji_longtail.json`` and ``kkanji_longtail.md`` (the table to paste into docs/kkanji.md).
Rerun the same command after a stop: a row whose ``rows/<row>.json`` exists is not run again,
and a trained row continues its run (``--resume``). Every row records its seconds and the load
average before and after it; the machine (CPU model, cores) is in the JSON and the markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kmnist_torch import catalog, train
from kmnist_torch._cells import longtail_of_run
from kmnist_torch._io import atomic_write, write_json
from kmnist_torch.data.kkanji.split import write_split_file
from kmnist_torch.data.splits import load_split
from kmnist_torch.models.knn import knn_predict
from kmnist_torch.models.ncm import class_means, ncm_predict
from kmnist_torch.reporting.longtail import longtail_scores, longtail_table
from kmnist_torch.training.recipes import RECIPES

ROWS = {
    "knn": "4-NN (pixels, 64x64)",
    "ncm": "Nearest Class Mean (pixels, 64x64)",
    "cnn": "Keras Simple CNN",
    "preact18": "PreActResNet-18",
}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def split_file(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The default split written as ``kkanji-split.json`` (kept when there already), its sha256."""
    path = out / "kkanji-split.json"
    if not path.is_file():
        say(f"writing the split to {path}")
        write_split_file(path, root=args.root, verify=args.verify)
    data = path.read_bytes()
    doc = json.loads(data)
    return {
        "file": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "split_version": doc["split_version"],
        "train": len(doc["train"]),
        "test": len(doc["test"]),
        "classes": len(doc["classes"]),
        "files_sha256": doc["source"]["files_sha256"],
    }


def data(args: argparse.Namespace, train_part: bool) -> Any:
    return load_split("kkanji", args.root, train_part, None, False, args.verify)


def pixel_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """4-NN or NCM on the 64x64 pixels of the default split."""
    tr, te = data(args, True), data(args, False)
    counts = torch.bincount(tr.targets, minlength=len(tr.classes))
    say(
        f"{row}: {len(tr.targets):,} train x {len(te.targets):,} test images, "
        f"{tr.data.shape[1]}x{tr.data.shape[2]}"
    )
    t0 = time.perf_counter()
    if row == "knn":
        pred = knn_predict(
            tr.data, tr.targets, te.data, k=4, weights="distance", device="cpu", progress=True
        )
    else:
        means = class_means(tr.data, tr.targets, len(tr.classes))
        pred = ncm_predict(means, te.data, progress=True)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "longtail": longtail_scores(pred, te.targets, counts),
        "num_train": len(tr.targets),
        "num_test": len(te.targets),
        "image_size": int(tr.data.shape[-1]),
    }


def train_argv(model: str, args: argparse.Namespace, run: Path, epochs: int) -> list[str]:
    argv = [
        "--dataset",
        "kkanji",
        "--model",
        model,
        "--recipe",
        "cnn" if model == "simple_cnn" else "paper",
        "--epochs",
        str(epochs),
        "--root",
        str(args.root),
        "--out",
        str(run),
        "--resume",
        "--device",
        "cpu",
        "--no-download",
        "--seed",
        "0",
    ]
    if args.image_size != 64:
        argv += ["--image-size", str(args.image_size)]
    if not args.verify:
        argv.append("--no-verify")
    return argv


def trained_row(model: str, args: argparse.Namespace, run: Path, epochs: int) -> dict[str, Any]:
    """Train with kmnist_torch.train, then score the run's model.pt on the test part."""
    argv = train_argv(model, args, run, epochs)
    say(f"{model}: python -m kmnist_torch.train {' '.join(argv)}")
    t0 = time.perf_counter()
    res = train.run(argv)
    seconds = time.perf_counter() - t0
    if res.get("interrupted"):
        raise SystemExit(f"{model}: stopped; run the same command again to continue")
    longtail, te, tr = longtail_of_run(run, torch.device("cpu"), args.root, args.verify, False)
    return {
        "seconds": seconds,
        "train_seconds": res.get("wall_seconds"),
        "epochs": epochs,
        "images_per_second": res.get("images_per_second"),
        "longtail": longtail,
        "argv": argv,
        "num_train": len(tr.targets),
        "num_test": len(te.targets),
        "image_size": int(te.data.shape[-1]),
        "trainer_test_accuracy": res.get("test_accuracy"),
    }


def preact_speed(args: argparse.Namespace, out: Path, n_train: int) -> dict[str, Any]:
    """PreActResNet-18's training img/s over ``--preact-steps`` steps of the trainer (a one
    epoch run on that many batches, a small test part) and one full epoch's seconds from it."""
    batch = RECIPES["paper"].batch_size
    run = out / "runs" / f"preact18-speed-{args.image_size}px-{args.preact_steps}steps"
    argv = train_argv("preact18", args, run, 1)
    argv += ["--limit-train", str(batch * args.preact_steps), "--limit-test", "200"]
    say(f"preact18: {args.preact_steps} training steps of {batch} to measure its speed")
    t0 = time.perf_counter()
    res = train.run(argv)
    ips = res["images_per_second"]
    return {
        "seconds": time.perf_counter() - t0,
        "steps": args.preact_steps,
        "batch_size": batch,
        "images_per_second": ips,
        "epoch_seconds_estimate": n_train / ips,
        "num_train": n_train,
        "argv": argv,
        "longtail": None,
        "image_size": args.image_size,
    }


def run_row(row: str, args: argparse.Namespace, out: Path, n_train: int) -> dict[str, Any]:
    if row in ("knn", "ncm"):
        return pixel_row(row, args)
    if row == "cnn":
        # A run folder per setting: the trainer resumes only a run with the same settings.
        run = out / "runs" / f"cnn-{args.image_size}px-{args.cnn_epochs}ep"
        return trained_row("simple_cnn", args, run, args.cnn_epochs)
    if args.preact_epochs:
        run = out / "runs" / f"preact18-{args.image_size}px-{args.preact_epochs}ep"
        return trained_row("preact18", args, run, args.preact_epochs)
    return preact_speed(args, out, n_train)


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    m, s = doc["machine"], doc["split"]
    scored = [(ROWS[r] + _size(rec), rec["longtail"]) for r, rec in rows.items() if rec["longtail"]]
    lines = [
        f"Split: `{s['split_version']}`, {s['train']:,} train / {s['test']:,} test images, "
        f"{s['classes']:,} classes; split file sha256 `{s['sha256']}`.",
        "",
        longtail_table(scored) if scored else "(no scored row)\n",
        "| Model | seconds | load average before → after | note |",
        "| --- | ---: | --- | --- |",
    ]
    for r, rec in rows.items():
        lines.append(
            f"| {ROWS[r]}{_size(rec)} | {rec['seconds']:,.1f} | "
            f"{_load(rec['load_before'])} → {_load(rec['load_after'])} | {_note(rec)} |"
        )
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads); load average {_load(doc['load_at_start'])} at the "
        f"start, {_load(doc['load_at_end'])} at the end.",
    ]
    return "\n".join(lines) + "\n"


def _size(rec: dict[str, Any]) -> str:
    return (
        ""
        if rec.get("image_size") in (None, 64)
        else f" at {rec['image_size']}x{rec['image_size']}"
    )


def _load(avg: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def _note(rec: dict[str, Any]) -> str:
    if "epoch_seconds_estimate" in rec:
        epoch = rec["epoch_seconds_estimate"]
        return (
            f"not trained: {rec['images_per_second']:,.1f} img/s over {rec['steps']} steps of "
            f"{rec['batch_size']}; one epoch of {rec['num_train']:,} images ≈ "
            f"{epoch:,.0f} s ({epoch / 3600:,.2f} h)"
        )
    if "epochs" in rec:
        return f"{rec['epochs']} epochs, {rec['images_per_second']:,.1f} training img/s"
    return f"{rec['num_train']:,} x {rec['num_test']:,} images"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="data folder holding KKanji/kkanji2/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cnn-epochs", type=int, default=2, help="epochs of the simple CNN (2)")
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        choices=catalog.KKANJI.sizes,
        help="image size of the trained rows (32; the pixel rows use 64)",
    )
    p.add_argument(
        "--preact-epochs",
        type=int,
        default=None,
        help="train PreActResNet-18 this many epochs (default: measure its speed)",
    )
    p.add_argument(
        "--preact-steps",
        type=int,
        default=30,
        help="training steps timed when PreActResNet-18 is not trained (30)",
    )
    p.add_argument("--skip", nargs="+", choices=list(ROWS), default=[], help="rows to leave out")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="accept a tree that is not the complete, digest-checked one (tests)",
    )
    return p.parse_args(argv)


def row_settings(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a row's figures depend on beyond the split: a row of a rerun is reused only when
    they are the same (the pixel rows: none)."""
    if row == "cnn":
        return {"epochs": args.cnn_epochs, "image_size": args.image_size}
    if row == "preact18":
        return {"epochs": args.preact_epochs, "steps": args.preact_steps,
                "image_size": args.image_size}  # fmt: skip
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "machine": machine(),
        "load_at_start": load_average(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    say(
        f"machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, load "
        f"{_load(doc['load_at_start'])}"
    )
    doc["split"] = split_file(args, out)
    say(
        f"split sha256 {doc['split']['sha256']}: {doc['split']['train']:,} train / "
        f"{doc['split']['test']:,} test"
    )
    doc["rows"] = {}
    for row in (r for r in ROWS if r not in args.skip):
        path = out / "rows" / f"{row}.json"
        wanted = {"settings": row_settings(row, args), "split_sha256": doc["split"]["sha256"]}
        earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if earlier is not None and {k: earlier.get(k, {}) for k in wanted} == wanted:
            say(f"{row}: done in an earlier run ({path})")
            doc["rows"][row] = earlier
            continue
        if earlier is not None:  # a table never mixes settings
            say(f"{row}: {path} was run with other settings or another split: running it again")
        say(f"== {ROWS[row]}")
        before = load_average()
        rec = run_row(row, args, out, doc["split"]["train"])
        rec.update(
            row=row,
            title=ROWS[row],
            load_before=before,
            load_after=load_average(),
            settings=wanted["settings"],
            machine=doc["machine"],
            split_sha256=doc["split"]["sha256"],
        )
        write_json(path, rec)
        lt = rec["longtail"]
        say(
            f"{row}: {rec['seconds']:,.1f} s"
            + (
                f", top-1 {100 * lt['top1']:.2f}%, balanced {100 * lt['balanced_accuracy']:.2f}%"
                if lt
                else ""
            )
        )
        doc["rows"][row] = rec
    doc["load_at_end"] = load_average()
    write_json(out / "kkanji_longtail.json", doc)
    atomic_write(out / "kkanji_longtail.md", markdown(doc))
    print(markdown(doc))
    say(f"wrote {out / 'kkanji_longtail.json'} and {out / 'kkanji_longtail.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
