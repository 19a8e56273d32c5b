"""The 4-NN's projection screen on a CPU (``screen=True``): a provable lower bound on every
distance from an orthonormal projection, so that only the training images the bound cannot rule
out get an exact distance.

**The bound.** Shift the pixels by a fixed vector ``mu`` (no difference changes): ``c_a = a -
mu``. Let ``V`` (D x d) have orthonormal columns (the top ``d`` principal directions of a sample
of the training images: any orthonormal ``V`` is correct, a good one is only faster) and ``Pi =
V V^T`` the projection onto their span. For any images ``a``, ``b`` with ``v = a - b``,

    ||v||^2 = ||Pi v||^2 + ||(I - Pi) v||^2 >= ||V^T c_a - V^T c_b||^2 + (r(a) - r(b))^2,

with ``r(a) = ||(I - Pi) c_a||``: ``||Pi v|| = ||V^T v||`` and ``(I - Pi) v = (I - Pi) c_a -
(I - Pi) c_b``, whose norm is at least ``|r(a) - r(b)|`` (triangle inequality). So ``f(a) =
(V^T c_a, r(a))``, ``d + 1`` numbers, satisfies ``||f(a) - f(b)|| <= ||a - b||``, and
``r(a)^2 = ||c_a||^2 - ||V^T c_a||^2``.

**Rounding.** ``V`` is stored in float64 and is orthonormal only up to ``e``, an upper bound on
``||V^T V - I||`` (its Frobenius norm, computed, plus a margin): then ``||V^T w||^2 <=
(1 + e) ||Pi w||^2`` and ``|r(a)^2 - (||c_a||^2 - ||V^T c_a||^2)| <= 2.1 e ||c_a||^2``. The
features are computed in float64 (every rounding at most ``2^-53`` relative; a product of length
``n`` errs by at most ``gamma64_n`` times the product of the norms; ``||c_a||`` is a vector norm,
the square root of such a sum, so its square errs by at most ``gamma64_D + 3 * 2^-53``
relative, well inside the ``4 gamma64_(D + d + 2)`` term below, and ``M`` below may be low by as
much, far inside the doubled rounding margin) and rounded once to float32 (``2^-24``
relative). Using ``|sqrt(x) - sqrt(y)| <= sqrt(|x - y|)`` for ``r``, the computed
float32 features ``phi(a)`` are within ``eta ||c_a||`` of ``f(a)`` (Euclidean), with

    eta = sqrt(2.1 e + 4 gamma64_(D + d + 2) sqrt(d + 1)) + e + 4 gamma64_D sqrt(d) + 2^-23,

a generous sum of the terms above. Hence, for a test image ``q`` and any training image ``t``,
``||phi(q) - phi(t)|| <= ||q - t|| + eta M`` with ``M = ||c_q|| + max_t ||c_t||``. The screen
value ``key_t = ||phi(t)||^2 - 2 phi(q) . phi(t)`` is one float32 matrix product over ``F = d +
1`` features (``addmm``, at full float32 precision: :func:`knn_screen.full_precision`), so,
whatever the summation order, ``|key_t + ||phi(q)||^2 - ||phi(q) - phi(t)||^2| <=
gamma32_(F + 2) M'^2`` with ``M' = ||phi(q)|| + max_t ||phi(t)||`` (as in
:mod:`kmnist_torch.models.knn_screen`).

**The search.** For a test image ``q``: split the training images into ``G`` runs of
consecutive indices and take the one of smallest screen value in each, then the ``max(k,
FIRST_EXACT)`` of those of smallest screen value (any ``k`` or more distinct images would do);
compute their exact squared distances (integers, exact in float32 as
:mod:`kmnist_torch.models.knn` explains) and let ``U`` be the k-th smallest, rounded up. Those
``k`` images lie within ``U``, so the true k-th distance ``d_k <= U``, and every training image
``t`` with ``||q - t|| <= U`` (the true k nearest, and every image tied with the k-th, among
them) has

    key_t <= (U + eta M)^2 + 2 gamma32_(F + 3) M'^2 - ||phi(q)||^2 =: T_q

(twice the rounding bound, for margin; ``T_q`` computed in float64 and rounded up to float32).
Every training image with ``key_t <= T_q`` is a *survivor* and gets its exact distance; an image
that is not is farther than ``U >= d_k``, so it is neither one of the k nearest nor tied with
the k-th. Choosing the k smallest survivors by (exact distance, index) is therefore choosing
them among all training images, ties at the k-th distance included: the same answer as the
plain scan. A test image with more than ``n_train / SURVIVOR_SHARE`` survivors (the bound was
too weak for it) is scored against every training image by the plain scan instead.

The exact step gathers each test image's survivors (about 125 on KMNIST-like images) and
takes one matrix-vector product per feature block; the screen itself is one thin matrix product
per batch of test images and block of training columns (:func:`column_spans`: blocks of whole
runs, so each block gives its runs' first candidates); the first candidates are a NumPy argmin
per run, then an argpartition for the best-screened of them, the survivors a torch comparison
and a NumPy list of positions (:func:`survivors`)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .knn_screen import EXACT_BLOCK, gamma

# Principal directions kept (d); the screen has d + 1 features. More make the product longer
# and leave fewer survivors (directions from 1,024 images): per test image 137 with 160 against
# 288 with 128 at KMNIST size, 190 against 442 at K49 size. With one lane (LANES) 160 did best
# at KMNIST size. With two, whose NumPy steps and exact step run beside the other's product,
# fewer pay: on the 2-core AMD EPYC, three interleaved runs each, 136, 144 and 152 took 4.7-5.1
# s alike against 5.3 s for 160; at K49 size (8,000 test images) 144 took 14.2-15.0 s against
# 15.1-16.4 s for 160.
DIMS = 144
# Training images the directions are computed from (evenly spaced). Better directions leave
# fewer survivors: at KMNIST size 100 a test image from 4,096 against 137 from 1,024 (89 from
# 16,384, whose set-up took 0.3 s more), the exact step 1.3 s against 1.7-2.1 s. Wider images
# use fewer (:func:`sample_rows`): the directions come from the eigenvectors of the smaller of
# two Gram matrices, sample x sample or pixels x pixels.
SAMPLE_ROWS = 4096
SAMPLE_MIN_ROWS = 1024
SAMPLE_ELEMENTS = 2**22
# Runs of training indices whose best-screened images are the first candidates, and how many
# of those (the best-screened) get an exact distance for the threshold: at KMNIST size the
# 4th-nearest of 12 left 125 survivors a test image where all 32 left 123 (8: 135), and the
# exact distances of the first candidates had cost 0.68 s of one core's 8.8 s.
GROUPS = 32
FIRST_EXACT = 12
# Survivor rows gathered at a time by the exact step: their float32 copy (6 MiB at 784 pixels)
# stays in the cache for the products that read it. At KMNIST size 2**11 rows took 8.3-9.1 s
# where 2**14 took 11.7-12.5 s (2-core AMD EPYC).
EXACT_ROWS = 2**11
# A test image with more than n_train / SURVIVOR_SHARE survivors is scored by the plain scan.
SURVIVOR_SHARE = 8
# Test images a batch (at most), and elements of the (test batch x train) screen-value matrices
# of all lanes together (float32: 256 MiB, with 64 MiB of survivor masks). A thin product runs
# nearer its peak with more test images: on the 2-core AMD EPYC, best of 4 interleaved at
# KMNIST size, 8.65 s with 559 a batch against 10.1 s with 139; at K49 size (3,000 test
# images, column blocks) 14.7 s with 288 against 15.5 s with 144 (one lane, before LANES).
SCREEN_BATCH = 560
SCREEN_ELEMENTS = 2**26
# Batches screened at once, each in a thread of its own with buffers of its own (PcaScreen.lane):
# NumPy's steps (first candidates, survivor lists) and the exact step's small products run on
# one core, so a second batch keeps the other core busy meanwhile. SCREEN_ELEMENTS is shared
# out among them. On the 2-core AMD EPYC at KMNIST size: 5.0-5.4 s against 6.2-6.3 s in one.
LANES = 2
# Rows at a time when computing features: their float64 copy (3 MiB at 784 pixels) stays in the
# cache for the product that reads it. At K49 size (232,365 images) on the 2-core AMD EPYC,
# 512 rows took 2.0 s where 8,192 took 4.1 s.
FEATURE_ROWS = 512
# Widest block of training columns one product writes (a power of two's share of the GROUPS
# runs each): a thin product whose output rows run 232,365 floats long (K49 size) ran at 40-50
# GFLOP/s on the 2-core AMD EPYC, against 77-81 for rows of 60,000 (KMNIST size).
BLOCK_COLUMNS = 2**16
# float64 unit roundoff.
U64 = 2.0**-53


def gamma64(n: int) -> float:
    """Higham's ``gamma_n`` for float64."""
    return n * U64 / (1 - n * U64)


def sample_rows(width: int) -> int:
    """Training images the directions come from, for images of ``width`` pixels: up to
    ``SAMPLE_ROWS``, as many as hold ``SAMPLE_ELEMENTS`` pixels, and at least
    ``SAMPLE_MIN_ROWS`` (784 pixels: 4,096; 4,096 pixels: 1,024, so a KKanji screen still
    solves a 1,024 x 1,024 eigenproblem rather than a 4,096 x 4,096 one)."""
    return min(SAMPLE_ROWS, max(SAMPLE_MIN_ROWS, SAMPLE_ELEMENTS // max(1, width)))


def applies(n_train: int, n_features: int, k: int) -> bool:
    """Whether the screen can run: enough training images for its ``GROUPS`` first candidates,
    ``k`` at most ``GROUPS`` (the threshold is the k-th of those candidates) and at least two
    features per image."""
    return n_train >= GROUPS and k <= GROUPS and n_features >= 2


class PcaScreen:
    """The training images' projected features, ready to screen batches of test images.

    ``train``: N x D CPU tensor of integers in [0, 255]. ``dims``: principal directions kept
    (at most D - 1)."""

    def __init__(self, train: torch.Tensor, dims: int = DIMS) -> None:
        n, width = train.shape
        d = max(1, min(dims, width - 1))
        rows = sample_rows(width)
        step = max(1, n // rows)
        sample = train[::step][:rows].to(torch.float64)
        self.mean = sample.mean(dim=0)
        self.basis = _basis(sample - self.mean, d)
        eye = torch.eye(d, dtype=torch.float64)
        # Each computed entry of V^T V errs by at most gamma64_D (unit columns): d^2 entries.
        e = float((self.basis.T @ self.basis - eye).norm()) + 2 * d * gamma64(width + d)
        self.eta = (
            math.sqrt(2.1 * e + 4 * gamma64(width + d + 2) * math.sqrt(d + 1))
            + e
            + 4 * gamma64(width) * math.sqrt(d)
            + 2.0**-23
        )
        # The exact step's copy of the rows: shifted to [-128, 127] (as knn shifts them). For a
        # byte b, b - 128 as a signed byte has the bits of b with the top bit flipped.
        self.rows8 = train.to(torch.uint8).view(torch.int8).bitwise_xor(-128).contiguous()
        self.phi, c_norm = self.features(train)
        sq = self.phi.to(torch.float64).square().sum(dim=1)
        self.phi_sq = sq.to(torch.float32)
        self.phi_max = float(sq.max().sqrt())
        self.c_max = float(c_norm.max())
        self.n_feat = self.phi.shape[1]
        self.spans = column_spans(n)
        self.phi_t = [self.phi[a:b].T.contiguous() for a, b in self.spans]
        self.sq64 = train_sq64(self.rows8)
        self._key = torch.empty(0, dtype=torch.float32)
        # The survivors' mask, reused from batch to batch (see keys).
        self._below = np.empty(0, dtype=bool)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``phi`` (float32, N x (d + 1)) and ``||c||`` (float64) of each row of ``x``."""
        phis, norms = [], []
        for lo in range(0, x.shape[0], FEATURE_ROWS):
            c = x[lo : lo + FEATURE_ROWS].to(torch.float64) - self.mean
            y = c @ self.basis
            c_norm = torch.linalg.vector_norm(c, dim=1)
            r = (c_norm.square() - y.square().sum(dim=1)).clamp_(min=0.0).sqrt_()
            phis.append(torch.cat([y, r[:, None]], dim=1).to(torch.float32))
            norms.append(c_norm)
        return torch.cat(phis), torch.cat(norms)

    def lane(self) -> PcaScreen:
        """A copy that shares the training images' features and has buffers of its own, for
        screening in a second thread (one lane per thread)."""
        twin = copy.copy(self)
        twin._key = torch.empty(0, dtype=torch.float32)
        twin._below = np.empty(0, dtype=bool)
        return twin

    def keys(self, query: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:
        """Screen values of the byte rows ``query``, a B x (stop - start) float32 NumPy block
        per span of training columns (:func:`column_spans`), and the float64 parts of their
        thresholds: per row ``(||phi(q)||^2, eta M, 2 gamma M'^2)``. The blocks are views of a
        buffer the next call overwrites (``settle`` is done with them by then). The caller
        holds :func:`knn_screen.full_precision` (set once for every lane: the setting is the
        process's, so a lane restoring it could undo another's); without it (a CPU's bf16
        units could compute the product) this refuses to run rather than break the bound."""
        if torch.get_float32_matmul_precision() != "highest":
            raise RuntimeError(
                "PcaScreen.keys needs full float32 matrix products: call it under "
                "knn_screen.full_precision() (kneighbors does)"
            )
        q_phi, q_c = self.features(query)
        # One buffer for every batch: a fresh matrix per batch costs its page faults
        # again each time (measured: 4.1 s against 2.6 s for the products at KMNIST size).
        b, n = len(query), len(self.phi_sq)
        if len(self._key) < b * n:
            self._key = torch.empty(b * n, dtype=torch.float32)
        blocks = []
        for (lo, hi), phi_t in zip(self.spans, self.phi_t):
            out = self._key[b * lo : b * hi].view(b, hi - lo)
            torch.addmm(self.phi_sq[None, lo:hi], q_phi, phi_t, alpha=-2.0, out=out)
            blocks.append(out.numpy())
        q_sq = q_phi.to(torch.float64).square().sum(dim=1)
        m = q_c + self.c_max
        m_phi = q_sq.sqrt() + self.phi_max
        parts = torch.stack(
            [q_sq, self.eta * m, 2 * gamma(self.n_feat + 3) * m_phi.square()], dim=1
        )
        return blocks, parts.numpy()

    def masks(self, b: int) -> list[np.ndarray]:
        """Bool buffers shaped as :meth:`keys`'s blocks for ``b`` test images, reused."""
        n = len(self.phi_sq)
        if len(self._below) < b * n:
            self._below = np.empty(b * n, dtype=bool)
        return [self._below[b * lo : b * hi].reshape(b, hi - lo) for lo, hi in self.spans]

    @staticmethod
    def thresholds(parts: np.ndarray, kth_sq: np.ndarray) -> np.ndarray:
        """``T_q`` (float32, rounded up) from :meth:`keys`'s parts and the exact k-th squared
        distance among the first candidates."""
        u = np.sqrt(kth_sq.astype(np.float64)) * (1 + 2.0**-50)
        t64 = (u + parts[:, 1]) ** 2 + parts[:, 2] - parts[:, 0]
        t32 = t64.astype(np.float32)
        low = t32.astype(np.float64) < t64
        t32[low] = np.nextafter(t32[low], np.float32(np.inf))
        return t32


def column_spans(n: int) -> list[tuple[int, int]]:
    """(start, stop) of the blocks of training columns each screen product writes: ``GROUPS``
    runs of ``n // GROUPS`` columns shared out evenly over the fewest blocks (a power of two)
    of at most ``BLOCK_COLUMNS`` columns where that can be; the last block takes the columns
    left over."""
    width, parts = n // GROUPS, 1
    while parts < GROUPS and n > parts * BLOCK_COLUMNS:
        parts *= 2
    per = GROUPS // parts * width
    return [(j * per, n if j == parts - 1 else (j + 1) * per) for j in range(parts)]


def first_candidates(
    blocks: list[np.ndarray], spans: list[tuple[int, int]], keep: int = GROUPS
) -> np.ndarray:
    """Per row, the index of the smallest screen value in each of ``GROUPS`` runs of
    ``n // GROUPS`` consecutive columns, from the blocks of :meth:`PcaScreen.keys` (each holds
    ``GROUPS / len(blocks)`` whole runs); of those, the ``keep`` of smallest screen value
    (B x min(keep, GROUPS) int64, distinct within a row; in run order when all are kept, else
    in no particular order)."""
    width = spans[-1][1] // GROUPS
    per = GROUPS // len(spans)
    best, value = [], []
    for key, (lo, _) in zip(blocks, spans):
        head = key[:, : width * per].reshape(key.shape[0], per, width)
        at = head.argmin(axis=2)
        best.append(at + lo + np.arange(per) * width)
        value.append(np.take_along_axis(head, at[:, :, None], axis=2)[:, :, 0])
    index = np.concatenate(best, axis=1)
    if keep >= GROUPS:
        return index
    pick = np.argpartition(np.concatenate(value, axis=1), keep - 1, axis=1)[:, :keep]
    return np.take_along_axis(index, pick, axis=1)


def survivors(
    blocks: list[np.ndarray],
    spans: list[tuple[int, int]],
    limit: np.ndarray,
    k: int,
    masks: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows the screen settles (a bool per row: at least ``k`` and at most
    ``n / SURVIVOR_SHARE`` survivors) and the settled rows' survivors as (row among the
    settled, column), ordered by row, then column. ``masks``: bool buffers shaped as
    ``blocks``.

    The comparison runs in torch (on every core), then NumPy lists the survivors' positions
    and counts them per row from those. Where the whole batch has more survivors than its rows
    may settle, the rows with too many are dropped first (a count per row), so the positions
    listed never exceed ``B * n / SURVIVOR_SHARE``."""
    bound = torch.from_numpy(limit)[:, None]
    for key, mask in zip(blocks, masks):
        torch.le(torch.from_numpy(key), bound, out=torch.from_numpy(mask))
    b, n = len(limit), spans[-1][1]
    cap = max(k, n // SURVIVOR_SHARE)
    if sum(np.count_nonzero(m) for m in masks) <= b * cap:
        seen = np.arange(b)
    else:
        seen = np.flatnonzero(sum(np.count_nonzero(m, axis=1) for m in masks) <= cap)
    rows, cols = [], []
    for mask, (lo, hi) in zip(masks, spans):
        row, col = np.divmod(np.flatnonzero(mask if len(seen) == b else mask[seen]), hi - lo)
        rows.append(seen[row])
        cols.append(col + lo)
    row, col = np.concatenate(rows), np.concatenate(cols)
    counts = np.bincount(row, minlength=b)
    ok = (counts >= k) & (counts <= cap)
    keep = ok[row]
    # Numbered among the settled rows.
    row, col = (np.cumsum(ok) - 1)[row[keep]], col[keep]
    if len(spans) > 1:  # block by block: by row, keeping each row's columns ascending
        order = np.argsort(row, kind="stable")
        row, col = row[order], col[order]
    return ok, row, col


def settle(
    screen: PcaScreen,
    query: torch.Tensor,
    query_blocks: list[torch.Tensor],
    query_sq: torch.Tensor,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Screen one batch of test images (``query``: B x D bytes; its shifted float32 feature
    blocks and integer squared norms as :mod:`kmnist_torch.models.knn` prepares them), under
    :func:`knn_screen.full_precision` (:meth:`PcaScreen.keys` refuses otherwise). Returns
    which rows are settled (bool per row) and, for those rows, the k smallest rank keys
    ``||t||^2 - 2 q.t`` (int64) and their training indices, sorted by (key, index)."""
    blocks, parts = screen.keys(query)  # the caller holds knn_screen.full_precision()
    first = first_candidates(blocks, screen.spans, max(k, FIRST_EXACT))
    first_keys = screen.sq64[first] - 2 * _first_dots(screen.rows8, query_blocks, first)
    kth = np.partition(first_keys, k - 1, axis=1)[:, k - 1]
    limit = screen.thresholds(parts, kth + query_sq.numpy().astype(np.int64))
    ok, row, col = survivors(blocks, screen.spans, limit, k, screen.masks(len(query)))
    counts = np.bincount(row, minlength=int(ok.sum()))
    starts = np.concatenate([[0], np.cumsum(counts)])
    queries = [q[torch.from_numpy(ok)] for q in query_blocks]
    dots = _exact_dots(screen.rows8, queries, col, starts, EXACT_ROWS)
    exact = screen.sq64[col] - 2 * dots
    # By row, then exact key, then column: each row's first k are its k nearest.
    order = by_row_key_column(row, exact, col)
    pick = order[starts[:-1, None] + np.arange(k)]
    return ok, exact[pick], col[pick]


def train_sq64(rows8: torch.Tensor) -> np.ndarray:
    """``||t||^2`` (int64) of each shifted training row: the same integers as the plain scan's
    squared norms. Summed in float32 a block of rows and of at most ``EXACT_BLOCK`` columns at
    a time: each square is at most 128 * 128, so every partial sum of a block stays within
    2**24, exact in float32 in any order (ten times faster than int32 squares summed as int64
    on the 2-core AMD EPYC)."""
    out = np.zeros(rows8.shape[0], dtype=np.int64)
    for lo in range(0, rows8.shape[0], FEATURE_ROWS):
        part = out[lo : lo + FEATURE_ROWS]
        for c in range(0, rows8.shape[1], EXACT_BLOCK):
            block = rows8[lo : lo + FEATURE_ROWS, c : c + EXACT_BLOCK].to(torch.float32)
            part += block.square_().sum(dim=1).to(torch.int64).numpy()
    return out


def by_row_key_column(
    row: np.ndarray, key: np.ndarray, col: np.ndarray, fits: int = 2**62
) -> np.ndarray:
    """Positions ordered by (row, key, column), for ``row`` and then ``col`` ascending as given
    (int64 arrays). One stable sort of a combined int64 (row, key) where it stays below
    ``fits``, else a lexsort: the same order."""
    if len(key) == 0:
        return np.arange(0)
    low = int(key.min())
    span = int(key.max()) - low + 1
    if (int(row[-1]) + 1) * span < fits:
        return np.argsort(row * span + (key - low), kind="stable")
    return np.lexsort((col, key, row))


def _exact_dots(
    rows8: torch.Tensor,
    queries: list[torch.Tensor],
    col: np.ndarray,
    starts: np.ndarray,
    max_rows: int,
) -> np.ndarray:
    """``q_i . t_c`` (int64) for every survivor: the rows ``col[starts[i]:starts[i + 1]]``
    for query ``i``. Training rows (``rows8``: shifted to [-128, 127], one byte each, a
    quarter of the memory traffic of float32 rows) are gathered a chunk of queries at a time
    (at most ``max_rows`` rows, or one query's) into reused buffers, made float32, then one
    matrix-vector product per query and feature block, written in place (one call a query:
    at KMNIST size 62-83 ms a batch of 559 test images against 88-107 ms with a product, a
    conversion and a sum per query): each block's products are integers within 2**24, exact
    in float32 in any order, summed over the blocks as int64."""
    dots = np.zeros(len(col), dtype=np.int64)
    widths = [q.shape[1] for q in queries]
    n_q = len(starts) - 1
    most = int(np.diff(starts).max()) if n_q else 0
    size = min(len(col), max(max_rows, most))
    raw = torch.empty(size, rows8.shape[1], dtype=torch.int8)
    buffer = torch.empty(size, rows8.shape[1], dtype=torch.float32)
    part = torch.empty(size, dtype=torch.float32)
    index = torch.from_numpy(col)
    i = 0
    while i < n_q:
        j = int(np.searchsorted(starts, starts[i] + max_rows, side="right")) - 1
        j = min(max(j, i + 1), n_q)
        lo, hi = int(starts[i]), int(starts[j])
        torch.index_select(rows8, 0, index[lo:hi], out=raw[: hi - lo])
        rows = buffer[: hi - lo].copy_(raw[: hi - lo])
        for block, q in zip(rows.split(widths, dim=1), queries):
            for r in range(i, j):
                a, b = int(starts[r]) - lo, int(starts[r + 1]) - lo
                torch.mv(block[a:b], q[r], out=part[a:b])
            dots[lo:hi] += part[: hi - lo].numpy().astype(np.int64)
        i = j
    return dots


def _first_dots(rows8: torch.Tensor, queries: list[torch.Tensor], first: np.ndarray) -> np.ndarray:
    """``q_i . t_c`` (int64, B x G) for the training rows ``first`` (B x G: G first
    candidates) of each query: as :func:`_exact_dots`, but every query has the same number of
    rows, so a chunk of queries is one batched product per feature block rather than a product
    per query (KMNIST size, 4,480 test images, all 32 first candidates: 0.17 s against 0.40 s
    on the 2-core AMD EPYC)."""
    b, g = first.shape
    step = max(1, EXACT_ROWS // g)
    dots = torch.zeros(b, g, dtype=torch.int64)
    widths = [q.shape[1] for q in queries]
    raw = torch.empty(min(b, step) * g, rows8.shape[1], dtype=torch.int8)
    buffer = torch.empty(raw.shape, dtype=torch.float32)
    index = torch.from_numpy(first.reshape(-1))
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        n = (hi - lo) * g
        torch.index_select(rows8, 0, index[lo * g : hi * g], out=raw[:n])
        rows = buffer[:n].copy_(raw[:n]).view(hi - lo, g, -1)
        for block, q in zip(rows.split(widths, dim=2), queries):
            dots[lo:hi] += torch.bmm(block, q[lo:hi, :, None])[:, :, 0].to(torch.int64)
    return dots.numpy()


def _basis(centred: torch.Tensor, d: int) -> torch.Tensor:
    """D x d float64 with orthonormal columns spanning the top ``d`` principal directions of
    ``centred`` (from the eigenvectors of the smaller of its two Gram matrices), filled up
    with fixed pseudo-random directions where the sample spans fewer; a QR makes the columns
    orthonormal to float64 precision. Deterministic, and the caller's random stream is left
    as it was (a forked generator)."""
    rows, width = centred.shape
    if rows >= width:
        # float64: float32 would save 0.14 s at KMNIST size, but LAPACK's float32 eigh
        # failed to converge on the Gram matrix of two-level 8 x 8 images (a Hypothesis
        # example).
        _, vecs = torch.linalg.eigh(centred.T @ centred)
        top = vecs.flip(1)[:, :d]
    else:
        vals, vecs = torch.linalg.eigh(centred @ centred.T)
        keep = vals.flip(0)[:d] > 0
        top = (centred.T @ vecs.flip(1)[:, :d])[:, keep]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        extra = torch.randn(width, max(0, d - top.shape[1]), dtype=torch.float64)
    return torch.linalg.qr(torch.cat([top, extra], dim=1)).Q.contiguous()
