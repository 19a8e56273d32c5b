"""Augmentation on the device, a whole batch at once. Characters are never flipped: a mirrored
kana is another glyph or none."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_translate(
    x: torch.Tensor,
    max_shift: int,
    generator: torch.Generator | None = None,
    fill: float = 0.0,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Shift each image of ``x`` (N x C x H x W) by its own random whole-pixel offset in
    ``[-max_shift, max_shift]`` on each axis; uncovered pixels take ``fill`` (0, the
    background of the Kuzushiji images). ``generator`` must live on ``x``'s device.

    ``shard=(rank, world_size)``: ``x`` is the rank-th of ``world_size`` equal parts of a
    global batch (data-parallel training); the offsets are drawn for the whole global batch,
    alike on every rank, and this part's are used: each image moves as it would in one
    process."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0 or x.shape[0] == 0:
        return x
    n, _, h, w = x.shape
    m = max_shift
    rank, world_size = shard
    padded = F.pad(x, (m, m, m, m), value=fill)
    total = n * world_size
    dy = torch.randint(0, 2 * m + 1, (total,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * m + 1, (total,), generator=generator, device=x.device)
    if world_size > 1:
        dy, dx = dy[rank * n : (rank + 1) * n], dx[rank * n : (rank + 1) * n]
    # One gather for the whole batch: row and column indices of each image's window.
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # N x H x 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # N x 1 x W
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()
