"""Smaller KKanji images by exact 2x2 means: 64x64 -> 32x32 -> 16x16.

Few-shot work on handwritten characters trains at small sizes (Omniglot at 28x28), and a CPU
trains the simple CNN about 6x faster at 32x32 than at 64x64. The result depends only on the
pixels: each output pixel is the mean of its 2x2 block rounded half up, in integers, so it is
the same on every machine and library version.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import catalog

# The sizes an image may be brought to: the published one, then each halving (the catalog's,
# which the model files of KKanji runs are checked against).
SIZES = catalog.KKANJI.sizes  # (64, 32, 16)
# Images halved per step: bounds the temporaries (about 3 bytes per pixel of a chunk).
CHUNK = 1024  # 4 MiB of 64x64 images: smaller chunks stay in the CPU cache, and are faster


def check_size(size: int) -> int:
    """``size`` if it is one of :data:`SIZES`, else a ValueError naming them."""
    if type(size) is not int or size not in SIZES:
        raise ValueError(
            f"KKanji image_size must be one of {', '.join(map(str, SIZES))}, got {size!r}"
        )
    return size


def _halve(block: np.ndarray) -> np.ndarray:
    # Rows, then columns, summed in uint16 (at most 4 x 255 + 2): a few strided adds, 14x
    # faster than a reshaped sum over the 2x2 axes, which upcasts to int64.
    pairs = block[:, 0::2].astype(np.uint16)
    pairs += block[:, 1::2]
    sums = pairs[:, :, 0::2] + pairs[:, :, 1::2]
    sums += 2
    sums >>= 2
    return sums.astype(np.uint8)


def halvings_reach(side: int, size: int) -> bool:
    """Whether ``side`` x ``side`` images come to ``size`` x ``size`` by whole 2x2 halvings
    (``side == size * 2**k``, k >= 0)."""
    ratio = side // size if size >= 1 else 0
    return side >= size >= 1 and side % size == 0 and ratio & (ratio - 1) == 0


def downsample(
    images: np.ndarray | torch.Tensor, size: int, index: np.ndarray | None = None
) -> np.ndarray:
    """KKanji images brought to ``size`` x ``size`` (:func:`check_size`) by repeated exact 2x2
    means, rounded half up (:func:`halve_to`)."""
    return halve_to(images, check_size(size), index)


def halve_to(
    images: np.ndarray | torch.Tensor, size: int, index: np.ndarray | None = None
) -> np.ndarray:
    """Square uint8 images brought to ``size`` x ``size`` by repeated exact 2x2 means (each
    output pixel the mean of its block, rounded half up, in integers).

    Args:
        images: uint8 array or tensor (a memory map too), N x S x S with ``S = size * 2**k``
            (:func:`halvings_reach`).
        size: the side wanted.
        index: only these images, in this order (``images[index]``), read :data:`CHUNK` at a
            time: the memory held is the result and one chunk, never ``images[index]`` whole.

    Returns:
        A new uint8 array, N x size x size (the input itself, as an array, when it is
        already that size and no ``index`` is given).
    """
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"expected uint8 images N x S x S, got {arr.dtype} {arr.shape}")
    side = arr.shape[1]
    if not halvings_reach(side, size):
        raise ValueError(f"cannot halve {side}x{side} images down to {size}x{size}")
    if index is not None:
        index = np.asarray(index, dtype=np.int64)
        if side == size:
            return np.asarray(arr[index])
    elif side == size:
        return arr
    n = len(arr) if index is None else len(index)
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        rows = slice(start, start + CHUNK)
        block = np.asarray(arr[rows] if index is None else arr[index[rows]])
        while block.shape[1] > size:
            block = _halve(block)
        out[rows] = block
    return out
