"""The dataset registry: one table from name to class, which the CLI, the trainer, the harness,
the results table and the verifier all read. The catalog says what each dataset is (titles,
files, counts); this table binds its name to the class that loads it and says how to call it.

Adding a dataset: its module (the class), its catalog entry, and one row in :data:`DATASETS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .. import catalog
from .base import ImageDataset
from .kkanji.dataset import KKanji
from .mnist import K49, KMNIST, MNIST


@dataclass(frozen=True)
class Option:
    """A dataset's own argument, offered by the trainer as a flag of the same name."""

    argument: str  # the class's keyword argument
    type: type
    help: str
    choices: tuple | None = None  # the values the class takes, where they are a short list


@dataclass(frozen=True)
class Entry:
    """How to build one dataset and how the commands present it."""

    cls: type[ImageDataset]
    label: str  # short title, the results table's column
    # The keyword that picks the split: "train" (``train=True/False``, the official split) or
    # "split" (``split="train"|"test"|"all"``: a dataset without an official split).
    split_keyword: str = "train"
    # Upstream reports balanced accuracy (mean per-class recall) for imbalanced datasets.
    balanced: bool = False
    # The dataset's own arguments, by flag name (``--split-seed`` -> ``split_seed``).
    options: dict[str, Option] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The score the results table reports: ``"balanced_accuracy"`` or ``"accuracy"``."""
        return "balanced_accuracy" if self.balanced else "accuracy"

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits the class takes."""
        return ("all", "train", "test") if self.split_keyword == "split" else ("train", "test")


_KKANJI_OPTIONS = {
    "test_fraction": Option("test_fraction", float, "KKanji's test_fraction"),
    "min_per_class": Option("min_per_class", int, "KKanji's min_per_class"),
    "shots": Option("shots", int, "KKanji's shots"),
    "split_seed": Option("seed", int, "seed of the train/test split (independent of --seed)"),
    "image_size": Option(
        "image_size",
        int,
        "KKanji's image_size: 64 (as published), or 32 or 16 by exact 2x2 means (the split is "
        "the 64x64 one's)",
        catalog.KKANJI.sizes,
    ),
}

# name -> entry: the one place a dataset name is bound to its class. The order is the results
# table's (upstream's columns, then our extension).
DATASETS: dict[str, Entry] = {
    "mnist": Entry(MNIST, "MNIST"),
    "kmnist": Entry(KMNIST, "KMNIST"),
    "k49": Entry(K49, "K49", balanced=True),
    "kkanji": Entry(KKanji, "KKanji", "split", balanced=True, options=_KKANJI_OPTIONS),
}


def list_datasets() -> list[str]:
    """The names :func:`create_dataset` accepts: every dataset of the catalog."""
    return list(catalog.DATASETS)


def entry(name: str) -> Entry:
    """The registry's entry for ``name`` (any spelling :func:`kmnist_torch.catalog.get`
    accepts).

    Args:
        name: a dataset name or title.

    Returns:
        The :class:`Entry`; a ``KeyError`` naming the datasets there are for an unknown name.
    """
    return DATASETS[catalog.get(name).name]


def dataset_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The dataset's own arguments among a run's options.

    Args:
        name: the dataset.
        given: option name -> value (a run's flags, or its saved config); None means unset.

    Returns:
        Class argument -> value for each of the dataset's :attr:`Entry.options` that is set
        (left out: the class's defaults); empty for a dataset with no options of its own.
    """
    options = entry(name).options
    return {o.argument: given[k] for k, o in options.items() if given.get(k) is not None}


def create_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    split: str | None = None,
    **kwargs: Any,
) -> ImageDataset:
    """Build a dataset by name, as ``timm.create_model`` builds a model.

    Args:
        name: ``"kmnist"``, ``"k49"``, ``"kkanji"`` or ``"mnist"`` (see :func:`list_datasets`;
            case, ``-`` and ``_`` do not matter, and the full titles work too).
        root: data folder; None means ``$KMNIST_TORCH_ROOT`` or ``~/.cache/kmnist_torch``.
        train: the training split (True) or the test split (False); ignored when ``split``
            is given.
        split: the split by name: ``"train"`` or ``"test"``, and ``"all"`` for KKanji (which
            has no official split). None follows ``train``.
        **kwargs: passed on to the class (``download``, ``verify``, ``transform``,
            ``format``, KKanji's ``test_fraction``/``seed``/``min_per_class``/``shots``/
            ``image_size`` ...).

    Returns:
        The dataset, with ``data``, ``targets`` and ``classes``.
    """
    e = entry(name)  # KeyError naming the datasets there are
    if split is None:
        split = "train" if train else "test"
    if e.split_keyword == "split":  # the class checks the name
        return e.cls(root, split=split, **kwargs)
    if split not in e.splits:
        raise ValueError(
            f"{catalog.get(name).name} has the splits {', '.join(e.splits)}, not {split!r}"
        )
    return e.cls(root, train=split == "train", **kwargs)
