"""The upstream 4-nearest-neighbour baseline, on the GPU when there is one.

Upstream scores scikit-learn's ``KNeighborsClassifier(n_neighbors=4, weights="distance")`` on the
raw flattened uint8 pixels. :func:`knn_predict` gives the same predictions: the same exact
Euclidean distances, the same neighbours, the same weights and the same vote, batched over the
test images so memory stays bounded. One exception: where training images tie at the k-th
smallest distance we keep the lowest indices, while scikit-learn picks among them in the order
of its internal partition (rare on real images; seen on random images of a few grey levels).

How the distances stay exact in float32: pixels shifted to ``[-128, 127]`` leave every
difference (so every distance) unchanged, and the dot product of two such rows is an integer of
magnitude at most ``128 * 128 * 1024 = 2**24`` for up to 1024 features, as is every partial sum
of it in any summation order, and float32 holds every integer up to ``2**24`` exactly. Wider
images are cut into 1024-feature blocks whose products are summed as integers. Values in
``[-128, 127]`` are also exact in TF32 and bfloat16 and those modes accumulate in float32, so a
global TF32 setting cannot change the result either.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Union

import numpy as np
import torch

from ..settings import Progress
from . import knn_pca, knn_screen

ArrayLike = Union[np.ndarray, torch.Tensor]

WEIGHTS = ("distance", "uniform")

# Largest feature block whose shifted-integer dot products are exact in float32 (see knn_screen).
EXACT_BLOCK = knn_screen.EXACT_BLOCK

# Elements of one (test batch x train) matrix when ``batch_size`` is not given: a float32 and
# an int32 one live at once, 64 MiB each on a CPU (larger batches make the matrix product more
# efficient there) and 512 MiB each on a GPU.
_AUTO_ELEMENTS = {"cuda": 2**27, "cpu": 2**24}

# Training images per test image given an exact distance after the screen (kneighbors). 0: no
# screen. On the 2-core AVX2 development machine the screen (one 245-feature product, a top-k,
# then gathered rows) measured slower than the one 784-feature product it replaces: under load
# the gathered rows cost far more than their share of the product.
DEFAULT_CANDIDATES = 0

# Whether the projection screen (knn_pca) runs when ``screen`` is not given: on a CPU, from
# SCREEN_MIN_TRAIN training and SCREEN_MIN_TEST test images (below them its set-up, the
# training images' features, is a large share of the work). On the 2-core AMD EPYC development
# machine under a load of 5-6, one run each: KMNIST size (60,000 / 10,000) 37.0 s against the
# plain scan's 51.2 s (scikit-learn 124.0 s), K49 size (232,365 / 2,000) 56.2 s against 88.2 s;
# at 8,000 / 500 real images it took 2.4 s where scikit-learn took 0.9 s. On 4,096-pixel KKanji
# images (16,000 / 2,000) it was slower than the plain scan (41.6 s against 16.9 s: a 4,096 x
# 128 float64 projection per training image with the 128 directions of then, a 4,096-pixel row
# per survivor), hence SCREEN_MAX_FEATURES.
DEFAULT_SCREEN = True
SCREEN_MIN_TRAIN = 50_000
SCREEN_MIN_TEST = 1_000
SCREEN_MAX_FEATURES = 1024


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def knn_predict(
    train_images: ArrayLike,
    train_labels: ArrayLike,
    test_images: ArrayLike,
    k: int = 4,
    weights: str = "distance",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    candidates: int | None = None,
    progress: bool | None = None,
    screen: bool | None = None,
) -> torch.Tensor:
    """Predict the class of each test image by its ``k`` nearest training images.

    Equals scikit-learn's ``KNeighborsClassifier(n_neighbors=k, weights=weights).fit(train,
    labels).predict(test)`` on the flattened images (brute force, Euclidean):

    - distances are exact for images of integers in ``[0, 255]`` (any dtype); other inputs use
      float64 as scikit-learn does, so they agree up to float64 rounding;
    - among training images tied at the k-th distance the lower indices are the neighbours, as
      scikit-learn's pairwise-distance reduction (``ArgKmin``) chooses. scikit-learn sends
      integer arrays down an older path instead, whose ``np.argpartition`` picks among such ties
      in an order that depends on the NumPy build; away from such ties the two agree exactly;
    - ``weights="distance"`` weighs a neighbour by ``1 / distance``; where a test image is at
      distance 0 from some neighbours, those weigh 1 and the others 0, as in scikit-learn;
    - equal votes go to the smallest label.

    Args:
        train_images: N x ... array or tensor of training images (flattened per image).
        train_labels: N integer labels.
        test_images: M x ... array or tensor of the images to classify.
        k: how many neighbours vote.
        weights: ``"distance"`` (1 / distance) or ``"uniform"``.
        batch_size: test images scored at a time (default: as many as keep one distance
            matrix near 64 MiB on a CPU, 512 MiB on a GPU); the projection screen shares
            them out among its threads (``knn_pca.LANES``).
        device: where the distances are computed (default: CUDA when available).
        candidates: training images per test image given an exact distance after the
            screen (see :func:`kneighbors`; 0: no screen). Never changes the answer.
        progress: a progress line on stderr (default: on long runs).
        screen: the projection screen (see :func:`kneighbors`); ``False``: the plain scan.
            Never changes the answer.

    Returns:
        A CPU int64 tensor of M predicted labels.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    classes, encoded = _labels(train_labels, _num_rows(train_images))
    neigh_dist, neigh_ind = kneighbors(
        train_images, test_images, k, batch_size, device, candidates, progress, screen
    )
    neigh_labels = encoded[neigh_ind]
    votes = _votes(neigh_dist, neigh_labels, len(classes), weights)
    # argmax returns the first of equal maxima: the smallest label, as scikit-learn.
    return classes[votes.argmax(dim=1)]


def kneighbors(
    train_images: ArrayLike,
    test_images: ArrayLike,
    k: int = 4,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    candidates: int | None = None,
    progress: bool | None = None,
    screen: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest training images of each test image: ``(distances, indices)``, both
    test x k CPU tensors (float64 Euclidean distances, int64 indices), sorted by distance and
    then index. The same neighbours and distances as scikit-learn's ``kneighbors`` (see
    :func:`knn_predict` on ties), whose order among equal distances is unspecified.

    With ``candidates`` (say 256; default ``DEFAULT_CANDIDATES``, 0: none) byte-valued images
    are first screened (:mod:`kmnist_torch.models.knn_screen`): a provable lower bound on
    every distance, from 245 numbers per 28 x 28 image, picks that many training images per
    test image and only those get an exact distance, unless the bound cannot rule out the
    rest, in which case that test image is scored against all. The answer is the same either
    way; only the time differs. ``progress``: a progress line on long runs (default: when
    test x train exceeds 2**30 pairs).

    ``screen``: the projection screen of :mod:`kmnist_torch.models.knn_pca` (``None``: on a
    CPU for byte-valued images from ``SCREEN_MIN_TRAIN`` / ``SCREEN_MIN_TEST`` images of at
    most ``SCREEN_MAX_FEATURES`` pixels; ``True``: for any byte-valued images on a CPU; never for
    ``k`` over ``knn_pca.GROUPS``, 32). The
    answer is the same; only the time differs. ``candidates`` runs the older screen instead."""
    dev = torch.device(device) if device is not None else default_device()
    train = _as_matrix(train_images, "train_images")
    test = _as_matrix(test_images, "test_images")
    n_train = _check_shapes(train, test, k)
    given_batch, batch_size = batch_size, _batch_size(batch_size, dev, n_train)
    exact = _is_byte_valued(train) and _is_byte_valued(test)
    count = DEFAULT_CANDIDATES if candidates is None else candidates
    if count < 0:
        raise ValueError(f"candidates must be 0 or more, got {count}")
    if test.shape[0] == 0:  # nothing to score: no set-up for either screen or the scan
        return torch.empty(0, k, dtype=torch.float64), torch.empty(0, k, dtype=torch.int64)
    count = max(count, k) if exact and count and count < n_train and train.shape[1] >= 16 else 0
    # Integer ranks: |t.t| and 2|q.t| are each at most 128 * 128 * D, so int32 holds the rank
    # keys below up to D = 43,690 features; wider images use int64.
    int_dtype = torch.int32 if 3 * 128 * 128 * train.shape[1] < 2**31 else torch.int64
    ctx = _Context(train, exact, int_dtype, dev, k)
    if count:
        layout = knn_screen.image_layout(tuple(torch.as_tensor(train_images).shape[1:]))
        ctx.screen = knn_screen.Screen(train, layout, dev)
    if count == 0 and _wants_pca(screen, train, test.shape[0], ctx):
        ctx.pca = knn_pca.PcaScreen(train)
        # No more lanes than intra-op threads: a search told to use one core uses one.
        ctx.lanes = max(1, min(knn_pca.LANES, torch.get_num_threads()))
        fits = min(knn_pca.SCREEN_BATCH, knn_pca.SCREEN_ELEMENTS // (ctx.lanes * n_train))
        # A given batch is what the lanes hold in all.
        ctx.pca_batch = max(1, given_batch // ctx.lanes) if given_batch else max(1, fits)
    shown = progress if progress is not None else test.shape[0] * n_train > 2**30
    with Progress("4-NN", test.shape[0], unit="test image", enabled=shown) as bar:
        return _search(ctx, test, count, batch_size, bar)


def _check_shapes(train: torch.Tensor, test: torch.Tensor, k: int) -> int:
    """The number of training images, once train and test rows match and ``k`` fits them."""
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train images have {train.shape[1]} features but test images have {test.shape[1]}"
        )
    n_train = train.shape[0]
    if n_train == 0:
        raise ValueError("train_images is empty")
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be between 1 and the {n_train} training images, got {k}")
    return n_train


def _batch_size(batch_size: int | None, dev: torch.device, n_train: int) -> int:
    """Test images per batch: as given (at least 1), else as many as fill the budget."""
    if batch_size is None:
        budget = _AUTO_ELEMENTS["cuda" if dev.type == "cuda" else "cpu"]
        batch_size = max(1, budget // n_train)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size


def _wants_pca(screen: bool | None, train: torch.Tensor, n_test: int, ctx: _Context) -> bool:
    """Whether the projection screen runs (see :func:`kneighbors`'s ``screen``)."""
    n_train, width = train.shape
    if not (ctx.exact and ctx.device.type == "cpu" and knn_pca.applies(n_train, width, ctx.k)):
        return False
    if screen is not None:
        return screen
    big = n_train >= SCREEN_MIN_TRAIN and n_test >= SCREEN_MIN_TEST
    return DEFAULT_SCREEN and big and width <= SCREEN_MAX_FEATURES


class _Context:
    """What every batch of a search needs: the training rows and how to score them. The
    training rows' copy for the plain scan (float32 blocks and squared norms: 1 s and 0.7 GB at
    K49 size) is made when first asked for; behind the projection screen it rarely is."""

    def __init__(self, train, exact, int_dtype, device, k) -> None:  # noqa: ANN001
        self.train, self.exact, self.int_dtype = train, exact, int_dtype
        self.device, self.k = device, k
        self.screen: knn_screen.Screen | None = None
        self.pca: knn_pca.PcaScreen | None = None
        self.pca_batch = 1
        self.lanes = 1
        self._prepared: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def _rows(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._prepared is None:
            self._prepared = _prepare(self.train, self.exact, self.device, self.int_dtype)
        return self._prepared

    @property
    def blocks(self) -> list[torch.Tensor]:
        return self._rows()[0]

    @property
    def sq(self) -> torch.Tensor:
        return self._rows()[1]


def _search(
    ctx: _Context, test: torch.Tensor, count: int, batch_size: int, bar: Progress
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of every test row: screened where ``count``, then the hard rows
    (or all, without a screen) against every training image."""
    m, k = test.shape[0], ctx.k
    dists = torch.empty(m, k, dtype=torch.float64)
    inds = torch.empty(m, k, dtype=torch.int64)
    hard = torch.arange(m)
    if count:
        left = []
        for lo in range(0, m, batch_size):
            rows = torch.arange(lo, min(m, lo + batch_size))
            done = _screened_batch(ctx, test[rows], count, rows, dists, inds)
            left.append(rows[~done])
            bar.update(int(done.sum()))
        hard = torch.cat(left)
    if ctx.pca is not None:
        hard = _pca_phase(ctx, test, dists, inds, bar)
    for lo in range(0, len(hard), batch_size):
        rows = hard[lo : lo + batch_size]
        query_blocks, query_sq = _prepare(test[rows], ctx.exact, ctx.device, ctx.int_dtype)
        dot = None
        for q, t in zip(query_blocks, ctx.blocks):
            part = q @ t.T
            # On the byte path each block's products are exact integers in float32; they are
            # summed, and ranked, as integers so nothing rounds.
            part = part.to(ctx.int_dtype) if ctx.exact else part
            dot = part if dot is None else dot.add_(part)
        # Rank by ||t||^2 - 2 q.t: ||q||^2 is the same along a row, so it is added only to the
        # k distances kept.
        key, i = _smallest(dot.mul_(-2).add_(ctx.sq), k)
        dists[rows], inds[rows] = _distances(key, query_sq), i.cpu()
        bar.update(len(rows))
    return dists, inds


def _pca_phase(
    ctx: _Context, test: torch.Tensor, dists: torch.Tensor, inds: torch.Tensor, bar: Progress
) -> torch.Tensor:
    """Settle what the projection screen can; return the rows left for the plain scan. The
    batches run in ``ctx.lanes`` threads (``knn_pca.LANES``, or fewer where torch has fewer
    intra-op threads), each with a lane (buffers) of its own; their answers are stored, and
    the progress shown, here in the calling thread, in batch order."""
    assert ctx.pca is not None
    m, b = test.shape[0], ctx.pca_batch
    lanes: queue.SimpleQueue[knn_pca.PcaScreen] = queue.SimpleQueue()
    for i in range(ctx.lanes):
        lanes.put(ctx.pca if i == 0 else ctx.pca.lane())

    def job(rows: torch.Tensor) -> tuple[torch.Tensor, tuple[np.ndarray, ...]]:
        # One job per thread at a time, as many threads as lanes: a lane is always free.
        lane = lanes.get()
        try:
            query = test[rows]
            query_blocks, query_sq = _prepare(query, True, ctx.device, ctx.int_dtype)
            return query_sq, knn_pca.settle(lane, query, query_blocks, query_sq, ctx.k)
        finally:
            lanes.put(lane)

    batches = [torch.arange(lo, min(m, lo + b)) for lo in range(0, m, b)]
    left = []
    pool = ThreadPoolExecutor(ctx.lanes, thread_name_prefix="kmnist-knn")
    # Full float32 precision is the process's setting: set here once, not per lane.
    with knn_screen.full_precision():
        try:
            for rows, answer in zip(batches, [pool.submit(job, rows) for rows in batches]):
                query_sq, (ok, keys, index) = answer.result()
                done = torch.from_numpy(ok)
                dists[rows[done]] = _distances(torch.from_numpy(keys), query_sq[done])
                inds[rows[done]] = torch.from_numpy(index)
                left.append(rows[~done])
                bar.update(int(done.sum()))
        finally:  # on an error or Ctrl-C: no batch starts; the running ones end
            pool.shutdown(wait=True, cancel_futures=True)
    return torch.cat(left) if left else torch.arange(0)


def _screened_batch(
    ctx: _Context,
    query: torch.Tensor,
    count: int,
    rows: torch.Tensor,
    dists: torch.Tensor,
    inds: torch.Tensor,
) -> torch.Tensor:
    """Screen one batch; fill ``dists``/``inds`` at the rows the bound settles and return
    which those are (a CPU bool per row)."""
    assert ctx.screen is not None
    query_blocks, query_sq = _prepare(query, True, ctx.device, ctx.int_dtype)
    index, edge = ctx.screen.smallest(query, count)
    keys = knn_screen.exact_keys(query_blocks, ctx.blocks, ctx.sq, index)
    kth = keys.topk(ctx.k, dim=1, largest=False).values[:, -1] + query_sq
    done = ctx.screen.excluded(edge, kth)
    if bool(done.any()):
        # Among the candidates, the k smallest by (key, index), as _smallest orders them.
        order = index[done].sort(dim=1)
        ranked = keys[done].gather(1, order.indices)
        value, pos = ranked.sort(dim=1, stable=True)
        kept = done.cpu()
        dists[rows[kept]] = _distances(value[:, : ctx.k], query_sq[done])
        inds[rows[kept]] = order.values.gather(1, pos[:, : ctx.k]).cpu()
    return done.cpu()


def _distances(key: torch.Tensor, query_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (float64, CPU) from rank keys ``||t||^2 - 2 q.t`` and ``||q||^2``."""
    sq = key.to(torch.float64).add_(query_sq[:, None].to(torch.float64))
    # Clamped at 0 as scikit-learn does (the float path can round slightly below). NumPy's
    # square root is correctly rounded; torch's vectorised CPU one can be an ulp off, which
    # would make the weights differ from scikit-learn's in the last bit.
    return torch.from_numpy(np.sqrt(sq.clamp_(min=0.0).cpu().numpy()))


def _num_rows(x: ArrayLike) -> int:
    return int(x.shape[0]) if x.ndim else 0


def _as_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """N x D tensor view of N images of any shape (on the CPU or wherever it already is)."""
    t = torch.as_tensor(x)
    if t.ndim < 1:
        raise ValueError(f"{name} must be N images, got a scalar")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got {t.dtype}")
    t = t.reshape(t.shape[0], int(np.prod(t.shape[1:])))
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    return t


def _is_byte_valued(t: torch.Tensor) -> bool:
    """Whether every value is an integer in [0, 255], so the exact float32 path applies."""
    if t.dtype == torch.uint8:
        return True
    if t.numel() == 0:
        return True
    if t.is_floating_point() and not bool((t == t.round()).all()):
        return False
    return bool(t.min() >= 0) and bool(t.max() <= 255)


def _prepare(
    x: torch.Tensor, exact: bool, device: torch.device, int_dtype: torch.dtype
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rows on ``device`` ready for the dot products (feature blocks) and their squared norms:
    integers of ``int_dtype`` on the byte path, float64 otherwise."""
    if exact:
        # Shift to [-128, 127] (distances unchanged) so each block's dot products fit float32.
        # Block by block from the input, so the float32 copy exists once (the full KKanji
        # train part: 1.9 GB, not twice that while a whole shifted copy is cut into blocks),
        # and always a copy: float32 images given by the caller are never shifted in place.
        blocks = [
            x[:, s : s + EXACT_BLOCK]
            .to(device=device, dtype=torch.float32, copy=True)
            .sub_(128.0)
            .contiguous()
            for s in range(0, x.shape[1], EXACT_BLOCK)
        ]
        # Each block's row sum of squares is within 2**24 too, so exact in float32.
        sq = sum(b.square().sum(dim=1).to(int_dtype) for b in blocks)
        return blocks, sq
    x64 = x.to(device).to(torch.float64)
    return [x64], x64.square().sum(dim=1)


def _smallest(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` smallest values and their column indices, sorted by value then index;
    among values tied at the k-th place the lowest indices win (scikit-learn's ArgKmin)."""
    n = key.shape[1]
    values, index = torch.topk(key, min(k + 1, n), dim=1, largest=False, sorted=True)
    if k < n:
        # topk's choice among equal values is unspecified. A row needs care only when its
        # (k+1)-th smallest equals its k-th: redo those, keeping every smaller value and the
        # first ties by index.
        crowded = values[:, k] == values[:, k - 1]
        values, index = values[:, :k], index[:, :k].contiguous()
        if bool(crowded.any()):
            rows = crowded.nonzero().squeeze(1)
            sub, kth = key[rows], values[rows, k - 1 :]
            below = sub < kth
            tied = sub == kth
            room = k - below.sum(dim=1, keepdim=True)
            keep = below | (tied & (tied.cumsum(dim=1) <= room))
            # nonzero lists each row's kept columns in ascending order, exactly k per row.
            index[rows] = keep.nonzero()[:, 1].view(len(rows), k)
    # Order by (value, index): sort by index, then a stable sort by value.
    index = index.sort(dim=1).values
    values, order = key.gather(1, index).sort(dim=1, stable=True)
    return values, index.gather(1, order)


def _labels(labels: ArrayLike, n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct labels (int64, CPU) and each training label's index among them."""
    y = torch.as_tensor(labels).reshape(-1).cpu()
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"train_labels must be integers, got {y.dtype}")
    if len(y) != n_train:
        raise ValueError(f"{n_train} training images but {len(y)} labels")
    classes, encoded = torch.unique(y.long(), sorted=True, return_inverse=True)
    return classes, encoded


def _votes(
    dist: torch.Tensor, labels: torch.Tensor, num_classes: int, weights: str
) -> torch.Tensor:
    """Per test image, the summed weight of each class among its neighbours (float64).

    Done in NumPy with scikit-learn's own operations (test x k values, so cheap), so equal
    totals stay equal and the tie rule decides as it does there."""
    d = dist.numpy()
    if weights == "uniform":
        w = np.ones_like(d)
    else:
        with np.errstate(divide="ignore"):
            w = 1.0 / d
        # A neighbour at distance 0 would weigh infinity: scikit-learn then gives the
        # zero-distance neighbours weight 1 and the others 0, and so do we.
        inf = np.isinf(w)
        inf_rows = inf.any(axis=1)
        w[inf_rows] = inf[inf_rows]
    lab = labels.numpy()
    votes = np.zeros((d.shape[0], num_classes), dtype=np.float64)
    # Each class's total is summed as scikit-learn's weighted_mode sums it (the row with zeros
    # at the other classes' places, through np.sum), so totals match it to the last bit.
    for c in np.unique(lab):
        votes[:, c] = np.where(lab == c, w, 0.0).sum(axis=1)
    return torch.from_numpy(votes)
