"""The test pass: test loss, top-1 accuracy and balanced accuracy of a model on a loader (the
scores themselves are :mod:`kmnist_torch.reporting.scores`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data.loader import TensorLoader
from ..reporting.scores import accuracy, balanced_accuracy
from . import cpu
from .distributed import Dist
from .recipes import Recipe
from .runtime import StopRequest


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
        r: the recipe (for bf16 autocast, and channels_last on CUDA; a CPU always uses it).
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
        x = cpu.prepare_batch(x, device, r.channels_last)
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
