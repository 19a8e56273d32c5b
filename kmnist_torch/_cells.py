"""The harness's pixel rows and its long-tail records (:mod:`kmnist_torch.reproduce`): the
4-NN and nearest-class-mean cells, scored on the raw pixels, and for every KKanji cell the
long-tail record (:mod:`kmnist_torch.reporting.longtail`: top-1 and balanced accuracy overall
and on the head, middle and tail classes, grouped by the training images each class had)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .data.splits import load_run_split, load_split
from .reporting.longtail import longtail_scores
from .reporting.scores import accuracy, balanced_accuracy
from .reporting.table import finish_cell
from .training.runtime import device_name

# Rows scored on the pixels, without training.
PIXEL_ROWS = ("knn", "ncm")
# Datasets whose cells get a long-tail record.
LONGTAIL_DATASETS = ("kkanji",)
# --quick: sizes of the pixel rows' smoke run.
QUICK_PIXELS = {"limit_train": 2000, "limit_test": 500}


def dataset_options(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The dataset's own options the harness passes: KKanji's ``image_size`` (``--image-size``)."""
    size = getattr(args, "image_size", None)
    return {"image_size": size} if dataset == "kkanji" and size is not None else {}


def load_cell_split(dataset: str, args: argparse.Namespace, train: bool, limit: int | None) -> Any:
    """One split as a cell reads it: the KKanji class's default split, as the trained rows use,
    at ``--image-size`` for KKanji."""
    return load_split(
        dataset,
        args.root,
        train,
        limit,
        args.download,
        args.verify,
        **dataset_options(dataset, args),
    )


def train_counts(split: Any) -> torch.Tensor:
    """Training images of every class of ``split`` (one entry per class, zeros included)."""
    return torch.bincount(split.targets, minlength=len(split.classes))


def run_pixels(cell: dict[str, Any], args: argparse.Namespace) -> None:
    """Score the 4-NN baseline or the nearest class mean on one dataset's pixels (device
    seconds: the prediction only, the class means included for NCM)."""
    from .models.knn import default_device, knn_predict
    from .models.ncm import class_means, ncm_predict

    limit_train = args.limit_train or (QUICK_PIXELS["limit_train"] if args.quick else None)
    limit_test = args.limit_test or (QUICK_PIXELS["limit_test"] if args.quick else None)
    train_set = load_cell_split(cell["dataset"], args, True, limit_train)
    test_set = load_cell_split(cell["dataset"], args, False, limit_test)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if cell["row"] == "knn":
        pred = knn_predict(
            train_set.data, train_set.targets, test_set.data, k=4, weights="distance", device=device
        )
    else:
        means = class_means(
            train_set.data, train_set.targets, len(train_set.classes), device=device
        )
        pred = ncm_predict(means, test_set.data, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cell.update(
        device_seconds=time.perf_counter() - t0,
        device=device_name(device),
        num_train=len(train_set.data),
        num_test=len(test_set.data),
    )
    y = test_set.targets
    finish_cell(cell, accuracy(pred, y), balanced_accuracy(pred, y))
    if cell["dataset"] in LONGTAIL_DATASETS:
        cell["longtail"] = longtail_scores(pred, y, train_counts(train_set))


def run_longtail(cell: dict[str, Any], args: argparse.Namespace, run_dir: Path) -> None:
    """The long-tail record of a trained KKanji cell (see :func:`longtail_of_run`)."""
    if cell["dataset"] not in LONGTAIL_DATASETS:
        return
    device = torch.device(args.device) if args.device else None
    cell["longtail"] = longtail_of_run(run_dir, device, args.root, args.verify, args.download)[0]


def longtail_of_run(
    run_dir: Path, device: torch.device | None, root: Any, verify: bool, download: bool
) -> tuple[dict[str, Any], Any, Any]:
    """A trained run's long-tail record: its ``model.pt`` on the images the run tested on
    (:func:`kmnist_torch.evaluate.predict_split`), the groups from the images it trained on;
    with those test and training images (:func:`load_run_split`'s namespaces)."""
    from .evaluate import predict_split
    from .models.knn import default_device
    from .models.modelfile import find_model_file, load_model

    device = device or default_device()
    model_file = find_model_file(run_dir)
    model = load_model(model_file, device)
    split = {"root": root, "verify": verify, "download": download}
    test_set, _ = load_run_split(model_file, model.meta, "test", **split)
    train_set, _ = load_run_split(model_file, model.meta, "train", **split)
    _, pred = predict_split(model, test_set, device, model.meta.get("recipe"))
    return longtail_scores(pred, test_set.targets, train_counts(train_set)), test_set, train_set
