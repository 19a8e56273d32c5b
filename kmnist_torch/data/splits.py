"""One split of a dataset as arrays, cut to a seeded stratified subset: the one data path of the
trainer and the reproduction harness (so a 4-NN row and a trained row see the same images)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .registry import create_dataset, dataset_options
from .runinfo import data_root, dataset_arguments, read_results, split_limit

# The seed of --limit-train/--limit-test. Fixed, not the run's --seed: runs with different
# seeds then differ by training noise alone, on the same images, and the harness's 4-NN and
# trained rows see the same subset.
LIMIT_SEED = 0


def stratified_subset(targets: Any, n: int, seed: int = LIMIT_SEED) -> np.ndarray:
    """Indices of ``n`` examples drawn per class in proportion to the class sizes.

    Args:
        targets: the class of every example (a 1-D array or tensor of integers).
        n: how many to keep; ``n >= len(targets)`` keeps them all.
        seed: which examples of each class are drawn; the same seed gives the same subset.

    Returns:
        Sorted int64 indices, so the kept examples stay in the dataset's order. Each class
        gets ``n * size / total`` rounded down, and the examples left over go to the classes
        with the largest remainders (the smaller class index first on a tie).
    """
    y = np.asarray(torch.as_tensor(targets).cpu().numpy()).reshape(-1)
    total = len(y)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= total:
        return np.arange(total, dtype=np.int64)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = counts * n / total
    quota = np.floor(exact).astype(np.int64)
    left = n - int(quota.sum())
    # Largest remainder first; a stable sort keeps the lower class first among equals.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:left]] += 1
    rng = np.random.default_rng(seed)
    kept = []
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        kept.append(rng.choice(members, size=int(quota[k]), replace=False))
    return np.sort(np.concatenate(kept)).astype(np.int64)


def load_split(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    limit: int | None = None,
    download: bool = True,
    verify: bool = True,
    **options: Any,
) -> SimpleNamespace:
    """One split of a dataset as whole tensors, cut to ``limit`` images.

    Args:
        name: a name :func:`kmnist_torch.data.registry.create_dataset` accepts.
        root: the data folder (None: the default root).
        train: the training split (True) or the test split (False).
        limit: keep a stratified subset of this many images (:func:`stratified_subset`,
            seed :data:`LIMIT_SEED`); None keeps them all.
        download: fetch missing files.
        verify: check the files' checksums.
        **options: passed on to the dataset (KKanji's ``test_fraction``, ``seed`` ...).

    Returns:
        A namespace with uint8 ``data`` (N x H x W), int64 ``targets``, ``classes`` (the
        characters), ``codepoints`` (``"U+XXXX"``) and ``romaji`` (None per class where the
        dataset has no readings).
    """
    opts: dict[str, Any] = {"download": download, "verify": verify, **options}
    with warnings.catch_warnings():
        # --no-verify is the caller's explicit choice: it says so once, not per split.
        warnings.filterwarnings("ignore", message=".*verify=False")
        ds = create_dataset(name, root, train=train, **opts)
    data, targets = torch.as_tensor(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)
    if limit is not None and limit < len(targets):
        keep = torch.from_numpy(stratified_subset(targets, limit))
        data, targets = data[keep], targets[keep]
    classes = list(ds.classes)
    codepoints = list(getattr(ds, "codepoints", None) or [f"U+{ord(c):04X}" for c in classes])
    romaji = list(getattr(ds, "romaji", None) or [None] * len(classes))
    return SimpleNamespace(
        data=data, targets=targets, classes=classes, codepoints=codepoints, romaji=romaji
    )


def load_run_split(
    model_file: Path,
    meta: dict[str, Any],
    split: str = "test",
    root: str | None = None,
    verify: bool = True,
    download: bool = True,
) -> tuple[SimpleNamespace, dict[str, Any]]:
    """The images a run trained (``split="train"``) or tested on, chosen as the run chose
    them: its dataset, root, limits and the dataset's own options, from ``model_file``'s
    metadata and the ``results.json`` beside it.

    Args:
        model_file: the run's ``model.pt`` or ``checkpoint.pt``.
        meta: the model's metadata (:func:`kmnist_torch.models.modelfile.model_meta`).
        split: ``"test"`` or ``"train"``.
        root: the data folder (None: the run's, read only; see
            :func:`kmnist_torch.data.runinfo.data_root`).
        verify: check the files' checksums (whatever the run did).
        download: fetch missing files.

    Returns:
        ``(split, results)``: :func:`load_split`'s namespace and the run's ``results.json``
        document (empty where there is none).
    """
    run = read_results(model_file.parent)  # checked: issue 20, a run folder is untrusted
    config = run.get("config", {})
    limit = split_limit(meta, config, split)
    options = (meta.get("data") or {}).get("options")
    if options is None:  # metadata rebuilt from a checkpoint's config
        options = dataset_options(meta["dataset"], config)
    options = dataset_arguments(meta["dataset"], options, str(model_file))
    # results.json never turns a check off or sends a download elsewhere: only the caller does.
    root, download = data_root(root, download, config)
    images = load_split(meta["dataset"], root, split == "train", limit, download, verify, **options)
    if list(images.classes) != list(meta["classes"]):
        raise ValueError(
            f"the {meta['dataset']} {split} images have other classes than the model "
            f"({len(images.classes)} vs {len(meta['classes'])}): check --root and the split "
            "options"
        )
    side = int(images.data.shape[-1])
    if side != meta["image_size"]:  # KKanji's image_size, lost from an edited results.json
        raise ValueError(
            f"the {meta['dataset']} {split} images are {side}x{side} but the model takes "
            f"{meta['image_size']}x{meta['image_size']}: check the run's image_size option"
        )
    return images, run
