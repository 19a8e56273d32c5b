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


def check_mix_layer(mix_layer: int | None, allowed: tuple[int, ...]) -> None:
    """Refuse a ``mix_layer`` the model cannot mix at (None: no mixing, always allowed)."""
    if mix_layer is not None and mix_layer not in allowed:
        raise ValueError(f"mix_layer must be one of {allowed}, got {mix_layer}")
