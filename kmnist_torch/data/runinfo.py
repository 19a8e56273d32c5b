"""A run folder read as untrusted input: its ``results.json`` (bounded, parsed strictly, every
value ``evaluate`` and ``export`` use checked for its type and range), and what the run's
record may and may not decide. The record says which images the run tested on (its limits, the
dataset's options); it never turns a check off (``verify``) and never sends a download to a
folder the user did not name (``root``): only the command line does those.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .._io import read_regular
from ..download.sources import resolve_root
from ..errors import RunFolderError
from .registry import entry

__all__ = ["MAX_RESULTS_BYTES", "data_root", "dataset_arguments", "read_results", "split_limit"]

RESULTS = "results.json"
MAX_RESULTS_BYTES = 8 << 20  # a 1,000-epoch run writes about 0.6 MB
MAX_LIMIT = 10**7


def _fail(path: Path, what: str) -> RunFolderError:
    return RunFolderError(
        f"{path}: {what}; the run folder is damaged or was edited (train the run again, or "
        "restore results.json from a copy)"
    )


def _number(value: Any, low: float, high: float) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value) and low <= value <= high


def _check_config(config: Any, path: Path) -> None:
    if not isinstance(config, dict):
        raise _fail(path, f"'config' is a {type(config).__name__}, not an object")
    for key in ("limit_train", "limit_test"):
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and _number(value, 0, MAX_LIMIT)):
            raise _fail(path, f"config {key!r} is {value!r:.40}, not a count of images")
    for key in ("root", "dataset"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= 4096):
            raise _fail(path, f"config {key!r} is {value!r:.40}, not a path or a name")
    if not isinstance(config.get("verify", True), bool):
        raise _fail(path, f"config 'verify' is {config['verify']!r:.40}, not true or false")


def check_results(doc: Any, path: Path) -> dict[str, Any]:
    """``doc`` when it has the shape of a ``results.json`` the trainer writes, as far as the
    commands read it: an object; ``config`` an object whose limits are integers, ``root`` and
    ``dataset`` strings, ``verify`` a boolean; the test scores numbers from 0 to 1 (the loss
    any finite number); ``epochs`` a list of objects.

    Raises:
        RunFolderError: naming ``path`` and the first value that is wrong.
    """
    if not isinstance(doc, dict):
        raise _fail(path, f"a JSON {type(doc).__name__}, not an object")
    _check_config(doc.get("config", {}), path)
    for key, high in (("test_accuracy", 1), ("test_balanced_accuracy", 1), ("test_loss", 1e30)):
        value = doc.get(key)
        if value is not None and not _number(value, 0, high):
            raise _fail(path, f"{key!r} is {value!r:.40}, not a number from 0 to {high:g}")
    epochs = doc.get("epochs", [])
    if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
        raise _fail(path, "'epochs' is not a list of objects")
    return doc


def read_results(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``results.json`` in a run folder, checked (:func:`check_results`); empty where the
    folder has none. Only a regular file of at most :data:`MAX_RESULTS_BYTES` is read (a FIFO
    or a device is refused without being opened).

    Raises:
        RunFolderError: the file is not a regular file, too large, not UTF-8 JSON, or malformed.
    """
    path = Path(folder) / RESULTS
    if not os.path.lexists(path):
        return {}
    data = read_regular(path, MAX_RESULTS_BYTES, RunFolderError)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"not valid JSON ({str(exc)[:80]})") from None
    return check_results(doc, path)


def split_limit(meta: dict[str, Any], config: dict[str, Any], split: str) -> int | None:
    """The run's ``--limit-test`` (or ``--limit-train``): from the model's metadata (covered by
    its sha256), else from ``results.json``'s config (a checkpoint of an older run)."""
    key = "limit_test" if split == "test" else "limit_train"
    data = meta.get("data") or {}
    return data[key] if key in data else config.get(key)


def dataset_arguments(name: str, options: Any, source: str) -> dict[str, Any]:
    """The dataset's own arguments as a run recorded them (KKanji's ``test_fraction``,
    ``min_per_class``, ``shots``, ``seed``), each checked for its name and type.

    Args:
        name: the dataset.
        options: class argument -> value, from the model's metadata.
        source: the file they came from, for the error.

    Raises:
        RunFolderError: an argument the dataset does not take, or a value of the wrong type.
    """
    known = {o.argument: o.type for o in entry(name).options.values()}
    if not isinstance(options, dict):
        raise RunFolderError(f"{source}: the {name} options are not a mapping")
    for key, value in options.items():
        kind = known.get(key)
        if kind is float:
            good = _number(value, -1e30, 1e30)
        else:
            good = kind is int and isinstance(value, int) and _number(value, -(2**63), 2**63)
        if key not in known or not good and value is not None:
            raise RunFolderError(
                f"{source}: {key}={value!r:.40} is not an option {name} takes "
                f"({', '.join(f'{k} ({t.__name__})' for k, t in known.items()) or 'none'})"
            )
    return dict(options)


def data_root(root: str | None, download: bool, config: dict[str, Any]) -> tuple[Any, bool]:
    """Where a run's images are read from, and whether missing files may be fetched there.

    The ``--root`` the user gave, with their ``--download``. Else the folder the run's
    ``results.json`` names, read only: a download never goes to a folder the user did not name,
    unless it is their own default data folder. Else (no folder recorded, or none there any
    more) the default data folder, with the user's ``--download``.

    Returns:
        ``(root, download)`` for :func:`kmnist_torch.data.splits.load_split`.
    """
    if root is not None:
        return root, download
    recorded = config.get("root")
    if recorded is None:
        return None, download
    if Path(recorded).expanduser().resolve() == resolve_root(None).resolve():
        return None, download
    if Path(recorded).is_dir():
        return recorded, False
    return None, download
