"""Evaluate a trained run on its test images: metrics, confusion matrix, mistakes.

    python -m kmnist_torch.evaluate runs/kmnist-cnn-simple_cnn-none-seed0

Writes ``metrics.json``, ``confusion.png`` and ``errors.png`` to ``RUN/eval-<split>`` (or
``--out``) and prints a summary. The images are chosen as the run chose them (dataset,
``--limit-test``, KKanji's split options, from the model file and the run's ``results.json``),
so the accuracy equals the run's ``test_accuracy``. The run folder is untrusted input: its
``results.json`` never turns a check off nor sends a download to a folder the user did not
name (:func:`kmnist_torch.data.runinfo.data_root`), and ``RUN/eval-<split>`` is written only
when it is a real folder inside the run folder (a link there is refused).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._args import Parser, add_data_options, run_main
from ._io import write_json
from .data.loader import TensorLoader
from .data.runinfo import read_results, split_limit
from .data.splits import load_run_split
from .errors import DataFilesError, RunFolderError
from .models.modelfile import find_model_file, load_model
from .reporting import plots
from .reporting.scores import accuracy, balanced_accuracy
from .training import cpu

__all__ = ["build_parser", "class_report", "main", "predict_split", "run"]

# The largest batch evaluate feeds the model, whatever a model file's recipe says (a forged
# eval_batch_size must not size the activations); the trainer's own batch size up to it.
EVAL_BATCH_MAX = 2048
# Above this many classes metrics.json keeps the confusion matrix as (true, predicted, count)
# triples: KKanji's 3,832 x 3,832 as nested lists would be ~40 MB of zeros.
DENSE_MAX_CLASSES = 1000


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = Parser(
        prog="python -m kmnist_torch.evaluate",
        description="Evaluate a trained run: metrics.json, confusion.png and errors.png.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (or its model.pt / checkpoint.pt)")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--out", default=None, metavar="DIR", help="default: RUN/eval-<split>")
    add_data_options(p, root_help="data folder (default: the run's)")
    return p


@torch.no_grad()
def predict_split(
    model: torch.nn.Module, split: Any, device: torch.device, recipe: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and argmax predictions for every image of ``split`` (an object
    with uint8 ``data`` and ``targets``), computed as the trainer's test pass computes them
    (bf16 autocast as the recipe used it; channels_last on a CPU, and on CUDA where the recipe
    used it).

    Returns:
        ``(probs, pred)``: float32 N x K and int64 N, on the CPU.
    """
    recipe = recipe or {}
    batch = cpu.eval_batch(device, min(recipe.get("eval_batch_size", 1000), EVAL_BATCH_MAX))
    loader = TensorLoader(split, batch, shuffle=False, device=device)
    layout = bool(recipe.get("channels_last"))
    model = cpu.prepare_model(model, device, layout)
    probs, preds = [], []
    for x, _ in loader:
        x = cpu.prepare_batch(x, device, layout)
        with cpu.autocast(device, bool(recipe.get("amp"))):
            logits = model(x)
        preds.append(logits.argmax(1).cpu())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(probs), torch.cat(preds)


def class_report(
    matrix: np.ndarray, classes: list[str], codepoints: list[str]
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class from a confusion matrix (``[true, pred]``);
    0 where a ratio has nothing to divide by, as scikit-learn reports it."""
    tp = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(0), matrix.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return [
        {
            "class": k,
            "character": classes[k],
            "codepoint": codepoints[k],
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k in range(len(classes))
    ]


def _confusion(matrix: np.ndarray) -> dict[str, Any]:
    if len(matrix) <= DENSE_MAX_CLASSES:
        return {"confusion_matrix": matrix.tolist()}
    rows, cols = np.nonzero(matrix)
    triples = [[int(i), int(j), int(matrix[i, j])] for i, j in zip(rows, cols)]
    return {"confusion_matrix": None, "confusion_triples": triples}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, evaluate, write the three files and print a summary; returns the
    ``metrics.json`` document."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu.configure(device=device)  # threads: the CPUs others leave free, as in training
    model_file = find_model_file(args.run)
    out = _out_folder(args.out, model_file, args.split)
    model = load_model(model_file, device)
    meta = model.meta
    if not args.verify:
        print("warning: --no-verify: checksums are not checked", file=sys.stderr)
    split, results = _run_split(model_file, meta, args)
    limit = split_limit(meta, results.get("config", {}), args.split)
    probs, pred = predict_split(model, split, device, meta.get("recipe"))
    target = split.targets.cpu()
    k = len(meta["classes"])
    matrix = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k).numpy()
    classes, codepoints = list(meta["classes"]), list(meta["codepoints"])
    doc = {
        "model": str(model_file),
        "dataset": meta["dataset"],
        "split": args.split,
        "num_images": len(target),
        "limit": limit,
        "accuracy": accuracy(pred, target),
        "balanced_accuracy": balanced_accuracy(pred, target),
        "run_test_accuracy": results.get("test_accuracy"),
        "per_class": class_report(matrix, classes, codepoints),
        **_confusion(matrix),
    }
    _make_folder(_out_folder(args.out, model_file, args.split))  # checked again, then made
    write_json(out / "metrics.json", doc, indent=1)
    title = f"{meta['dataset']} {args.split}: {len(target):,} images, {100 * doc['accuracy']:.2f}%"
    plots.plot_confusion(matrix, classes, codepoints, out / "confusion.png", title)
    wrong = torch.nonzero(pred != target).flatten()
    p_wrong = probs[wrong, pred[wrong]]
    order = wrong[torch.argsort(p_wrong, descending=True)][: plots.ERRORS_MAX]
    plots.plot_errors(
        split.data[order].numpy(),
        target[order].tolist(),
        pred[order].tolist(),
        probs[order, pred[order]].tolist(),
        classes,
        codepoints,
        out / "errors.png",
        f"{meta['dataset']} {args.split}: the {len(order)} most confident of {len(wrong):,} "
        "mistakes (true → predicted, probability)",
    )
    _print_summary(doc, matrix, classes, out)
    return doc


def _run_split(model_file: Path, meta: dict[str, Any], args: argparse.Namespace) -> tuple:
    """The images the run was tested on; a failed check explains what the run had done."""
    try:
        return load_run_split(model_file, meta, args.split, args.root, args.verify, args.download)
    except DataFilesError as exc:
        results = model_file.parent / "results.json"
        hint = (
            f". The run was trained with --no-verify ({results}): pass --no-verify to evaluate "
            "on the same files (results.json never turns a check off by itself)"
        )
        try:
            unverified = read_results(model_file.parent).get("config", {}).get("verify") is False
        except RunFolderError:
            unverified = False
        if args.verify and unverified:
            raise DataFilesError(f"{exc}{hint}") from exc
        raise


def _out_folder(out: str | None, model_file: Path, split: str) -> Path:
    """``--out``, or ``RUN/eval-<split>``: there only a real folder (or nothing yet), never a
    link that would send the files outside the run folder. Checked before any work is done."""
    if out is not None:
        return Path(out)
    folder = model_file.parent / f"eval-{split}"
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        what = f"a link to {os.readlink(folder)}" if folder.is_symlink() else "not a folder"
        raise RunFolderError(
            f"{folder} is {what}: evaluate writes only inside the run folder; remove it, or "
            "name a folder with --out"
        )
    return folder


def _make_folder(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not out.is_dir():
        raise RunFolderError(f"{out} is not a folder: name a folder with --out")


def _print_summary(doc: dict[str, Any], matrix: np.ndarray, classes: list[str], out: Path) -> None:
    print(f"{doc['dataset']} {doc['split']}: {doc['num_images']:,} images, model {doc['model']}")
    line = (
        f"  accuracy {100 * doc['accuracy']:.2f}%  balanced {100 * doc['balanced_accuracy']:.2f}%"
    )
    if doc["run_test_accuracy"] is not None and doc["split"] == "test":
        line += f"  (results.json: {100 * doc['run_test_accuracy']:.2f}%)"
    print(line)
    worst = sorted((c for c in doc["per_class"] if c["support"]), key=lambda c: c["recall"])[:3]
    print(
        "  lowest recall: " + ", ".join(f"{c['character']} {100 * c['recall']:.1f}%" for c in worst)
    )
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    if off.any():
        i, j = np.unravel_index(off.argmax(), off.shape)
        print(f"  most confused: {classes[i]} → {classes[j]} ({off[i, j]} images)")
    print(f"wrote {out}: metrics.json, confusion.png, errors.png")


def main(argv: list[str] | None = None) -> int:
    """The command line: evaluate (see :func:`run`); errors as one line."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
