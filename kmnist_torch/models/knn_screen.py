"""The screen behind the 4-NN baseline: a cheap, provable lower bound on every distance, so that
only a few training images per test image need their exact distance computed.

**The bound.** Shift the pixels to ``[-128, 127]`` (no distance changes). Cut an image into
2 x 2 blocks ``b`` (1 x 4 runs for flat vectors) and group the blocks into regions ``g`` of
2 x 2 blocks (4 x 4 pixels). For a block write ``S_b(x)`` for its pixel sum and ``P`` for the
projection onto block-constant images (each block replaced by its mean). The feature vector

    phi(x) = ( S_b(x) / 2 for every block,  r_g(x) = ||(I - P) x_g|| for every region )

(196 + 49 = 245 numbers for a 28 x 28 image, against 784 pixels) satisfies, for any x and y,

    ||phi(x) - phi(y)|| <= ||x - y||.

Proof: ``v = x - y`` splits orthogonally into ``P v`` and ``(I - P) v``, region by region.
``||P v_b||^2 = S_b(v)^2 / 4`` (four equal values ``S_b(v) / 4``) and ``S_b`` is linear, so the
first part is ``sum_b (S_b(x) - S_b(y))^2 / 4``, the first block of ``phi``'s distance. In each
region ``(I - P) v_g = (I - P) x_g - (I - P) y_g``, whose norm is at least
``|r_g(x) - r_g(y)|`` by the triangle inequality: the second block. Also ``||phi(x)|| = ||x||``.

**Rounding.** ``phi`` is computed from exact integers (``S_b``, and ``4 r_g^2 = sum over the
region's blocks of 4 * (sum of squares) - S_b^2``), rounded once to float32: each entry moves by
at most ``u |entry|`` (``u = 2^-24``; float64's own rounding is far below), so
``||phi~(x) - phi~(y)|| <= ||phi(x) - phi(y)|| + 2 u M`` with ``M = ||x|| + max_t ||t||``
(norms of the shifted images). The screen value of a training image ``t`` is the float32
``key_t = ||phi~_t||^2 - 2 phi~_q . phi~_t``, one matrix product of ``F`` features (``addmm``),
so, whatever the summation order or fused multiply-adds of the library,
``|key_t + ||phi~_q||^2 - ||phi~_q - phi~_t||^2| <= gamma_(F+2) M^2`` with
``gamma_n = n u / (1 - n u)``. Float32 matrix products run at full precision here
(``torch.set_float32_matmul_precision("highest")``: no TF32 on a GPU, no bf16 on a CPU).

**The search.** For a test image ``q`` take the ``C`` training images of smallest screen value
(``C`` = ``candidates``), compute their exact squared distances (integers; exact in float32,
see :mod:`kmnist_torch.models.knn`) and let ``U`` be the k-th smallest of them: ``k`` images lie
within ``U``, so the true k-th distance ``d_k <= U``. Any training image ``t`` with
``||q - t|| <= U`` therefore has

    key_t <= (U + 2 u M)^2 + 2 gamma_(F+3) M^2 - ||phi~_q||^2  =: T_q

(twice the rounding bound above, for margin). If the largest screen value among the ``C``
exceeds ``T_q`` then every image outside them is farther than ``U >= d_k``: the true k nearest,
and every image tied with the k-th, are among the ``C`` whose exact distances are known, and
choosing the k smallest among them by (distance, index) is choosing them among all. Otherwise
the test image is *hard* and is scored exactly against the whole training set. Either way the
answer is the exact one; the screen only decides how much work it takes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

# float32 unit roundoff.
U32 = 2.0**-24
# Largest feature block whose shifted-integer dot products (and sums of squares) are exact in
# float32: each product is at most 128 * 128 in magnitude, so every partial sum over 1024
# features stays within 2**24.
EXACT_BLOCK = 1024
# Elements of the gathered (queries x candidates x features) float32 block of the exact step.
GATHER_ELEMENTS = 2**22
# Rows at a time when computing the features (int64 intermediates, 8 bytes per pixel).
FEATURE_ROWS = 4096


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)`` for float32."""
    return n * U32 / (1 - n * U32)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Float32 matrix products at full float32 precision for the duration (TF32 on CUDA and
    bf16 on a CPU with oneDNN are what "high" and "medium" allow), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def image_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of one image: its own when it is 2-D, else one row of all its values."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    return 1, int(math.prod(shape))


def features(x: torch.Tensor, layout: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``phi`` of each row of ``x`` (N x D, integers in [0, 255]) as float32 on ``device``."""
    parts = [
        _features_rows(x[lo : lo + FEATURE_ROWS].to(device), layout)
        for lo in range(0, x.shape[0], FEATURE_ROWS)
    ]
    return torch.cat(parts) if parts else torch.empty(0, 0, device=device)


def _features_rows(x: torch.Tensor, layout: tuple[int, int]) -> torch.Tensor:
    # Every intermediate is an integer below 2**24 in magnitude (|S_b| <= 512, a region's
    # 4 r_g^2 <= 4 * 4 * 4 * 128**2), so float32 holds them all exactly.
    h, w = layout
    n = x.shape[0]
    bh, bw = (2, 2) if h > 1 else (1, 4)  # a block: 4 pixels
    rh, rw = (2 * bh, 2 * bw) if h > 1 else (1, 4 * bw)  # a region: 4 blocks
    v = x.reshape(n, h, w).to(torch.float32).sub_(128.0)
    if h % rh or w % rw:
        # Zero padding (after the shift) adds the same values to every image: no distance
        # changes.
        v = F.pad(v, (0, -w % rw, 0, -h % rh))
    s = _pool(v, bh, bw)
    spread = _pool(v.square(), bh, bw).mul_(4).sub_(s.square())  # 4 ||(I - P) x_b||^2
    r4 = _pool(spread, rh // bh, rw // bw).reshape(n, -1)
    # The square root in float64 (correctly rounded, then rounded once more to float32).
    r = r4.to(torch.float64).div_(4).sqrt_().to(torch.float32)
    return torch.cat([s.reshape(n, -1).div_(2), r], 1)


def _pool(v: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Sums over ``bh`` x ``bw`` blocks of the last two dimensions (strided adds: faster than
    a reduction over a reshaped view on a CPU)."""
    out = v[:, 0::bh, 0::bw].clone()
    for i in range(bh):
        for j in range(bw):
            if i or j:
                out.add_(v[:, i::bh, j::bw])
    return out


class Screen:
    """The training images' features, ready to screen batches of test images."""

    def __init__(self, train: torch.Tensor, layout: tuple[int, int], device: torch.device):
        self.layout, self.device = layout, device
        self.phi = features(train, layout, device)
        sq = self.phi.to(torch.float64).square().sum(dim=1)
        self.phi_sq = sq.to(torch.float32)
        self.norm_max = float(sq.max().sqrt()) if len(sq) else 0.0

    def smallest(self, query: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row of ``query`` (B x D bytes): the ``count`` training indices of smallest
        screen value (in no order) and, per row, the largest screen value among them minus the
        threshold offset (see :meth:`excluded`), as (indices B x count, float64 B x 2)."""
        q_phi = features(query, self.layout, self.device)
        with full_precision():
            key = torch.addmm(self.phi_sq[None, :], q_phi, self.phi.T, alpha=-2.0)
        values, index = torch.topk(key, count, dim=1, largest=False, sorted=False)
        q_norm = q_phi.to(torch.float64).square().sum(dim=1).sqrt()
        edge = values.max(dim=1).values.to(torch.float64)
        return index, torch.stack([edge, q_norm], dim=1)

    def excluded(self, edge: torch.Tensor, kth_sq: torch.Tensor) -> torch.Tensor:
        """Per row: True when every training image outside the screened ones is provably
        farther than the exact k-th squared distance ``kth_sq`` found among them (the bound
        in the module docstring)."""
        largest, q_norm = edge[:, 0], edge[:, 1]
        m = q_norm + self.norm_max
        u = kth_sq.to(torch.float64).sqrt() * (1 + 2.0**-50)
        n_feat = self.phi.shape[1]
        limit = (u + 2 * U32 * m).square() + 2 * gamma(n_feat + 3) * m.square() - q_norm.square()
        return largest > limit


def exact_keys(
    query_blocks: list[torch.Tensor],
    train_blocks: list[torch.Tensor],
    train_sq: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """``||t||^2 - 2 q.t`` (integers of ``train_sq``'s dtype) for the training rows ``index``
    (B x C) of each query, from the shifted float32 feature blocks of
    :mod:`kmnist_torch.models.knn` (each block's products exact in float32)."""
    b, c = index.shape
    width = sum(t.shape[1] for t in train_blocks)
    step = max(1, GATHER_ELEMENTS // max(1, c * width))
    out = torch.empty(b, c, dtype=train_sq.dtype, device=index.device)
    with full_precision():
        for lo in range(0, b, step):
            idx = index[lo : lo + step]
            dot = None
            for q, t in zip(query_blocks, train_blocks):
                part = torch.bmm(t[idx], q[lo : lo + step, :, None]).squeeze(2)
                part = part.to(train_sq.dtype)
                dot = part if dot is None else dot.add_(part)
            out[lo : lo + step] = train_sq[idx] - 2 * dot
    return out
