"""The projection screen (kmnist_torch.models.knn_pca) never changes the 4-NN's answer: the
same neighbours, distances and tie order as the plain exact scan, on adversarial images (few
grey levels, so many equal distances; duplicates; all-zero images; queries equal to training
images; tiny projections; wide images), with the screen settling the test images itself rather
than handing them all to the plain scan."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnist_torch.models import knn, knn_pca, knn_screen
from kmnist_torch.models.knn import kneighbors, knn_predict


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small matrices: one thread (on a loaded 2-core machine two spin against each other)."""


@pytest.fixture
def medium_precision():
    """Float32 products allowed below full precision, as a user may set them (a CPU's bf16
    units could then run them), restored afterwards. The autouse ``_one_thread`` restores
    the thread count the same way."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def settled(monkeypatch):
    """Counts the test images the screen settles (the rest go to the plain scan)."""
    count = {"settled": 0, "screened": 0}
    real = knn_pca.settle
    lock = threading.Lock()  # batches are settled in knn_pca.LANES threads

    def spy(*args, **kwargs):
        ok, keys, index = real(*args, **kwargs)
        with lock:
            count["settled"] += int(ok.sum())
            count["screened"] += len(ok)
        return ok, keys, index

    monkeypatch.setattr(knn_pca, "settle", spy)
    return count


def _strokes(rng, n, shape=(28, 28), levels=256, parts=6):
    """Images built from a few shared stroke patterns plus sparse noise: structure the
    projection captures, so the bound is tight enough to settle most test images."""
    size = math.prod(shape)
    base = rng.integers(0, 2, (parts, size)) * rng.integers(40, 120, (parts, 1))
    mix = rng.random((n, parts)) < 0.5
    x = (mix @ base) + np.where(rng.random((n, size)) < 0.01, rng.integers(0, 60, (n, size)), 0)
    x = np.clip(x, 0, 255)
    if levels < 256:
        step = 255 // (levels - 1)
        x = (x // step) * step
    return x.astype(np.uint8).reshape(n, *shape)


def _same(a, b):
    assert torch.equal(a[1], b[1]), "indices differ"
    assert torch.equal(a[0], b[0]), "distances differ"


def test_equals_the_plain_scan_and_settles_most_test_images(settled):
    rng = np.random.default_rng(0)
    train, test = _strokes(rng, 1000, (20, 20)), _strokes(rng, 100, (20, 20))
    test[:3] = train[[5, 17, 999]]  # queries equal to training images (distance 0)
    train[100:110] = train[100]  # duplicates
    train[200], test[3] = 0, 0  # all-zero images
    plain = kneighbors(train, test, screen=False)
    _same(kneighbors(train, test, screen=True, batch_size=37), plain)
    assert settled["screened"] == 100
    assert settled["settled"] >= 90  # the screen, not the fallback, answered
    labels = rng.integers(0, 10, 1000)
    screened = knn_predict(train, labels, test, screen=True)
    assert torch.equal(screened, knn_predict(train, labels, test, screen=False))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([2, 3, 5, 256]),
    k=st.integers(1, 6),
    dims=st.sampled_from([1, 2, 7, 40]),
    share=st.sampled_from([1, knn_pca.SURVIVOR_SHARE]),
    exact_rows=st.sampled_from([1, 50, knn_pca.EXACT_ROWS]),
    block_columns=st.sampled_from([7, 45, knn_pca.BLOCK_COLUMNS]),
    n_train=st.sampled_from([160, 165, 191]),
    duplicates=st.booleans(),
)
def test_equals_the_plain_scan_on_adversarial_images(
    seed, levels, k, dims, share, exact_rows, block_columns, n_train, duplicates
):
    # share 1: every test image with at least k survivors is settled by the screen however
    # weak the bound, so the exact step over survivors is what is checked; few grey levels
    # give many exact ties at the k-th distance, which must go to the lowest indices.
    rng = np.random.default_rng(seed)
    # 165 and 191 training images: columns left over after the 32 runs, in the last block.
    train = _strokes(rng, n_train, (8, 8), levels=levels)
    test = _strokes(rng, 12, (8, 8), levels=levels)
    test[11] = train[-1]  # a query whose nearest image is the last, a left-over column
    if duplicates:
        train[40:80] = train[rng.integers(0, 40, 40)]
        test[:4] = train[rng.integers(0, n_train, 4)]
        train[7] = test[5] = 0
    plain = kneighbors(train, test, k=k, screen=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_pca, "SURVIVOR_SHARE", share)
        mp.setattr(knn_pca, "EXACT_ROWS", exact_rows)
        mp.setattr(knn_pca, "BLOCK_COLUMNS", block_columns)  # 7: 32 blocks; 45: 4
        mp.setattr(knn_pca.PcaScreen.__init__, "__defaults__", (dims,))
        _same(kneighbors(train, test, k=k, screen=True, batch_size=5), plain)


def test_ties_at_the_kth_distance_go_to_the_lowest_indices(monkeypatch, settled):
    # 30 training images at the same distance 10 from the query (one pixel of 10 each, at
    # different places), 2 nearer: the 4 neighbours are the 2 nearer and the 2 lowest-indexed
    # of the tied ones, as the plain scan (and scikit-learn's ArgKmin) choose.
    monkeypatch.setattr(knn_pca, "SURVIVOR_SHARE", 1)
    q = np.full((8, 8), 50, np.uint8)
    train = np.repeat(q[None], 40, 0)
    for i in range(40):
        r, c = divmod(i, 8)
        train[i, r, c] += 10 if i >= 2 else 3
    train[32:] = 200  # far away
    order = np.random.default_rng(1).permutation(40)
    train = train[order]
    plain = kneighbors(train, q[None], k=4, screen=False)
    screened = kneighbors(train, q[None], k=4, screen=True)
    _same(screened, plain)
    assert settled["settled"] == 1
    tied = sorted(int(np.flatnonzero(order == i)[0]) for i in range(2, 32))
    assert screened[1][0, 2:].tolist() == tied[:2]


def test_wide_images_are_exact_across_feature_blocks(settled):
    # 36 x 36 = 1,296 features: two exact blocks of at most 1,024.
    rng = np.random.default_rng(2)
    train, test = _strokes(rng, 200, (36, 36)), _strokes(rng, 20, (36, 36))
    test[0] = train[3]
    _same(kneighbors(train, test, screen=True), kneighbors(train, test, screen=False))
    assert settled["settled"] > 0


def test_the_features_bound_every_distance():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(_strokes(rng, 150).reshape(150, -1))
    x[:20] = torch.from_numpy(rng.integers(0, 256, (20, 784), dtype=np.uint8))  # off the plane
    for dims in (1, 16, 100):
        screen = knn_pca.PcaScreen(x, dims=dims)
        phi, c_norm = screen.features(x)
        lower = torch.cdist(phi.double(), phi.double())
        exact = torch.cdist(x.double(), x.double())
        slack = screen.eta * (c_norm[:, None] + c_norm[None, :])
        assert bool((lower <= exact + slack).all())
        assert screen.eta < 1e-5  # the rounding margin is small against pixel distances
    assert float((lower / exact.clamp(min=1)).mean()) > 0.5  # a bound that screens


def test_on_by_default_on_a_cpu_from_enough_images(monkeypatch, settled):
    rng = np.random.default_rng(4)
    train, test = _strokes(rng, 300), _strokes(rng, 20)
    state = torch.random.get_rng_state()
    kneighbors(train, test)
    assert settled["screened"] == 0  # below SCREEN_MIN_TRAIN: the plain scan
    monkeypatch.setattr(knn, "SCREEN_MIN_TRAIN", 300)
    monkeypatch.setattr(knn, "SCREEN_MIN_TEST", 21)
    kneighbors(train, test)
    assert settled["screened"] == 0  # below SCREEN_MIN_TEST
    monkeypatch.setattr(knn, "SCREEN_MIN_TEST", 20)
    kneighbors(train, test)
    assert settled["screened"] == 20
    kneighbors(train, test, screen=False)
    assert settled["screened"] == 20
    monkeypatch.setattr(knn, "SCREEN_MAX_FEATURES", 783)
    kneighbors(train, test)
    assert settled["screened"] == 20  # wider images than that: the plain scan
    monkeypatch.setattr(knn, "SCREEN_MAX_FEATURES", 784)
    monkeypatch.setattr(knn, "DEFAULT_SCREEN", False)
    kneighbors(train, test)
    assert settled["screened"] == 20
    # The basis comes from a forked, seeded generator: the caller's stream is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)


def test_non_byte_images_and_the_older_screen_bypass_it(settled):
    rng = np.random.default_rng(5)
    train, test = _strokes(rng, 100), _strokes(rng, 10)
    kneighbors(train / 255.0, test / 255.0, screen=True)  # not byte-valued: float64 scan
    kneighbors(train, test, screen=True, candidates=16)  # the older screen asked for
    assert settled["screened"] == 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(knn_pca.GROUPS, 5000), block=st.integers(1, 3000))
def test_column_spans_cover_the_columns_in_whole_runs(n, block):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_pca, "BLOCK_COLUMNS", block)
        spans = knn_pca.column_spans(n)
    width = n // knn_pca.GROUPS
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert knn_pca.GROUPS % len(spans) == 0
    per = knn_pca.GROUPS // len(spans) * width
    assert all(hi - lo == per for lo, hi in spans[:-1])
    # The fewest blocks (a power of two, at most GROUPS) of BLOCK_COLUMNS columns on average.
    parts = len(spans)
    assert parts == knn_pca.GROUPS or n <= parts * block
    assert parts == 1 or n > parts // 2 * block
    rng = np.random.default_rng(n)
    key = rng.random((3, n)).astype(np.float32)
    blocks = [key[:, lo:hi] for lo, hi in spans]
    whole = key[:, : width * knn_pca.GROUPS].reshape(3, knn_pca.GROUPS, width).argmin(axis=2)
    expect = whole + np.arange(knn_pca.GROUPS) * width
    assert np.array_equal(knn_pca.first_candidates(blocks, spans), expect)
    # Of those, the ones of smallest screen value (the values are distinct: random floats).
    keep = 1 + n % knn_pca.GROUPS
    values = np.take_along_axis(key, expect, axis=1)
    best = np.take_along_axis(expect, np.argsort(values, axis=1)[:, :keep], axis=1)
    kept = knn_pca.first_candidates(blocks, spans, keep)
    assert np.array_equal(np.sort(kept, axis=1), np.sort(best, axis=1))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(knn_pca.GROUPS, 400),
    block=st.sampled_from([7, 45, 2**16]),
    k=st.integers(1, 4),
    share=st.integers(1, 40),
    counts=st.lists(
        st.sampled_from(["k-1", "k", "cap", "cap+1", "all", "any"]), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**16),
)
def test_survivors_are_every_settled_rows_columns_within_the_limit(
    n, block, k, share, counts, seed
):
    # Against a row-by-row reference. Each row gets a chosen number of survivors (values at or
    # below its limit): at the edges k and n / share, or all, so that some batches have more
    # survivors than their rows may settle and the rows with too many are dropped before the
    # positions are listed (the other path).
    rng = np.random.default_rng(seed)
    b, cap = len(counts), max(k, n // share)
    sizes = {"k-1": k - 1, "k": k, "cap": cap, "cap+1": cap + 1, "all": n}
    limit = rng.integers(-3, 3, b).astype(np.float32)
    key = (limit[:, None] + rng.integers(1, 4, (b, n))).astype(np.float32)
    for r, c in enumerate(counts):
        size = min(n, sizes.get(c, int(rng.integers(0, n + 1))))
        pick = rng.choice(n, size, replace=False)
        key[r, pick] = limit[r] - rng.integers(0, 2, size)  # at the limit or below
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_pca, "BLOCK_COLUMNS", block)
        mp.setattr(knn_pca, "SURVIVOR_SHARE", share)
        spans = knn_pca.column_spans(n)
        blocks = [key[:, lo:hi].copy() for lo, hi in spans]
        masks = [np.ones((b, hi - lo), dtype=bool) for lo, hi in spans]
        ok, row, col = knn_pca.survivors(blocks, spans, limit, k, masks)
    expect_ok, expect = [], []
    for r in range(b):
        cols = np.flatnonzero(key[r] <= limit[r])
        expect_ok.append(k <= len(cols) <= cap)
        if expect_ok[-1]:
            expect += [(sum(expect_ok) - 1, int(c)) for c in cols]
    assert ok.tolist() == expect_ok
    assert list(zip(row.tolist(), col.tolist())) == expect


@settings(max_examples=40, deadline=None)
@given(
    width=st.sampled_from([3, 64, 1024, 1030, 2100]),
    b=st.integers(1, 9),
    g=st.integers(1, 5),
    exact_rows=st.sampled_from([1, 4, 7, knn_pca.EXACT_ROWS]),
    seed=st.integers(0, 2**16),
)
def test_exact_dots_are_the_integer_dot_products(width, b, g, exact_rows, seed):
    # Both ways of scoring gathered rows against bytes shifted to [-128, 127], chunked by
    # EXACT_ROWS and cut into feature blocks of at most 1,024 as knn prepares them (2,100: three
    # blocks), equal the int64 dot products: extreme values (every product 128 * 128) included.
    rng = np.random.default_rng(seed)
    rows8 = torch.from_numpy(rng.integers(-128, 128, (20, width), dtype=np.int8))
    rows8[0] = -128
    query = rng.integers(0, 256, (b, width), dtype=np.uint8)
    query[0] = 0
    blocks, _ = knn._prepare(torch.from_numpy(query), True, torch.device("cpu"), torch.int32)
    first = rng.integers(0, 20, (b, g))
    first[0, 0] = 0
    shifted = query.astype(np.int64) - 128
    expect = np.einsum("bgd,bd->bg", rows8.numpy()[first].astype(np.int64), shifted)
    counts = rng.integers(0, 6, b)
    counts[0] = max(1, counts[0])
    col = rng.integers(0, 20, int(counts.sum()))
    col[0] = 0  # -128s against the zero query: every product 128 * 128
    starts = np.concatenate([[0], np.cumsum(counts)])
    owner = np.repeat(np.arange(b), counts)
    flat = (rows8.numpy()[col].astype(np.int64) * shifted[owner]).sum(axis=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_pca, "EXACT_ROWS", exact_rows)
        assert np.array_equal(knn_pca._first_dots(rows8, blocks, first), expect)
    assert np.array_equal(knn_pca._exact_dots(rows8, blocks, col, starts, exact_rows), flat)


def test_survivors_of_rows_that_cannot_settle_are_never_listed():
    # Images all alike leave every training image a survivor: listing their positions would
    # take 8 bytes each (B x n int64, and twice that for rows and columns); the rows with too
    # many are dropped first, so memory stays far below that. tracemalloc sees NumPy's
    # allocations, not torch's: the positions must stay a NumPy listing for this to guard them.
    import tracemalloc

    b, n = 4, 2**16
    spans = knn_pca.column_spans(n)
    limit = np.zeros(b, dtype=np.float32)
    blocks = [np.zeros((b, hi - lo), dtype=np.float32) for lo, hi in spans]
    blocks[0][0, :5] = 1.0  # row 0: all but 5 survive, still too many
    masks = [np.empty((b, hi - lo), dtype=bool) for lo, hi in spans]
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        ok, row, col = knn_pca.survivors(blocks, spans, limit, 4, masks)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was:
            tracemalloc.stop()
    assert not ok.any() and len(row) == len(col) == 0
    assert peak < b * n  # a byte per value at most: no positions listed


@pytest.mark.parametrize("width", [784, 1024, 1030, 2100])
def test_train_sq64_is_exact_at_the_largest_squares(width):
    # Rows of -128 (every square 2**14) reach 2**24 per 1,024-column block, the most float32
    # holds exactly; wider rows are summed block by block.
    rng = np.random.default_rng(width)
    rows8 = torch.from_numpy(rng.integers(-128, 128, (3 * knn_pca.FEATURE_ROWS // 2, width),
                                          dtype=np.int8))  # fmt: skip
    rows8[::7] = -128
    # A full block of 2**14 each, then 1,023 odd squares: summed together (a block of 2,048)
    # the total is odd and past 2**24, which float32 cannot hold.
    rows8[1::7, :1024] = -128
    rows8[1::7, 1024:] = 127
    rows8[1::7, 2047:] = 0
    expect = (rows8.numpy().astype(np.int64) ** 2).sum(axis=1)
    assert np.array_equal(knn_pca.train_sq64(rows8), expect)


def test_sample_rows_shrink_for_wide_images(monkeypatch):
    assert knn_pca.sample_rows(784) == knn_pca.SAMPLE_ROWS
    assert knn_pca.sample_rows(4096) == knn_pca.SAMPLE_MIN_ROWS
    assert knn_pca.sample_rows(10**6) == knn_pca.SAMPLE_MIN_ROWS
    # The screen takes its directions from that many: 2,000 images of 4,096 pixels, 1,024.
    seen = []
    real = knn_pca._basis
    monkeypatch.setattr(knn_pca, "_basis", lambda c, d: seen.append(c.shape) or real(c, d))
    rng = np.random.default_rng(7)
    knn_pca.PcaScreen(torch.from_numpy(rng.integers(0, 256, (2000, 4096), dtype=np.uint8)), 8)
    assert seen == [(knn_pca.SAMPLE_MIN_ROWS, 4096)]


@pytest.mark.parametrize("kind", ["float32", "int64", "fortran", "strided"])
def test_byte_valued_images_of_any_dtype_or_layout_are_exact(kind, settled):
    # The screen's byte rows come from a cast and a bit flip: float and wide-integer images of
    # whole values in [0, 255], and non-contiguous ones, give the plain scan's answer.
    rng = np.random.default_rng(4)
    train, test = _strokes(rng, 300).reshape(300, -1), _strokes(rng, 20).reshape(20, -1)
    test[0] = train[9]
    if kind in ("float32", "int64"):
        train, test = train.astype(kind), test.astype(kind)
    elif kind == "fortran":
        train, test = np.asfortranarray(train), np.asfortranarray(test)
        # The byte rows the exact step gathers are row-major whatever the caller's layout.
        assert knn_pca.PcaScreen(torch.as_tensor(train), 8).rows8.is_contiguous()
    else:
        train = np.repeat(train, 2, axis=0)[::2]
    plain = kneighbors(train, test, screen=False)
    _same(kneighbors(train, test, screen=True), plain)
    assert settled["settled"] > 0


def test_no_test_images_give_empty_answers():
    rng = np.random.default_rng(6)
    train = _strokes(rng, 100)
    for kwargs in ({"screen": True}, {"candidates": 16}, {}):
        dist, ind = kneighbors(train, train[:0], **kwargs)
        assert dist.shape == ind.shape == (0, 4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-50, 50)), max_size=60))
def test_the_combined_sort_orders_as_a_lexsort(pairs):
    # Survivors come by row, then column; the combined int64 sort and the lexsort it falls
    # back to (for spans that would overflow) give the same (row, key, column) order.
    pairs.sort(key=lambda p: p[0])
    row = np.array([p[0] for p in pairs], dtype=np.int64)
    key = np.array([p[1] for p in pairs], dtype=np.int64)
    col = np.arange(len(pairs), dtype=np.int64)
    fast = knn_pca.by_row_key_column(row, key, col)
    slow = knn_pca.by_row_key_column(row, key, col, fits=0)
    assert fast.tolist() == slow.tolist() == np.lexsort((col, key, row)).tolist()


def test_more_neighbours_than_first_candidates_and_a_float64_default_are_exact():
    # k above the screen's 32 first candidates goes to the plain scan (its threshold is the
    # k-th of them); a float64 default dtype leaves the screen's float32 buffers float32.
    rng = np.random.default_rng(4)
    train, test = _strokes(rng, 300, (8, 8)), _strokes(rng, 9, (8, 8))
    plain = kneighbors(train, test, k=40, screen=False)
    _same(kneighbors(train, test, k=40, screen=True), plain)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _same(kneighbors(train, test, k=4, screen=True), kneighbors(train, test, k=4, screen=False))
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("lanes", [1, 3])
def test_any_number_of_lanes_gives_the_same_answer(monkeypatch, settled, lanes):
    rng = np.random.default_rng(8)
    train, test = _strokes(rng, 600), _strokes(rng, 90)
    plain = kneighbors(train, test, screen=False)
    monkeypatch.setattr(knn_pca, "LANES", lanes)
    _same(kneighbors(train, test, screen=True, batch_size=7), plain)  # 13 batches
    assert settled["screened"] == 90
    assert settled["settled"] >= 80


def test_a_lane_shares_the_features_and_not_the_buffers(medium_precision):
    rng = np.random.default_rng(9)
    screen = knn_pca.PcaScreen(torch.from_numpy(_strokes(rng, 200).reshape(200, -1)), 8)
    query = torch.from_numpy(_strokes(rng, 5).reshape(5, -1))
    with knn_screen.full_precision():
        ours = screen.keys(query)[0][0]  # the buffers grown before the lane is taken
        screen.masks(5)
        lane = screen.lane()
        theirs = lane.keys(query)[0][0]
    assert lane.phi is screen.phi and lane.rows8 is screen.rows8
    assert not np.shares_memory(ours, theirs)
    assert not np.shares_memory(screen.masks(5)[0], lane.masks(5)[0])
    assert np.array_equal(ours, theirs)
    with pytest.raises(RuntimeError, match="full_precision"):  # the bound needs full
        screen.keys(query)


def test_lanes_run_at_full_precision_and_no_more_lanes_than_threads(monkeypatch, medium_precision):
    rng = np.random.default_rng(11)
    train, test = _strokes(rng, 300), _strokes(rng, 40)
    seen, real, lock = [], knn_pca.settle, threading.Lock()

    def spy(*args, **kwargs):
        with lock:
            seen.append((threading.current_thread().name, torch.get_float32_matmul_precision()))
        return real(*args, **kwargs)

    monkeypatch.setattr(knn_pca, "settle", spy)
    monkeypatch.setattr(knn_pca, "LANES", 3)
    for n in (1, 2):
        torch.set_num_threads(n)
        seen.clear()
        kneighbors(train, test, screen=True, batch_size=2 * n)  # 20 batches
        assert {p for _, p in seen} == {"highest"} and len(seen) == 20
        assert len({name for name, _ in seen}) <= n
    assert torch.get_float32_matmul_precision() == "medium"


def test_a_failing_batch_stops_the_search_and_restores_the_matmul_precision(
    monkeypatch, medium_precision
):
    # The lanes run ahead of the batch being stored; when one fails, the batches not started
    # never start, the running ones end before the error reaches the caller, and full float32
    # precision (set once for all lanes, the process's setting) is undone.
    rng = np.random.default_rng(10)
    train, test = _strokes(rng, 300), _strokes(rng, 80)
    real, started, lock = knn_pca.settle, [], threading.Lock()

    def flaky(*args, **kwargs):
        with lock:
            started.append(len(started))
            n = len(started)
        if n == 3:
            raise MemoryError("batch 3")
        if n > 3:
            time.sleep(0.2)  # later batches are slow: the failure is seen first
        return real(*args, **kwargs)

    monkeypatch.setattr(knn_pca, "settle", flaky)
    monkeypatch.setattr(knn_pca, "LANES", 2)
    torch.set_num_threads(2)
    with pytest.raises(MemoryError, match="batch 3"):
        kneighbors(train, test, screen=True, batch_size=4)  # 40 batches of 2, 2 lanes
    assert torch.get_float32_matmul_precision() == "medium"
    assert not [t for t in threading.enumerate() if t.name.startswith("kmnist-knn")]
    count = len(started)
    time.sleep(0.5)
    assert len(started) == count < 40


@pytest.mark.parametrize("first_exact", [1, 12, knn_pca.GROUPS])
@pytest.mark.parametrize("k", [1, 4, 13, knn_pca.GROUPS])
def test_any_number_of_first_exact_distances_gives_the_same_answer(
    monkeypatch, settled, first_exact, k
):
    # The threshold comes from the k-th nearest of the max(k, FIRST_EXACT) best-screened first
    # candidates: any k or more give a correct one, fewer only a looser one.
    rng = np.random.default_rng(12)
    train, test = _strokes(rng, 400, levels=3), _strokes(rng, 30, levels=3)
    plain = kneighbors(train, test, k=k, screen=False)
    monkeypatch.setattr(knn_pca, "FIRST_EXACT", first_exact)
    monkeypatch.setattr(knn_pca, "SURVIVOR_SHARE", 1)  # settled however loose the bound
    _same(kneighbors(train, test, k=k, screen=True), plain)
    assert settled["settled"] == 30
