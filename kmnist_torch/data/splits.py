"""One split of a dataset as arrays, cut to a seeded stratified subset: the one data path of the
trainer and the reproduction harness (so a 4-NN row and a trained row see the same images)."""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .registry import create_dataset

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


# The trainer's KKanji flags -> KKanji's arguments (the rest of a run's options need none).
KKANJI_OPTIONS = {
    "test_fraction": "test_fraction",
    "min_per_class": "min_per_class",
    "shots": "shots",
    "split_seed": "seed",
}


def dataset_options(dataset: str, given: dict[str, Any]) -> dict[str, Any]:
    """The dataset's own arguments among a run's options ``given`` (flag name -> value): for
    KKanji its split options that were set (left out: KKanji's defaults); none otherwise."""
    if dataset != "kkanji":
        return {}
    options = {key: given.get(flag) for flag, key in KKANJI_OPTIONS.items()}
    return {k: v for k, v in options.items() if v is not None}
