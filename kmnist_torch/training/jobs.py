"""A :class:`~kmnist_torch.training.engine.Job` from its parts: the loaders over the
device-resident splits (each rank's part of every batch) and the model, wrapped in
``DistributedDataParallel`` when there are several ranks. The trainer's command line
(:mod:`kmnist_torch.train`) builds the model and hands it here."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.loader import TensorLoader
from ..errors import TrainError
from . import cpu
from .distributed import Dist, rank_seed
from .engine import Job
from .recipes import Recipe


def loaders(
    r: Recipe, train_set: Any, test_set: Any, device: torch.device, seed: int, ctx: Dist
) -> tuple[TensorLoader, TensorLoader]:
    """Loaders over the device-resident splits, each yielding this rank's part of a batch."""
    rank, world = ctx.shard
    train_loader = TensorLoader(
        train_set,
        r.batch_size,
        shuffle=True,
        device=device,
        drop_last=True,
        seed=seed,
        rank=rank,
        world_size=world,
    )
    if len(train_loader) == 0:
        raise TrainError(
            f"{len(train_set.data)} training images make no full batch of {r.batch_size}; "
            "lower --batch-size or raise --limit-train"
        )
    test_loader = TensorLoader(
        test_set,
        cpu.eval_batch(torch.device(device), r.eval_batch_size),
        shuffle=False,
        device=device,
        rank=rank,
        world_size=world,
    )
    return train_loader, test_loader


def build_job(
    r: Recipe,
    train_set: Any,
    test_set: Any,
    device: torch.device,
    seed: int,
    built: tuple[nn.Module, dict[str, Any]],
    ctx: Dist | None = None,
    sync_bn: bool = False,
) -> Job:
    """Loaders over the device-resident splits and the model with its model-file metadata
    (``built``, initialised from ``seed``).
    With several ranks (``ctx``), loaders yielding this rank's part of every batch and the
    model wrapped in ``DistributedDataParallel``."""
    ctx = ctx or Dist()
    train_loader, test_loader = loaders(r, train_set, test_set, device, seed, ctx)
    model, model_meta = built
    num_classes = len(train_set.classes)
    if not ctx.active:
        return Job(r, model, train_loader, test_loader, device, num_classes, model_meta=model_meta)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    # Every rank starts from the same weights (DDP also broadcasts rank 0's); dropout then
    # draws from the rank's own stream, or every rank would drop the same units of its rows.
    torch.manual_seed(rank_seed(seed, ctx.rank))
    # Evaluation calls the bare model: each rank tests its own rows, with no collective.
    forward, eval_forward = ddp, model
    if r.compile:
        forward, eval_forward = torch.compile(ddp), torch.compile(model)
    return Job(
        r,
        model,
        train_loader,
        test_loader,
        device,
        num_classes,
        forward=forward,
        eval_forward=eval_forward,
        dist=ctx,
        model_meta=model_meta,
    )
