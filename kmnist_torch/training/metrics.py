"""Test metrics: top-1 accuracy (KMNIST, MNIST) and balanced accuracy (K49, as the upstream
README defines it: every class weighs the same), and the test pass that computes them with the
test loss."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data.loader import TensorLoader
from . import cpu
from .distributed import Dist
from .recipes import Recipe
from .runtime import StopRequest


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(
            f"pred and target must be 1-d and the same length, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if target.numel() == 0:
        raise ValueError("no targets: accuracy of an empty set is undefined")


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of predicted class indices equal to the targets."""
    _check(pred, target)
    return (pred == target).double().mean().item()


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the classes present in ``target`` of the recall of each (correct / support).

    Classes that are only predicted, never true, do not count: the same definition as
    scikit-learn's ``balanced_accuracy_score``.
    """
    _check(pred, target)
    n = int(torch.maximum(pred.max(), target.max()).item()) + 1
    support = torch.bincount(target, minlength=n)
    correct = torch.bincount(target[pred == target], minlength=n)
    present = support > 0
    return (correct[present].double() / support[present].double()).mean().item()


@torch.no_grad()
def evaluate(
    forward: Callable[..., torch.Tensor],
    loader: TensorLoader,
    r: Recipe,
    device: torch.device,
    stop: StopRequest | None = None,
    dist: Dist | None = None,
) -> dict[str, float] | None:
    """Test loss (cross-entropy), top-1 and balanced accuracy of ``forward`` on ``loader``.

    With several ranks (``dist``), each rank's loader yields its part of every test batch;
    predictions, targets and loss sums are gathered, so every image counts exactly once.

    Args:
        forward: the model (or its compiled form); put in eval mode if it is a module.
        loader: the test batches.
        r: the recipe (for bf16 autocast and channels_last on CUDA).
        device: where the batches are.
        stop: checked before each batch.
        dist: this process's place in a data-parallel run (default: alone).

    Returns:
        ``test_loss``, ``test_accuracy`` and ``test_balanced_accuracy``; None if a stop was
        requested.
    """
    if isinstance(forward, nn.Module):
        forward.eval()
    dist = dist or Dist()
    preds, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        if stop is not None and stop.requested:
            return None
        if len(y) == 0:  # a rank's part of a last batch smaller than the world
            continue
        if cpu.channels_last_enabled(device, r.channels_last, r.amp):
            x = x.contiguous(memory_format=torch.channels_last)
        with cpu.autocast(device, r.amp):
            logits = forward(x)
        # Written out rather than F.cross_entropy: nll_loss has no deterministic CUDA kernel.
        log_p = torch.log_softmax(logits.float(), dim=1)
        loss_sum -= log_p.gather(1, y[:, None]).sum().double()
        preds.append(logits.argmax(1))
        targets.append(y)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    pred = dist.gather_cat(torch.cat(preds) if preds else empty).cpu()
    target = dist.gather_cat(torch.cat(targets) if targets else empty).cpu()
    dist.all_sum(loss_sum)
    return {
        "test_loss": loss_sum.item() / len(target),
        "test_accuracy": accuracy(pred, target),
        "test_balanced_accuracy": balanced_accuracy(pred, target),
    }
