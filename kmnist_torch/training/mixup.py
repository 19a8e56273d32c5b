"""Input mixup (Zhang et al., 2018) and manifold mixup (Verma et al., 2019), as the manifold
mixup reference code does them: per batch, one ``lam ~ Beta(alpha, alpha)`` and one
permutation, applied alike to the hidden state at one layer and to the one-hot targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.mixing import mix

MODES = ("none", "input", "manifold")
LOSSES = ("bce", "ce")
# The reference's alphas: 1.0 for input mixup, 2.0 for manifold mixup.
DEFAULT_ALPHA = {"input": 1.0, "manifold": 2.0}


@dataclass(frozen=True)
class MixPlan:
    """What one batch is mixed with: ``lam``, the permutation pairing each example with
    another, and the layer (0 = input) whose output is mixed."""

    lam: float
    perm: torch.Tensor
    layer: int


def draw(
    mode: str,
    alpha: float,
    batch_size: int,
    layers: tuple[int, ...],
    rng: np.random.Generator,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> MixPlan | None:
    """The plan for one batch, or None for ``mode="none"``.

    ``lam`` comes from the NumPy ``rng`` (as the reference's ``np.random.beta``); ``alpha <= 0``
    means no mixing (``lam = 1``). Manifold mixup draws the layer uniformly from ``layers``
    that are 0, 1 or 2 (input, after stage 1, after stage 2); input mixup always uses 0. The
    permutation is drawn with ``generator`` directly on its device.

    ``shard=(rank, world_size)`` (data-parallel training, ``batch_size`` the rank's part of the
    global batch): every rank draws the same ``lam`` and layer, and the same ``world_size``
    permutations, one per rank's part, each using its own. Pairs stay within a rank's part,
    since mixing across ranks would mean exchanging hidden states at every step; with one
    process this is exactly the single permutation of the whole batch.
    """
    if mode not in MODES:
        raise ValueError(f"mixup mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return None
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    if mode == "input":
        layer = 0
    else:
        choices = [k for k in layers if k in (0, 1, 2)]
        if not choices:
            raise ValueError(f"this model offers no layer for manifold mixup ({layers})")
        layer = int(choices[int(rng.integers(len(choices)))])
    rank, world_size = shard
    perms = [
        torch.randperm(batch_size, generator=generator, device=device) for _ in range(world_size)
    ]
    return MixPlan(lam, perms[rank], layer)


def one_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float32 one-hot rows for int64 class indices."""
    return F.one_hot(targets, num_classes).to(torch.float32)


def mixed_forward(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, num_classes: int, plan: MixPlan | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and soft targets for one batch: the model mixes at ``plan.layer`` with the very
    ``lam`` and permutation that mix the one-hot targets here."""
    soft = one_hot(targets, num_classes)
    if plan is None:
        return model(x), soft
    # A 0-d tensor rather than a float: torch.compile would recompile for every new value.
    lam = torch.full((), plan.lam, device=x.device)
    logits = model(x, mix_layer=plan.layer, lam=lam, perm=plan.perm)
    return logits, mix(soft, lam, plan.perm)


def loss_fn(logits: torch.Tensor, soft_targets: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Mean loss of ``logits`` against soft targets (rows summing to 1).

    ``bce``: binary cross-entropy between the softmax and the targets, averaged over every
    entry of the batch x classes matrix, as the reference's ``BCELoss()(softmax(out), target)``.
    ``ce``: soft-target cross-entropy, ``-(target * log_softmax).sum(1).mean()``.
    Computed in float32 whatever the autocast dtype of the logits.
    """
    logits = logits.float()
    if kind == "bce":
        # BCE is unsafe under autocast, so compute it with autocast off.
        with torch.autocast(logits.device.type, enabled=False):
            return F.binary_cross_entropy(torch.softmax(logits, dim=1), soft_targets)
    if kind == "ce":
        return F.cross_entropy(logits, soft_targets)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
