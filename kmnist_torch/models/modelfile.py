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
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ModelFileError

__all__ = [
    "FORMAT",
    "INPUT_CONVENTION",
    "MODEL",
    "find_model_file",
    "load_model",
    "model_meta",
    "save_model",
]

MODEL = "model.pt"
FORMAT = "kmnist_torch.model/1"
# What the loaders feed the model: TensorLoader scales uint8 to [0, 1] and does no more.
INPUT_CONVENTION = "white ink on black, float in [0,1], N x C x H x W"
_METRICS = ("epoch", "test_accuracy", "test_balanced_accuracy", "test_loss")


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
    (the last epoch's test scores) in ``meta["metrics"]``."""
    meta = {**meta, "metrics": {k: metrics[k] for k in _METRICS if k in (metrics or {})}}
    weights = _plain_state(model)
    payload = {
        "format": FORMAT,
        "meta": meta,
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


def _safe_sha(weights: Any) -> str | None:
    try:
        return weights_sha256(weights)
    except (AttributeError, TypeError, RuntimeError):  # not a dict of tensors
        return None


# Bounds on what a model file may claim, so an edited one cannot make us allocate without end.
MAX_IMAGE_SIZE = 1024
MAX_CHANNELS = 4


def _check_meta(meta: Any, file: Path) -> None:
    """Refuse metadata that cannot describe a model of ours: before anything is built."""
    problem = None
    if not isinstance(meta, dict) or not {"arch", "model_args", "classes"} <= meta.keys():
        problem = "no metadata (arch, model_args, classes)"
    else:
        args, classes = meta["model_args"], meta["classes"]
        ok = isinstance(args, dict) and isinstance(classes, list)
        size, chans = (args.get("img_size"), args.get("in_chans", 1)) if ok else (None, None)
        if not ok:
            problem = "malformed metadata"
        elif args.get("num_classes") != len(classes):
            problem = f"{args.get('num_classes')} classes in model_args, {len(classes)} named"
        elif not (isinstance(size, int) and 8 <= size <= MAX_IMAGE_SIZE):
            problem = f"image size {size!r} (expected 8 to {MAX_IMAGE_SIZE})"
        elif not (isinstance(chans, int) and 1 <= chans <= MAX_CHANNELS):
            problem = f"{chans!r} input channels (expected 1 to {MAX_CHANNELS})"
    if problem:
        raise ModelFileError(f"{file}: {problem}; the file is damaged or was edited")


def find_model_file(path: str | os.PathLike) -> Path:
    """The file :func:`load_model` reads for ``path``: a run folder's ``model.pt`` (its
    ``checkpoint.pt`` when it has none), or the file named."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL, "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no {MODEL} or checkpoint.pt: is it a run folder?")
    if not path.is_file():
        raise FileNotFoundError(f"no such model file or run folder: {path}")
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A trained model, ready to predict.

    Args:
        path: a run folder, its ``model.pt``, or a ``checkpoint.pt`` (its weights as they
            stand, optimiser state ignored).
        device: where the model goes.

    Returns:
        The model in eval mode, with the file's metadata as ``.meta`` (``classes``,
        ``codepoints``, ``romaji``, ``input``, ``image_size``, ``metrics`` ...). It takes
        float32 N x C x H x W images, white ink on black, in [0, 1], and returns logits.
    """
    from .registry import create_model

    file = find_model_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, foreign: any failure to read it
        # torch's own message may advise weights_only=False (running the file's code): not
        # advice to pass on for a file that failed to load.
        raise ModelFileError(
            f"{file} is damaged or not a model file (reading it failed: {type(exc).__name__}); "
            "train the run again, or restore the file from a copy"
        ) from exc
    if not isinstance(state, dict) or not ("state_dict" in state or "model" in state):
        raise ModelFileError(f"{file} is not a kmnist_torch model file or checkpoint")
    if "state_dict" in state:
        meta, weights = state.get("meta"), state["state_dict"]
        if "weights_sha256" not in state:
            raise ModelFileError(
                f"{file} records no sha256 of its weights: it is not a model file a "
                "kmnist_torch run wrote"
            )
        if _safe_sha(weights) != state["weights_sha256"]:
            raise ModelFileError(
                f"{file}: its weights differ from those the run wrote (sha256 mismatch): the "
                "file is damaged or was edited; train the run again, or restore it from a copy"
            )
    else:  # a checkpoint: the model's metadata is saved beside the run's state
        meta, weights = state.get("model_meta"), state["model"]
        if meta is None:
            raise ModelFileError(
                f"{file} is the checkpoint of a run that kept no model metadata (and wrote no "
                f"{MODEL}): it names no model to build"
            )
    _check_meta(meta, file)
    try:
        model = create_model(meta["arch"], **meta["model_args"])
        model.load_state_dict(weights)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelFileError(
            f"{file}: its weights do not fit the model its metadata names "
            f"({str(exc).splitlines()[0][:200]}); the file is damaged or was edited"
        ) from exc
    model.meta = {**meta, "file": str(file)}
    return model.to(device).eval()
