"""The optimiser and the learning-rate schedule a recipe names."""

from __future__ import annotations

import torch
from torch import nn

from .recipes import Recipe


def build_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """The optimiser a recipe names, over every parameter (weight decay included, as the
    reference applies it).

    Args:
        model: the model to optimise.
        r: the recipe (``optimizer``, ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``rho``, ``eps``).

    Returns:
        ``torch.optim.SGD`` or ``torch.optim.Adadelta``.
    """
    if r.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=r.lr,
            momentum=r.momentum,
            nesterov=r.nesterov and r.momentum > 0,
            weight_decay=r.weight_decay,
        )
    if r.optimizer == "adadelta":
        return torch.optim.Adadelta(
            model.parameters(), lr=r.lr, rho=r.rho, eps=r.eps, weight_decay=r.weight_decay
        )
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, r: Recipe) -> float:
    """The learning-rate schedule: the multiplier of the peak lr at one optimiser step.

    Args:
        step: the optimiser step, 0-based, counted over the whole run.
        steps_per_epoch: optimiser steps in one epoch.
        r: the recipe (``schedule``, ``epochs``, ``milestones``, ``gamma``, ``warmup``).

    Returns:
        The factor: 1 for ``constant``; ``gamma`` per milestone passed for ``step``; a linear
        warm-up then linear decay for ``onecycle``.
    """
    if r.schedule == "constant":
        return 1.0
    if r.schedule == "step":
        # Per epoch, as the reference adjusts it; milestones are fractions of the run.
        epoch = step // steps_per_epoch
        return r.gamma ** sum(epoch >= round(m * r.epochs) for m in r.milestones)
    if r.schedule == "onecycle":
        total = r.epochs * steps_per_epoch
        warm = max(1, round(r.warmup * total))
        if step < warm:
            return (step + 1) / warm
        # Down to 1/(total - warm + 1) on the last step: no step is wasted at lr 0.
        return max(0.0, (total - step) / (total - warm + 1))
    raise ValueError(f"unknown schedule {r.schedule!r}")
