"""The dataset registry: one table from name to class, which the CLI, the trainer, the harness,
the results table and the verifier all read."""

from __future__ import annotations

import os
from typing import Any

from .. import catalog
from .base import ImageDataset
from .kkanji.dataset import KKanji
from .mnist import K49, KMNIST, MNIST

# name -> class: the one place a dataset name is bound to its class.
DATASETS: dict[str, type[ImageDataset]] = {
    "mnist": MNIST,
    "kmnist": KMNIST,
    "k49": K49,
    "kkanji": KKanji,
}
# Datasets without an official split take ``split=`` ("train", "test", "all") instead of
# ``train=``.
SPLIT_KEYWORD = {"kkanji"}


def list_datasets() -> list[str]:
    """The names :func:`create_dataset` accepts: every dataset of the catalog."""
    return list(catalog.DATASETS)


def create_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    **kwargs: Any,
) -> ImageDataset:
    """Build a dataset by name, as ``timm.create_model`` builds a model.

    Args:
        name: ``"kmnist"``, ``"k49"``, ``"kkanji"`` or ``"mnist"`` (see :func:`list_datasets`;
            case, ``-`` and ``_`` do not matter, and the full titles work too).
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        train: the training split (True) or the test split (False). KKanji takes ``split=``
            (``"train"``, ``"test"`` or ``"all"``) instead; when ``split`` is not given it
            follows ``train``.
        **kwargs: passed on to the class (``download``, ``verify``, ``transform``,
            ``format``, KKanji's ``test_fraction``/``seed``/``min_per_class``/``shots`` ...).

    Returns:
        The dataset, with ``data``, ``targets`` and ``classes``.
    """
    info = catalog.get(name)  # KeyError naming the datasets there are
    cls = DATASETS[info.name]
    if info.name in SPLIT_KEYWORD:
        kwargs.setdefault("split", "train" if train else "test")
        return cls(root, **kwargs)
    return cls(root, train=train, **kwargs)
