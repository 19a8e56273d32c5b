"""Read characters from image files with a trained model.

    python -m kmnist_torch.predict runs/kmnist-cnn-simple_cnn-none-seed0 scan1.png scan2.jpg

Any size and mode: each image is made grayscale (transparency over white paper), padded to a
square with its background, resized to the model's size, and inverted when it is dark ink on
light paper (the models see white ink on black, as the datasets store it). Whether to invert is
decided from the median of the image's border (light border: invert); ``--invert yes|no``
overrides. ``--json`` prints one object per image, the best guess first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ._args import Parser, run_main
from .errors import ImageError
from .models.modelfile import load_model
from .training import cpu

__all__ = ["build_parser", "load_image", "main", "predict", "run", "top_k"]


def _border(a: np.ndarray) -> np.ndarray:
    edge = max(1, min(a.shape) // 14)  # 2 pixels of a 28x28 image
    return np.concatenate(
        [a[:edge].ravel(), a[-edge:].ravel(), a[:, :edge].ravel(), a[:, -edge:].ravel()]
    )


# Larger images are refused before decoding: a few kilobytes of PNG can claim gigapixels.
MAX_PIXELS = 50_000_000


def load_image(
    path: str | os.PathLike, size: int, channels: int = 1, invert: str = "auto"
) -> torch.Tensor:
    """An image file as the model's input.

    Args:
        path: any image PIL reads.
        size: the model's height and width.
        channels: the model's input channels (the gray image is repeated).
        invert: ``"auto"`` (invert when the border is light), ``"yes"`` or ``"no"``.

    Returns:
        float32 C x size x size in [0, 1], white ink on black.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(
                    f"{path}: {w}x{h} pixels, more than the {MAX_PIXELS:,} accepted; scale it "
                    "down to the character first"
                )
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                paper = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(paper, im.convert("RGBA"))
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path}: a folder, not an image file") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image file PIL can read") from exc
    except Image.DecompressionBombError as exc:  # PIL's own refusal, far above our bound
        raise ImageError(
            f"{path}: more than the {MAX_PIXELS:,} pixels accepted ({exc}); scale it down to "
            "the character first"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: damaged or unreadable image ({exc})") from exc
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
    if gray.shape != (size, size):
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


@torch.no_grad()
def predict(
    model: torch.nn.Module, paths: Sequence[str | os.PathLike], k: int = 5, invert: str = "auto"
) -> list[dict[str, Any]]:
    """Top-``k`` predictions for each image file, with a model from
    :func:`kmnist_torch.load_model`.

    Returns:
        ``[{"image": path, "predictions": [...]}]`` in the order of ``paths`` (see
        :func:`top_k` for the predictions); an image that cannot be read gets no predictions
        and an ``"error"`` saying why.
    """
    meta = model.meta
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    images = []
    for p in paths:  # one unreadable image does not cost the others their predictions
        try:
            images.append(load_image(p, meta["image_size"], meta["channels"], invert))
            results.append({"image": str(p), "predictions": []})
        except ImageError as exc:
            results.append({"image": str(p), "predictions": [], "error": str(exc)})
    if images:
        with cpu.inference(device):  # the CPU path evaluation and training use
            probs = torch.softmax(model(torch.stack(images).to(device)).float(), dim=1).cpu()
        good = [r for r in results if "error" not in r]
        for r, t in zip(good, top_k(probs, meta, k)):
            r["predictions"] = t
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = Parser(
        prog="python -m kmnist_torch.predict",
        description="Top-k characters for image files (any size or mode; dark ink on light "
        "paper is inverted automatically).",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run folder, model.pt or checkpoint.pt")
    p.add_argument("images", metavar="IMAGE", nargs="+")
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
    cpu.configure(device=args.device)  # threads from the load, as in training
    model = load_model(args.model, args.device)
    results = predict(model, args.images, args.top_k, args.invert)
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
