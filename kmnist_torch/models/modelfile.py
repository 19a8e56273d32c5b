"""A run's model file, ``model.pt``: the trained weights (no optimiser state) with everything a
user needs to use them: how to build the model, what the classes are, what the input must look
like, how it was trained and how well it scored. Plain tensors, strings and numbers, so
``torch.load(path, weights_only=True)`` reads it.

:func:`load_model` turns a run folder, a ``model.pt`` or a ``checkpoint.pt`` back into a model
in eval mode, with the metadata as its ``.meta``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import torch
from torch import nn

from .._io import atomic_write, input_problem, open_regular
from ..errors import ModelFileError, UncheckedContentWarning
from .metadata import FORMAT, METRICS, check_meta, check_weights, meta_sha256

__all__ = [
    "INPUT_CONVENTION",
    "MODEL",
    "find_model_file",
    "load_model",
    "model_meta",
    "save_model",
]

MODEL = "model.pt"
# What the loaders feed the model: TensorLoader scales uint8 to [0, 1] and does no more.
INPUT_CONVENTION = "white ink on black, float in [0,1], N x C x H x W"
# Bounds on a model file, checked before torch reads it: its size (a checkpoint of preact18 at
# KKanji's 3,832 classes, with Adadelta's state, is about 160 MB), the zip directory torch reads
# first, and the pickle holding the metadata (the weights themselves are memory-mapped).
MAX_FILE_BYTES = 1 << 30
MAX_ENTRIES = 4096
MAX_DIRECTORY_BYTES = 1 << 20
MAX_PICKLE_BYTES = 8 << 20


def codepoint(char: str) -> str:
    """``"U+304A"`` for a one-character class name; the name itself otherwise."""
    return f"U+{ord(char):04X}" if len(char) == 1 else char


def model_meta(
    arch: str,
    model_args: dict[str, Any],
    dataset: str,
    classes: Sequence[str],
    codepoints: Sequence[str] | None = None,
    romaji: Sequence[str | None] | None = None,
    recipe_name: str | None = None,
    recipe: Any = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of a model file, less its test metrics (added by :func:`save_model`).

    Args:
        arch: the :func:`kmnist_torch.models.registry.create_model` name.
        model_args: the rest of its arguments (``num_classes``, ``in_chans``, ``img_size``).
        dataset: the dataset it was trained on.
        classes: the characters, in class-index order.
        codepoints: ``"U+XXXX"`` per class (None: computed from ``classes``).
        romaji: the reading per class (None where there is none, as for kanji).
        recipe_name: the recipe's name in :data:`kmnist_torch.training.recipes.RECIPES`.
        recipe: the :class:`~kmnist_torch.training.recipes.Recipe` (or its dict) it was
            trained with.
        data: how the training and test images were chosen (limits, split options).

    Returns:
        A dict of plain values (loadable with ``weights_only=True``).
    """
    from .. import __version__

    classes = list(classes)
    if dataclasses.is_dataclass(recipe):
        recipe = dataclasses.asdict(recipe)
    channels, size = int(model_args.get("in_chans", 1)), int(model_args.get("img_size", 28))
    return {
        "format": FORMAT,
        "arch": arch,
        "model_args": dict(model_args),
        "dataset": dataset,
        "num_classes": len(classes),
        "classes": classes,
        "codepoints": list(codepoints) if codepoints else [codepoint(c) for c in classes],
        "romaji": list(romaji) if romaji else [None] * len(classes),
        "image_size": size,
        "channels": channels,
        "input_size": [channels, size, size],  # timm's name for C x H x W
        "input": INPUT_CONVENTION,
        "recipe_name": recipe_name,
        "recipe": recipe,
        "data": dict(data or {}),
        "metrics": {},
        "versions": {"torch": str(torch.__version__), "kmnist_torch": __version__},
    }


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    meta: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write ``model.pt`` atomically: the weights on the CPU and ``meta``, with ``metrics``
    (the last epoch's test scores) in ``meta["metrics"]``, each with its sha256
    (:func:`weights_sha256`, :func:`~kmnist_torch.models.metadata.meta_sha256`)."""
    meta = {**meta, "metrics": {k: metrics[k] for k in METRICS if k in (metrics or {})}}
    weights = _plain_state(model)
    payload = {
        "format": FORMAT,
        "meta": meta,
        "meta_sha256": meta_sha256(meta),
        "state_dict": weights,
        "weights_sha256": weights_sha256(weights),
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A sha256 of every tensor's name, dtype, shape and bytes: what tells a model file whose
    weights changed after it was written (bit rot, an edit) from the one the run wrote."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def find_model_file(path: str | os.PathLike) -> Path:
    """The file :func:`load_model` reads for ``path``: a run folder's ``model.pt`` (its
    ``checkpoint.pt`` when it has none), or the file named. Only a regular file is taken (a
    FIFO or a device in its place is never opened)."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL, "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no {MODEL} or checkpoint.pt: is it a run folder?")
    problem = input_problem(path)
    if problem == "no such file":
        raise FileNotFoundError(f"no such model file or run folder: {path}")
    if problem:
        raise ModelFileError(f"{path}: {problem}; name a model.pt, a checkpoint.pt or a run folder")
    return path


def _damaged(file: Path, why: str) -> ModelFileError:
    return ModelFileError(
        f"{file} is damaged or not a model file ({why}); train the run again, or restore the "
        "file from a copy"
    )


def _directory_size(fh: BinaryIO, size: int) -> tuple[int, int]:
    """(entries, bytes) of a zip's central directory as its end records claim them (the
    zip64 record too, which readers prefer), read from the file's last 64 KiB."""
    tail_len = min(size, (1 << 16) + 22)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) - end < 22:
        raise ValueError("no zip directory")
    entries, nbytes = struct.unpack("<HI", tail[end + 10 : end + 16])
    locator = end - 20
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        (offset,) = struct.unpack("<Q", tail[locator + 8 : locator + 16])
        fh.seek(min(offset, size))
        record = fh.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            raise ValueError("a broken zip64 directory record")
        more, more_bytes = struct.unpack("<QQ", record[32:48])
        entries, nbytes = max(entries, more), max(nbytes, more_bytes)
    return entries, nbytes


def check_archive(file: Path) -> None:
    """Refuse a file torch should not be given, from its size and zip directory alone: over
    :data:`MAX_FILE_BYTES`; not a zip (torch's format since 1.6); a directory of more than
    :data:`MAX_ENTRIES` entries or :data:`MAX_DIRECTORY_BYTES`; a compressed entry (torch
    stores, so no entry can inflate); a pickle over :data:`MAX_PICKLE_BYTES`.

    Raises:
        ModelFileError: naming ``file`` and what is wrong.
    """
    problem = input_problem(file, MAX_FILE_BYTES)
    if problem:
        raise ModelFileError(f"{file}: {problem} for a model file")
    try:
        with open_regular(file) as fh:
            size = os.fstat(fh.fileno()).st_size
            entries, nbytes = _directory_size(fh, size)
            if entries > MAX_ENTRIES or nbytes > min(MAX_DIRECTORY_BYTES, size):
                raise ValueError(f"a zip directory of {entries:,} entries, {nbytes:,} bytes")
            fh.seek(0)
            with zipfile.ZipFile(fh) as archive:
                infos = archive.infolist()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, struct.error) as exc:
        raise _damaged(file, str(exc)[:120] or type(exc).__name__) from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
            raise _damaged(file, f"{info.filename[:60]!r} is compressed or larger than the file")
        if info.filename.endswith(".pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise _damaged(file, f"a pickle of {info.file_size:,} bytes")


def _read(file: Path) -> dict[str, Any]:
    """The file's top-level dict, weights memory-mapped (not read) and nothing built."""
    check_archive(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, empty, foreign: any failure to read it
        # torch's own message may advise weights_only=False (running the file's code): not
        # advice to pass on for a file that failed to load.
        raise _damaged(file, f"reading it failed: {type(exc).__name__}") from None
    if not isinstance(state, dict) or not ("state_dict" in state or "model" in state):
        raise ModelFileError(f"{file} is not a kmnist_torch model file or checkpoint")
    return state


def _same_text(recorded: Any, computed: str) -> bool:
    return type(recorded) is str and recorded == computed  # never compares a tensor


def _checked_model_file(state: dict[str, Any], file: Path) -> tuple[dict, Any]:
    """A ``model.pt``'s metadata and weights, each checked whole and against its sha256."""
    if "weights_sha256" not in state:
        raise ModelFileError(
            f"{file} records no sha256 of its weights: it is not a model file a "
            "kmnist_torch run wrote"
        )
    meta, weights = check_meta(state.get("meta"), file), state["state_dict"]
    if "meta_sha256" not in state:
        warnings.warn(
            f"{file} was written before model files recorded a sha256 of their metadata: its "
            "metadata was checked against the schema only",
            UncheckedContentWarning,
            stacklevel=3,
        )
    elif not _same_text(state["meta_sha256"], meta_sha256(meta)):
        raise ModelFileError(
            f"{file}: its metadata differs from what the run wrote (sha256 mismatch): the file "
            "is damaged or was edited; train the run again, or restore it from a copy"
        )
    check_weights(weights, meta, file)
    if not _same_text(state["weights_sha256"], weights_sha256(weights)):
        raise ModelFileError(
            f"{file}: its weights differ from those the run wrote (sha256 mismatch): the "
            "file is damaged or was edited; train the run again, or restore it from a copy"
        )
    return meta, weights


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A trained model, ready to predict.

    Everything in the file is checked before anything is built: its size and zip directory
    (:func:`check_archive`), the whole metadata against the schema and its sha256
    (:func:`~kmnist_torch.models.metadata.check_meta`), the weights' names, shapes and dtypes
    against the model the metadata names, then their sha256. A checkpoint records no sha256:
    its metadata and weights get the schema and shape checks.

    Args:
        path: a run folder, its ``model.pt``, or a ``checkpoint.pt`` (its weights as they
            stand, optimiser state ignored).
        device: where the model goes.

    Returns:
        The model in eval mode, with the file's metadata as ``.meta`` (``classes``,
        ``codepoints``, ``romaji``, ``input``, ``image_size``, ``metrics`` ...). It takes
        float32 N x C x H x W images, white ink on black, in [0, 1], and returns logits.

    Raises:
        ModelFileError: the file is damaged, foreign, or its metadata or weights are not what
            a run writes (one line naming the file and the problem).
    """
    from .registry import create_model

    file = find_model_file(path)
    state = _read(file)
    if "state_dict" in state:
        meta, weights = _checked_model_file(state, file)
    else:  # a checkpoint: the model's metadata is saved beside the run's state
        meta, weights = state.get("model_meta"), state["model"]
        if meta is None:
            raise ModelFileError(
                f"{file} is the checkpoint of a run that kept no model metadata (and wrote no "
                f"{MODEL}): it names no model to build"
            )
        check_meta(meta, file)
        check_weights(weights, meta, file)
    model = create_model(meta["arch"], **meta["model_args"])
    model.load_state_dict(weights)
    model.meta = {**meta, "file": str(file)}
    return model.to(device).eval()
