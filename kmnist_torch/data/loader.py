"""The device-resident fast path: the whole split as one uint8 tensor on the device, indexed,
cast and scaled per batch there, instead of one PIL image per item on the CPU."""

from __future__ import annotations

from typing import Iterator

import torch


def part(lo: int, hi: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` cut into ``world_size`` near-equal consecutive parts: rank's part.

    Equal parts when ``world_size`` divides ``hi - lo`` (training batches); otherwise the
    first parts are one shorter (the last, smaller test batch), and a part may be empty.
    """
    n = hi - lo
    return lo + n * rank // world_size, lo + n * (rank + 1) // world_size


class TensorLoader:
    """The whole split as one uint8 tensor on ``device``; batches are indexed, cast to float32
    and scaled to [0, 1] there, instead of one PIL image per item on the CPU.

    Works with every dataset of this package (and any object with ``data`` N x H x W uint8 and
    ``targets`` tensors). The dataset's ``transform`` is not applied: augment on the device.

    Args:
        dataset (Any): an object with uint8 ``data`` (N x H x W or N x C x H x W) and
            ``targets``.
        batch_size: images per batch.
        shuffle: draw a new order every epoch.
        device: where the data lives and the batches are made.
        drop_last: leave out the last, smaller batch.
        seed: makes the shuffle order reproducible (None: a fresh random seed).
        rank: this process's index in a data-parallel run: ``batch_size`` is the global batch
            and this process yields its ``rank``-th of ``world_size`` consecutive parts of each
            batch (:func:`part`); every rank draws the same order from the same ``seed``, so
            together the ranks see exactly the one-process batches.
        world_size: the number of processes in a data-parallel run (1: a single process).

    Yields:
        batch (tuple[torch.Tensor, torch.Tensor]): ``(images, targets)``: float32
            B x C x H x W in [0, 1] and int64 B, on ``device``.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        data = torch.as_tensor(dataset.data)
        if data.dtype != torch.uint8 or data.dim() not in (3, 4):
            raise ValueError(
                f"TensorLoader needs uint8 data of N x H x W (or N x C x H x W), got "
                f"{data.dtype} {tuple(data.shape)}"
            )
        self.device = torch.device(device)
        self.data = data.to(self.device)
        if self.data.dim() == 3:
            self.data = self.data.unsqueeze(1)
        self.targets = torch.as_tensor(dataset.targets, dtype=torch.int64).to(self.device)
        if len(self.targets) != len(self.data):
            raise ValueError(f"{len(self.data)} images but {len(self.targets)} targets")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch ``start`` on: the same order as a whole pass (the
        shuffle is drawn in full), the batches before ``start`` never gathered, so a run
        resumed, or checkpointed, mid-epoch pays nothing for the steps it skips."""
        n = len(self.data)
        if self.shuffle:
            # Drawn on the CPU so the order is the same whatever the device.
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = None
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if self.world_size > 1:  # this rank's part of the global batch
                lo, hi = part(lo, hi, self.rank, self.world_size)
            if order is None:
                x, y = self.data[lo:hi], self.targets[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.data[idx], self.targets[idx]
            yield x.float().div_(255.0), y

    def state_dict(self) -> dict:
        """The shuffle generator's state, to resume an interrupted run at the same order."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.generator.set_state(state["generator"])
