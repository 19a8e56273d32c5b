"""Read characters from image files with a trained model.

    python -m kmnist_torch.predict runs/kmnist-cnn-simple_cnn-none-seed0 scan1.png scan2.jpg

Any size and mode: each image is made grayscale (transparency over white paper), padded to a
square with its background, brought to the model's size (by exact 2x2 means when its side is
the model's times a power of two, as ``KKanji(image_size=32)`` makes its images from the
64x64 ones; bilinear otherwise), and inverted when it is dark ink on
light paper (the models see white ink on black, as the datasets store it). Whether to invert is
decided from the median of the image's border (light border: invert); ``--invert yes|no``
overrides. ``--json`` prints one object per image, the best guess first.

Every image is untrusted input: only a regular file is opened (a FIFO or a device named among
the images is refused without being opened, and the images after it still get answers), its
size and its header are checked before a pixel is decoded (:data:`MAX_FILE_BYTES`,
:data:`MAX_SIDE`), and 16-bit, 32-bit and float images are converted by their value range.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ._args import Parser, run_main
from ._io import input_problem, open_regular
from .data.kkanji.resize import halve_to, halvings_reach
from .errors import ImageError
from .models.modelfile import load_model
from .settings import decode_workers
from .training import cpu

__all__ = ["build_parser", "image_files", "load_image", "main", "predict", "run", "top_k"]


def _border(a: np.ndarray) -> np.ndarray:
    edge = max(1, min(a.shape) // 14)  # 2 pixels of a 28x28 image
    return np.concatenate(
        [a[:edge].ravel(), a[-edge:].ravel(), a[:, :edge].ravel(), a[:, -edge:].ravel()]
    )


# Bounds, checked from the file's size and header before a pixel is decoded: the longer side
# bounds the decoded image and the square it is padded to (4096 x 4096: 16 MiB of gray, 64 MiB
# as RGBA while decoding), so a 1-pixel-high strip cannot ask for a huge square either.
MAX_FILE_BYTES = 64 << 20
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
COLOUR_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
SUPPORTED_MODES = (*COLOUR_MODES, *ALPHA_MODES, "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _scaled(a: np.ndarray, mode: str, path: Any) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image as uint8, by its value range: 16-bit 0..65535;
    32-bit integers 0..255 as they are, up to 65535 as 16-bit; floats 0..1 (or up to 255)."""
    a = a.astype(np.float32)  # exact for 16-bit values; one copy, then worked on in place
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0:
        raise ImageError(
            f"{path}: {mode} image with values from {lo:g} to {hi:g}: negative or not finite "
            "values have no gray level; save it as an 8-bit grayscale PNG"
        )
    if mode.startswith("I;16"):
        scale = 255 / 65535
    elif mode == "F":
        scale = 255.0 if hi <= 1 else 1.0 if hi <= 255 else None
    else:  # "I": 8-bit or 16-bit values stored in 32 bits
        scale = 1.0 if hi <= 255 else 255 / 65535 if hi <= 65535 else None
    if scale is None:
        expected = "0 to 1 (or 0 to 255)" if mode == "F" else "0 to 255 or 0 to 65535"
        raise ImageError(
            f"{path}: {mode} image with values up to {hi:g}, expected {expected}; save it as an "
            "8-bit grayscale PNG"
        )
    a *= scale
    return np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8)


def _gray(im: Image.Image, path: Any) -> np.ndarray:
    """The image as uint8 gray: transparency over white paper, other bit depths by range."""
    mode = im.mode
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        paper = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(paper, im.convert("RGBA")).convert("L"))
    if mode in COLOUR_MODES:
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scaled(np.asarray(im), mode, path)
    raise ImageError(
        f"{path}: image mode {mode!r} is not supported (supported: {', '.join(SUPPORTED_MODES)}); "
        "save it as an 8-bit grayscale or RGB PNG"
    )


def _check_size(w: int, h: int, path: Any) -> None:
    if max(w, h) > MAX_SIDE or min(w, h) < 1:
        raise ImageError(
            f"{path}: {w}x{h} pixels; each side must be 1 to {MAX_SIDE:,} pixels (more than the "
            f"{MAX_SIDE:,} accepted: the image is padded to a square of its longer side); crop "
            "or scale it down to the character first"
        )


def _decode(path: str | os.PathLike) -> np.ndarray:
    """The image file as uint8 gray, bounded: a regular file only (a FIFO or a device is never
    opened), at most :data:`MAX_FILE_BYTES`, each side at most :data:`MAX_SIDE`, read from
    the header before a pixel is decoded."""
    problem = input_problem(path, MAX_FILE_BYTES)
    if problem == "no such file":
        raise ImageError(f"{path}: no such file")
    if problem and problem.startswith("a folder"):
        raise ImageError(f"{path}: a folder, not an image file")
    if problem:
        raise ImageError(f"{path}: {problem} for an image")
    try:
        with open_regular(path) as fh, Image.open(fh) as im:
            _check_size(*im.size, path)
            im = ImageOps.exif_transpose(im)
            _check_size(*im.size, path)
            return _gray(im, path)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image file PIL can read") from exc
    except Image.DecompressionBombError as exc:  # PIL's own refusal, far above our bound
        raise ImageError(f"{path}: more than the {MAX_PIXELS:,} pixels accepted") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as exc:
        raise ImageError(f"{path}: damaged or unreadable image ({str(exc)[:120]})") from exc


def load_image(
    path: str | os.PathLike, size: int, channels: int = 1, invert: str = "auto"
) -> torch.Tensor:
    """An image file as the model's input.

    Args:
        path: any image PIL reads, in a supported mode (:data:`SUPPORTED_MODES`: 8-bit gray
            and colour, with or without transparency, 16-bit and 32-bit integer and float
            gray, each converted by its value range).
        size: the model's height and width.
        channels: the model's input channels (the gray image is repeated).
        invert: ``"auto"`` (invert when the border is light), ``"yes"`` or ``"no"``.

    Returns:
        float32 C x size x size in [0, 1], white ink on black.

    Raises:
        ImageError: the file is missing, not a regular file, too large (over
            :data:`MAX_FILE_BYTES`, or a side over :data:`MAX_SIDE`), damaged, or in a mode
            that has no gray level.
    """
    gray = _decode(path)
    background = int(np.median(_border(gray)))
    if invert == "yes" or (invert == "auto" and background > 127):
        gray, background = 255 - gray, 255 - background
    h, w = gray.shape
    if h != w:  # pad to a square so the character keeps its shape
        side = max(h, w)
        square = np.full((side, side), background, np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = gray
        gray = square
    if halvings_reach(gray.shape[0], size):  # as KKanji's smaller images are made: exact
        gray = halve_to(gray[None], size)[0]
    else:
        gray = np.asarray(
            Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR), np.uint8
        )
    x = torch.from_numpy(gray.copy()).float().div_(255.0)
    return x.expand(channels, size, size).contiguous()


def top_k(probs: torch.Tensor, meta: dict[str, Any], k: int) -> list[list[dict[str, Any]]]:
    """The ``k`` most probable classes of each row of ``probs`` (N x K), best first, as
    ``{"class", "character", "codepoint", "romaji", "probability"}``."""
    k = min(k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [
        [
            {
                "class": int(i),
                "character": meta["classes"][i],
                "codepoint": meta["codepoints"][i],
                "romaji": meta["romaji"][i],
                "probability": float(p),
            }
            for p, i in zip(row_p.tolist(), row_i.tolist())
        ]
        for row_p, row_i in zip(values, indices)
    ]


# Images decoded and fed to the model at a time: bounds predict's memory for any number of
# images (256 x 64 x 64 floats is 4 MiB; the decoding threads hold at most one image each).
BATCH = 256
MAX_WORKERS = 8


def _decode_all(paths: Sequence[Any], size: int, channels: int, invert: str) -> list[Any]:
    """Each path's model input, or its :class:`ImageError`, in order; decoded by up to
    :data:`MAX_WORKERS` threads (PIL decodes without holding the GIL), never more than the
    images or ``$KMNIST_TORCH_DECODE_WORKERS``."""

    def one(path: Any) -> Any:
        try:
            return load_image(path, size, channels, invert)
        except ImageError as exc:
            return exc

    workers = max(1, min(MAX_WORKERS, decode_workers(), len(paths)))
    if workers == 1:
        return [one(p) for p in paths]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="kmnist_torch-decode")
    try:
        return list(pool.map(one, paths))
    finally:  # on Ctrl-C too: what is queued is dropped, what runs ends with its image
        pool.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def predict(
    model: torch.nn.Module, paths: Sequence[str | os.PathLike], k: int = 5, invert: str = "auto"
) -> list[dict[str, Any]]:
    """Top-``k`` predictions for each image file, with a model from
    :func:`kmnist_torch.load_model`. The images are decoded in parallel :data:`BATCH` at a
    time, so memory stays bounded for any number of them, and fed to the model in batches of
    :func:`kmnist_torch.training.cpu.eval_batch` (64 on a CPU).

    Returns:
        ``[{"image": path, "predictions": [...]}]`` in the order of ``paths`` (see
        :func:`top_k` for the predictions); an image that cannot be read (missing, not a
        regular file, too large, damaged) gets no predictions and an ``"error"`` saying why,
        and costs the others nothing.
    """
    meta = model.meta
    device = next(model.parameters()).device
    model = cpu.prepare_model(model, device)  # outside inference mode: parameters stay usable
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
        decoded = _decode_all(chunk, meta["image_size"], meta["channels"], invert)
        rows = [{"image": str(p), "predictions": []} for p in chunk]
        for row, x in zip(rows, decoded):
            if isinstance(x, ImageError):
                row["error"] = str(x)
        images = [x for x in decoded if not isinstance(x, ImageError)]
        if images:
            step = cpu.eval_batch(device, len(images))
            with cpu.inference(device):  # the CPU path evaluation and training use
                batch = cpu.prepare_batch(torch.stack(images).to(device), device)
                logits = torch.cat([model(batch[i : i + step]) for i in range(0, len(batch), step)])
                probs = torch.softmax(logits.float(), dim=1).cpu()
            good = [r for r in rows if "error" not in r]
            for r, t in zip(good, top_k(probs, meta, k)):
                r["predictions"] = t
        results.extend(rows)
    return results


# What a folder given to the command line contributes: its files with these suffixes (any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")


def image_files(paths: Sequence[str]) -> list[str]:
    """``paths`` with each folder replaced by the image files in it (by name, not recursing,
    :data:`IMAGE_SUFFIXES`), sorted. A folder without any stays, to be reported; what is not a
    regular file among them is refused, unopened, when its turn comes."""
    out: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            out.append(path)
            continue
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        out.extend([os.path.join(path, n) for n in names] or [path])
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = Parser(
        prog="python -m kmnist_torch.predict",
        description="Top-k characters for image files (any size or mode; dark ink on light "
        "paper is inverted automatically).",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run folder, model.pt or checkpoint.pt")
    p.add_argument(
        "images",
        metavar="IMAGE",
        nargs="+",
        help="image files, or folders: the files in a folder whose names end in "
        + " ".join(IMAGE_SUFFIXES),
    )
    p.add_argument("--top-k", type=int, default=5, metavar="K")
    p.add_argument("--json", action="store_true", help="print JSON, one object per image")
    p.add_argument(
        "--invert",
        choices=["auto", "yes", "no"],
        default="auto",
        help="make dark ink on light paper white on black (auto: when the border is light)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return p


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv``, predict, print; returns what ``--json`` prints."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    # PIL warns about damaged tags it skips (Corrupt EXIF data ...): the image then decodes or
    # fails with its own error line; the warnings would only be noise between the answers.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    cpu.configure(device=args.device)  # threads: the CPUs others leave free, as in training
    model = load_model(args.model, args.device)
    results = predict(model, image_files(args.images), args.top_k, args.invert)
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
        return results
    for r in results:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
            continue
        guesses = "  ".join(
            f"{g['character']} ({g['codepoint']}"
            + (f", {g['romaji']}" if g["romaji"] else "")
            + f") {100 * g['probability']:.1f}%"
            for g in r["predictions"]
        )
        print(f"{r['image']}: {guesses}")
    return results


def main(argv: list[str] | None = None) -> int:
    """The command line: predict (see :func:`run`); errors as one line, exit 1 when an image
    could not be read."""
    return run_main(run, argv, status=lambda results: int(any("error" in r for r in results)))


if __name__ == "__main__":
    sys.exit(main())
