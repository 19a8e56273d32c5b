"""The metadata of a model file, checked as untrusted input: every key against a schema whose
bounds come from the catalog (the dataset's image size, channels and class count) and from the
architecture (the weights' names, shapes and dtypes, learnt from the model built on torch's
``meta`` device, which allocates nothing), and covered by a sha256 of its canonical JSON.

:func:`check_meta` runs before anything is built, so a file that claims a million classes or a
60,000-pixel image is one :class:`~kmnist_torch.errors.ModelFileError`, not gigabytes
allocated; :func:`check_weights` then compares the weights with what the metadata's model
holds before a byte of them is hashed or copied.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from .. import catalog
from ..errors import ModelFileError
from .registry import create_model, list_models

__all__ = [
    "FORMAT",
    "KEYS",
    "MAX_CLASS_CHARS",
    "check_meta",
    "check_weights",
    "expected_weights",
    "meta_sha256",
]

FORMAT = "kmnist_torch.model/1"
MODEL_ARGS = ("num_classes", "in_chans", "img_size")
METRICS = ("epoch", "test_accuracy", "test_balanced_accuracy", "test_loss")
DATA_KEYS = ("limit_train", "limit_test", "options")
MAX_CLASS_CHARS = 16  # a class name: one character (a codepoint's name at most)
MAX_TEXT = 200  # any other string in the metadata
MAX_ITEMS = 64  # entries of the recipe, the data options, the versions
MAX_LIMIT = 10**7  # --limit-train/--limit-test: above every split of the catalog
MAX_INT = 2**31 - 1  # any other integer (a recipe's, a seed)


class _Bad(Exception):
    """One thing wrong with the metadata, in words (turned into a ModelFileError)."""


def _str(value: Any, what: str, most: int = MAX_TEXT, none: bool = False) -> None:
    if value is None and none:
        return
    if not isinstance(value, str) or not value or len(value) > most:
        raise _Bad(f"{what} {_show(value)} (expected a string of 1 to {most} characters)")


def _int(value: Any, what: str, low: int, high: int, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Bad(f"{what} {_show(value)} (expected an integer from {low:,} to {high:,})")


def _show(value: Any) -> str:
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return "a very large integer"
    text = repr(value) if isinstance(value, (int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):  # bool too
        return -(2**63) <= value < 2**63
    return value is None or isinstance(value, str) and len(value) <= MAX_TEXT


def _flat_dict(value: Any, what: str, lists: bool = False) -> dict[str, Any]:
    """A dict of at most :data:`MAX_ITEMS` short string keys and plain values (with
    ``lists``: also short lists or tuples of numbers)."""
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise _Bad(f"{what} {_show(value)} (expected a mapping of at most {MAX_ITEMS} entries)")
    for key, item in value.items():
        _str(key, f"{what} key", 64)
        seq = lists and isinstance(item, (list, tuple)) and len(item) <= MAX_ITEMS
        if not (_scalar(item) or seq and all(_scalar(x) and not isinstance(x, str) for x in item)):
            raise _Bad(f"{what}[{key!r}] {_show(item)} (expected a number, a string or null)")
    return value


def _names(value: Any, what: str, n: int, most: int, none: bool = False) -> None:
    if not isinstance(value, list) or len(value) != n:
        size = len(value) if isinstance(value, list) else _show(value)
        raise _Bad(f"{what}: {size} entries for {n} classes")
    for k, item in enumerate(value):
        _str(item, f"{what}[{k}]", most, none)


def _model_args(meta: dict[str, Any], info: catalog.DatasetInfo) -> tuple[int, int, int]:
    args = meta["model_args"]
    if not isinstance(args, dict) or set(args) != set(MODEL_ARGS):
        raise _Bad(f"model_args {_show(args)} (expected exactly {', '.join(MODEL_ARGS)})")
    # Bounds from the catalog: the dataset's classes, its (grayscale, square) image sizes (the
    # published one; KKanji's smaller ones too).
    _int(args["num_classes"], "num_classes", 1, info.num_classes)
    _int(args["in_chans"], "in_chans", 1, 1)
    sizes = info.sizes
    _int(args["img_size"], f"img_size for {info.name}", min(sizes), max(sizes))
    if args["img_size"] not in sizes:
        raise _Bad(
            f"img_size for {info.name} {args['img_size']} (expected one of "
            f"{', '.join(map(str, sizes))})"
        )
    n, c, s = args["num_classes"], args["in_chans"], args["img_size"]
    for key, want in (("image_size", s), ("channels", c), ("num_classes", n)):
        if type(meta[key]) is not int or meta[key] != want:
            raise _Bad(f"{key} {_show(meta[key])} but model_args says {want}")
    size = meta["input_size"]
    if type(size) is not list or not all(type(x) is int for x in size) or size != [c, s, s]:
        raise _Bad(f"input_size {_show(meta['input_size'])} (expected [{c}, {s}, {s}])")
    return n, c, s


def _data(value: Any) -> None:
    if not isinstance(value, dict):
        raise _Bad(f"data {_show(value)} (expected a mapping)")
    if not set(value) <= set(DATA_KEYS):
        raise _Bad(f"data keys {sorted(value)} (expected some of {', '.join(DATA_KEYS)})")
    for key in ("limit_train", "limit_test"):
        _int(value.get(key), f"data[{key!r}]", 0, MAX_LIMIT, none=True)
    if value.get("options") is not None:
        _flat_dict(value["options"], "data['options']")


def _metrics(value: Any) -> None:
    _flat_dict(value, "metrics")
    for key, item in value.items():
        if key not in METRICS:
            raise _Bad(f"metrics key {key!r} (expected some of {', '.join(METRICS)})")
        if key == "epoch":
            _int(item, "metrics['epoch']", 0, MAX_INT)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise _Bad(f"metrics[{key!r}] {_show(item)} (expected a finite number)")


def _recipe(value: Any) -> None:
    if value is None:
        return
    _flat_dict(value, "recipe", lists=True)
    if "eval_batch_size" in value:  # what evaluate batches by
        _int(value["eval_batch_size"], "recipe['eval_batch_size']", 1, MAX_INT)
    for key in ("amp", "channels_last"):
        if not isinstance(value.get(key, False), bool):
            raise _Bad(f"recipe[{key!r}] {_show(value[key])} (expected true or false)")


_CHECKS: dict[str, Callable[[Any], None]] = {
    "recipe_name": lambda v: _str(v, "recipe_name", 64, none=True),
    "recipe": _recipe,
    "data": _data,
    "metrics": _metrics,
    "input": lambda v: _str(v, "input"),
    "versions": lambda v: _flat_dict(v, "versions"),
    "image_size": lambda v: None,  # compared with model_args
    "channels": lambda v: None,
    "num_classes": lambda v: None,
    "input_size": lambda v: None,
}
# Every key a model file's metadata holds (what model_meta writes): all of them, no other.
KEYS = ("format", "arch", "model_args", "dataset", "classes", "codepoints", "romaji", *_CHECKS)


def _check(meta: Any) -> None:
    if not isinstance(meta, dict):
        raise _Bad(f"metadata is {_show(meta)}, not a mapping")
    missing = [k for k in KEYS if k not in meta]  # a dict's keys: hashed, never compared
    unknown = [
        k if type(k) is str else _show(k) for k in meta if type(k) is not str or k not in KEYS
    ]
    if missing or unknown:
        raise _Bad(f"metadata keys: missing {missing}, unknown {unknown}")
    if type(meta["format"]) is not str or meta["format"] != FORMAT:
        raise _Bad(f"format {_show(meta['format'])} (expected {FORMAT!r})")
    if type(meta["arch"]) is not str or meta["arch"] not in list_models():
        raise _Bad(f"arch {_show(meta['arch'])} (expected one of {', '.join(list_models())})")
    if type(meta["dataset"]) is not str or meta["dataset"] not in catalog.DATASETS:
        raise _Bad(
            f"dataset {_show(meta['dataset'])} (expected one of {', '.join(catalog.DATASETS)})"
        )
    n, _, _ = _model_args(meta, catalog.DATASETS[meta["dataset"]])
    _names(meta["classes"], "classes", n, MAX_CLASS_CHARS)
    _names(meta["codepoints"], "codepoints", n, MAX_CLASS_CHARS)
    _names(meta["romaji"], "romaji", n, 32, none=True)
    for key, check in _CHECKS.items():
        check(meta[key])


def check_meta(meta: Any, file: str | Path) -> dict[str, Any]:
    """``meta`` when it is the metadata of a model this package can build, checked whole:
    exactly the keys :func:`~kmnist_torch.models.modelfile.model_meta` writes, each of the
    expected type; the architecture one of :func:`~kmnist_torch.models.registry.list_models`;
    the dataset one of the catalog, the class count at most its classes, the image size one
    of its sizes (``catalog.DatasetInfo.sizes``) and one channel; ``classes``, ``codepoints``
    and ``romaji`` one short entry per class; the recipe, the data options, the metrics and
    the versions short mappings of plain values.

    Raises:
        ModelFileError: naming ``file`` and the first value that is wrong.
    """
    try:
        _check(meta)
    except _Bad as exc:
        raise ModelFileError(
            f"{file}: {exc}; the file is damaged, was edited, or was not written by kmnist_torch"
        ) from None
    return meta


def meta_sha256(meta: dict[str, Any]) -> str:
    """A sha256 of the metadata's canonical JSON (keys sorted, tuples as lists): what a model
    file records so that a changed class name or image size is caught like a changed weight."""
    text = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def expected_weights(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the metadata's model holds, from the model built
    on torch's ``meta`` device (no memory for its weights is allocated)."""
    with torch.device("meta"):
        model = create_model(meta["arch"], **meta["model_args"])
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_weights(weights: Any, meta: dict[str, Any], file: str | Path) -> None:
    """Refuse weights that are not exactly the tensors of the metadata's model: the same names,
    shapes and dtypes, each dense over storage of its own size (so a tensor that claims a huge
    shape over a few bytes never gets hashed, copied or loaded).

    Raises:
        ModelFileError: naming ``file`` and the first tensor that differs.
    """
    want = expected_weights(meta)
    problem = None
    if not isinstance(weights, dict) or set(weights) != set(want):
        got = sorted(map(str, weights))[:3] if isinstance(weights, dict) else _show(weights)
        problem = f"weights named {got}... are not those of {meta['arch']}"
    else:
        for name, (shape, dtype) in want.items():
            t = weights[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                problem = f"weight {name!r} is not a {dtype} tensor of shape {list(shape)}"
                break
            needed = (t.storage_offset() + t.numel()) * t.element_size()
            if not t.is_contiguous() or t.untyped_storage().nbytes() < needed:
                problem = f"weight {name!r} is not stored densely in the file"
                break
    if problem:
        raise ModelFileError(
            f"{file}: {problem}; the file is damaged, was edited, or was not written by "
            "kmnist_torch"
        )
