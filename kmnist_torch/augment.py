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
) -> torch.Tensor:
    """Shift each image of ``x`` (N x C x H x W) by its own random whole-pixel offset in
    ``[-max_shift, max_shift]`` on each axis; uncovered pixels take ``fill`` (0, the
    background of the Kuzushiji images). ``generator`` must live on ``x``'s device."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0 or x.shape[0] == 0:
        return x
    n, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=fill)
    dy = torch.randint(0, 2 * m + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=generator, device=x.device)
    # One gather for the whole batch: row and column indices of each image's window.
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # N x H x 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # N x 1 x W
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()
