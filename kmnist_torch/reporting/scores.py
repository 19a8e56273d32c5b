"""Top-1 accuracy and balanced accuracy (mean per-class recall, as the upstream README defines
it for K49: every class weighs the same) of predicted class indices: pure functions, used by the
trainer's test pass, ``evaluate``, the harness and the long-tail report."""

from __future__ import annotations

import torch


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
