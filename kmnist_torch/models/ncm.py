"""Nearest class mean on pixels: each class is the mean of its training images (flattened),
and an image goes to the class whose mean is nearest in Euclidean distance. The long-tail
benchmark's second pixel baseline beside the 4-NN, and the few-shot baseline on pixels; the
same predictions as scikit-learn's ``NearestCentroid`` (Euclidean).

Both steps go in chunks of images, so memory stays bounded on the full KKanji train part
(113,796 x 4,096 pixels): :func:`class_means` sums in float64 (exact for byte images: every
partial sum is an integer below 2**53), :func:`ncm_predict` scores a chunk of images against
every mean at once as ``||m||^2 - 2 x.m`` (``||x||^2`` is the same along a row) in float64.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from ..settings import Progress

ArrayLike = Union[np.ndarray, torch.Tensor]

# Images converted to float64 at a time: 4,096 KKanji images are 128 MiB.
CHUNK = 4096


def _matrix(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim < 1 or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be N images of real numbers, got {t.dtype} {tuple(t.shape)}")
    return t.reshape(t.shape[0], int(np.prod(t.shape[1:])))


def class_means(
    x: ArrayLike,
    y: ArrayLike,
    num_classes: int,
    chunk: int = CHUNK,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The mean image of every class: float64, ``num_classes`` x D (D pixels per image).

    Args:
        x: N images (any shape per image; flattened), any real dtype.
        y: N class indices in ``[0, num_classes)``.
        num_classes: rows of the result.
        chunk: images converted to float64 at a time.
        device: where the sums are made (default: where ``x`` is).

    Returns:
        The means; a class with no training image gets a row of NaN, which
        :func:`ncm_predict` never chooses.
    """
    data = _matrix(x, "x")
    labels = torch.as_tensor(y).reshape(-1).long()
    if len(labels) != len(data):
        raise ValueError(f"{len(data)} images but {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {int(labels.min())} to {int(labels.max())}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    dev = torch.device(device) if device is not None else data.device
    sums = torch.zeros(num_classes, data.shape[1], dtype=torch.float64, device=dev)
    for lo in range(0, len(data), chunk):
        part = data[lo : lo + chunk].to(dev).to(torch.float64)
        sums.index_add_(0, labels[lo : lo + chunk].to(dev), part)
    counts = torch.bincount(labels, minlength=num_classes).to(dev, torch.float64)
    return sums / counts[:, None]  # 0 / 0: NaN for a class without images


def ncm_predict(
    means: torch.Tensor,
    x: ArrayLike,
    chunk: int = 1024,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """The class of the nearest mean (squared Euclidean distance) of every image in ``x``.

    Args:
        means: K x D class means (:func:`class_means`); rows of NaN (classes without training
            images) are never chosen.
        x: M images with D pixels each.
        chunk: images scored at a time (a chunk x K float64 matrix).
        device: where the distances are computed (default: where ``means`` is).
        progress: a progress line on stderr (default: when M x K x D exceeds 2**36).

    Returns:
        A CPU int64 tensor of M class indices; among equally near means the lower class wins.
    """
    data = _matrix(x, "x")
    if means.ndim != 2 or means.shape[1] != data.shape[1]:
        raise ValueError(
            f"means are {tuple(means.shape)} but the images have {data.shape[1]} pixels"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    dev = torch.device(device) if device is not None else means.device
    m = means.to(dev, torch.float64)
    absent = torch.isnan(m).any(dim=1)
    if bool(absent.all()):
        raise ValueError("no class has a mean: every row of means is NaN")
    m = torch.where(absent[:, None], torch.zeros_like(m), m)
    sq = m.square().sum(dim=1)
    sq[absent] = float("inf")
    out = torch.empty(len(data), dtype=torch.int64)
    shown = progress if progress is not None else len(data) * m.numel() > 2**36
    with Progress("NCM", len(data), unit="image", enabled=shown) as bar:
        for lo in range(0, len(data), chunk):
            part = data[lo : lo + chunk].to(dev).to(torch.float64)
            # ||x - m||^2 - ||x||^2: argmin returns the first (lowest) of equal minima.
            out[lo : lo + len(part)] = (sq - 2 * part @ m.T).argmin(dim=1).cpu()
            bar.update(len(part))
    return out
