"""The mixing step the models call inside their forward pass (manifold mixup mixes a hidden
layer's output): the models' side of mixup, so that ``models/`` needs nothing from training."""

from __future__ import annotations

import torch


def mix(
    x: torch.Tensor, lam: float | torch.Tensor | None, perm: torch.Tensor | None
) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]``: each example blended with its partner."""
    if lam is None or perm is None:
        raise ValueError("mixing needs both lam and perm")
    return lam * x + (1 - lam) * x[perm]
