"""The 4-NN baseline equals scikit-learn's KNeighborsClassifier: on real KMNIST images from
../shared, with duplicates (zero distances) and ties, and on small synthetic edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnist_torch.data import formats
from kmnist_torch.models.knn import kneighbors, knn_predict

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sklearn_knn(train, labels, test, k=4, weights="distance"):
    neighbors = pytest.importorskip("sklearn.neighbors")
    clf = neighbors.KNeighborsClassifier(n_neighbors=k, weights=weights)
    clf.fit(train.reshape(len(train), -1), labels)
    return clf


@pytest.fixture
def kmnist_subset(real_dir):
    """The real KMNIST test split cut into 2,000 "train" and 500 "test" images (uint8)."""
    folder = real_dir / "kmnist"
    images = formats.read_npz(folder / "kmnist-test-imgs.npz", (-1, 28, 28))
    labels = formats.read_npz(folder / "kmnist-test-labels.npz", (-1,))
    return images[:2000], labels[:2000], images[2000:2500], labels[2000:2500]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidates", [0, 32])
def test_equals_sklearn_on_real_kmnist(kmnist_subset, device, candidates):
    train, labels, test, truth = kmnist_subset
    clf = _sklearn_knn(train, labels, test)
    flat = test.reshape(len(test), -1)
    # 64 does not divide 500: the last batch is a short one. candidates=32: the screen, whose
    # bound settles most test images and sends the rest to the exact scan.
    ours = knn_predict(train, labels, test, batch_size=64, device=device, candidates=candidates)
    np.testing.assert_array_equal(ours.numpy(), clf.predict(flat))
    dist, ind = kneighbors(train, test, k=4, batch_size=64, device=device, candidates=candidates)
    ref_dist, ref_ind = clf.kneighbors(flat)
    np.testing.assert_array_equal(ind.numpy(), ref_ind)
    np.testing.assert_array_equal(dist.numpy(), ref_dist)  # bit for bit
    # A real baseline, not a degenerate one: 4-NN on 2,000 images is far above chance.
    assert (ours.numpy() == truth).mean() > 0.75


def test_equals_sklearn_with_duplicates_and_zero_distances(kmnist_subset):
    train, labels, test, _ = kmnist_subset
    # Copies of 60 test images join the training set: 20 once with a wrong label, 20 twice
    # (labels 7 and 2), 20 three times (labels 7, 2, 7). Those test images are then at
    # distance 0 from 1 to 3 neighbours, which alone decide (weight 1 each, the others 0);
    # fewer than k images tie at 0, so scikit-learn's uint8 path is deterministic.
    once, twice, thrice = test[:20], test[20:40], test[40:60]
    wrong = (labels[:20] + 3) % 10
    seven, two = np.full(20, 7, np.uint8), np.full(20, 2, np.uint8)
    big_train = np.concatenate([train, once, twice, twice, thrice, thrice, thrice])
    big_labels = np.concatenate([labels, wrong, seven, two, seven, two, seven]).astype(np.uint8)
    clf = _sklearn_knn(big_train, big_labels, test)
    ours = knn_predict(big_train, big_labels, test, batch_size=100).numpy()
    np.testing.assert_array_equal(ours, clf.predict(test.reshape(len(test), -1)))
    # What those rules mean here: a single zero-distance copy's label wins; labels 7 and 2
    # weigh 1 each and the tie goes to the smaller label; 7, 2, 7 is 2 votes against 1.
    np.testing.assert_array_equal(ours[:20], wrong)
    np.testing.assert_array_equal(ours[20:40], two)
    np.testing.assert_array_equal(ours[40:60], seven)


def _equidistant(n: int, radius: int = 10) -> np.ndarray:
    """n training images, each one pixel set to ``radius``: all at distance ``radius`` from a
    black image and at sqrt(2) * radius from each other."""
    size = int(np.ceil(np.sqrt(n)))
    images = np.zeros((n, size * size), np.uint8)
    images[np.arange(n), np.arange(n)] = radius
    return images.reshape(n, size, size)


def test_ties_at_the_kth_neighbour_go_to_the_lowest_indices():
    # 3,000 images tied at the same distance, more than torch.topk or np.argpartition settle
    # by index: the first 4 indices are labelled 2, every other image 0.
    train = _equidistant(3000)
    labels = np.zeros(3000, np.int64)
    labels[:4] = 2
    query = np.zeros((3, *train.shape[1:]), np.uint8)
    dist, ind = kneighbors(train, query, k=4)
    np.testing.assert_array_equal(ind.numpy(), np.tile(np.arange(4), (3, 1)))
    np.testing.assert_array_equal(dist.numpy(), np.full((3, 4), 10.0))
    np.testing.assert_array_equal(knn_predict(train, labels, query).numpy(), [2, 2, 2])
    # One image nearer than the crowd (distance 5, label 1, the last index): it is kept, and
    # the 3 others are again the lowest tied indices (all labelled 2).
    near = np.zeros((1, *train.shape[1:]), np.uint8)
    near.reshape(-1)[0] = 5
    train2 = np.concatenate([train, near])
    labels2 = np.concatenate([labels, [1]])
    dist, ind = kneighbors(train2, query[:1], k=4)
    np.testing.assert_array_equal(ind.numpy(), [[3000, 0, 1, 2]])
    np.testing.assert_array_equal(dist.numpy(), [[5.0, 10.0, 10.0, 10.0]])
    # Weights 1/5 for label 1 against 3/10 for label 2.
    assert knn_predict(train2, labels2, query[:1]).tolist() == [2]


def test_ties_match_sklearn_pairwise_reduction():
    # scikit-learn settles ties by index on its ArgKmin path, the one float inputs take.
    train = _equidistant(500)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=500)
    query = np.zeros((4, *train.shape[1:]), np.uint8)
    # Row 1 lights the pixels of images 0-2: those 3 are nearer, the 4th is a tie of 497.
    query[1].reshape(-1)[:3] = [10, 10, 10]
    clf = _sklearn_knn(train.astype(np.float64), labels, query)
    flat = query.reshape(4, -1).astype(np.float64)
    ref_dist, ref_ind = clf.kneighbors(flat)
    dist, ind = kneighbors(train, query, k=4)
    # The same neighbours; scikit-learn's order among equal distances is unspecified (its
    # final sort is not stable), ours is by index.
    np.testing.assert_array_equal(ind.numpy(), np.sort(ref_ind, axis=1))
    np.testing.assert_array_equal(dist.numpy(), ref_dist)
    np.testing.assert_array_equal(knn_predict(train, labels, query).numpy(), clf.predict(flat))


@pytest.mark.parametrize("batch_size", [1, 7, 50, 51, 1000])
def test_batch_size_does_not_change_the_answer(batch_size):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(300, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 6, size=300)
    test = rng.integers(0, 256, size=(51, 8, 8), dtype=np.uint8)
    reference = knn_predict(train, labels, test, batch_size=51)
    assert torch.equal(knn_predict(train, labels, test, batch_size=batch_size), reference)
    clf = _sklearn_knn(train, labels, test)
    np.testing.assert_array_equal(reference.numpy(), clf.predict(test.reshape(51, -1)))


def test_k_larger_than_the_classes_present_and_sparse_labels():
    # Two classes with labels 3 and 40 (the others absent), k = 5: labels come back as given.
    train = np.array([[0], [1], [2], [9], [11], [13], [15]], np.uint8)
    labels = np.array([3, 3, 3, 40, 40, 40, 40])
    test = np.array([[0], [13], [6]], np.uint8)
    ours = knn_predict(train, labels, test, k=5)
    # Rows 0 and 1 are training images (distance 0): labels 3 and 40. Row 2: neighbours 9, 2,
    # 1, 11, 0 at 3, 4, 5, 5, 6 -> 3 gets 1/4 + 1/5 + 1/6, more than 40's 1/3 + 1/5.
    assert ours.tolist() == [3, 40, 3]
    assert ours.dtype == torch.int64
    clf = _sklearn_knn(train, labels, test, k=5)
    np.testing.assert_array_equal(ours.numpy(), clf.predict(test))
    # k may be every training image, not more.
    every = _sklearn_knn(train, labels, test, k=7).predict(test)
    np.testing.assert_array_equal(knn_predict(train, labels, test, k=7).numpy(), every)
    with pytest.raises(ValueError, match="k must be between 1 and the 7 training images"):
        knn_predict(train, labels, test, k=8)


def test_vote_ties_go_to_the_smallest_label():
    train = np.array([[1], [3], [5]], np.uint8)
    test = np.array([[2]], np.uint8)
    # Labels 9 and 4 each at distance 1 (the third, label 0, is not among k=2).
    assert knn_predict(train, [9, 4, 0], test, k=2).tolist() == [4]
    assert knn_predict(train, [9, 4, 0], test, k=2, weights="uniform").tolist() == [4]
    # Uniform weights: two votes against one beat the nearer single neighbour.
    train = np.array([[2], [5], [5]], np.uint8)
    assert knn_predict(train, [1, 0, 0], test, k=3, weights="uniform").tolist() == [0]
    assert knn_predict(train, [1, 0, 0], test, k=3).tolist() == [1]  # 1/0 -> weight 1
    # Zero-distance neighbours weigh 1 each (not infinity): two copies labelled 8 outvote one
    # labelled 1, where infinite weights would tie and hand it to the smaller label.
    train = np.array([[2], [2], [2], [3]], np.uint8)
    assert knn_predict(train, [8, 1, 8, 1], test, k=4).tolist() == [8]


def test_uniform_weights_equal_sklearn(kmnist_subset):
    train, labels, test, _ = kmnist_subset
    clf = _sklearn_knn(train, labels, test, weights="uniform")
    ours = knn_predict(train, labels, test, weights="uniform")
    np.testing.assert_array_equal(ours.numpy(), clf.predict(test.reshape(len(test), -1)))


def test_wide_images_are_exact_across_feature_blocks():
    # 64 x 64 (KKanji size) spans 4 blocks of 1,024 features; extreme pixels make the largest
    # products. Distances must equal the integer ones computed directly.
    rng = np.random.default_rng(2)
    train = rng.choice(np.array([0, 1, 254, 255], np.uint8), size=(40, 64, 64))
    test = np.concatenate([train[:3], 255 - train[3:6], np.zeros((1, 64, 64), np.uint8)])
    dist, ind = kneighbors(train, test, k=3)
    diff = test.reshape(7, 1, -1).astype(np.int64) - train.reshape(1, 40, -1).astype(np.int64)
    exact = (diff**2).sum(-1)
    order = np.lexsort((np.tile(np.arange(40), (7, 1)), exact), axis=1)[:, :3]
    np.testing.assert_array_equal(ind.numpy(), order)
    np.testing.assert_array_equal(
        dist.numpy(), np.sqrt(np.take_along_axis(exact, order, 1).astype(np.float64))
    )


def test_tensor_and_float_inputs():
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=200)
    test = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    reference = knn_predict(train, labels, test)
    # Tensors, and byte values held as float32, take the same exact path.
    assert torch.equal(knn_predict(torch.from_numpy(train), torch.from_numpy(labels),
                                   torch.from_numpy(test)), reference)  # fmt: skip
    assert torch.equal(
        knn_predict(train.astype(np.float32), labels, test.astype(np.float32)), reference
    )
    # Scaled to [0, 1]: the float64 path, whose neighbours are the same ones.
    scaled = knn_predict(train / 255.0, labels, test / 255.0)
    assert torch.equal(scaled, reference)
    clf = _sklearn_knn(train / 255.0, labels, test)
    np.testing.assert_array_equal(scaled.numpy(), clf.predict(test.reshape(30, -1) / 255.0))


def test_bad_inputs_say_what_is_wrong():
    train = np.zeros((5, 4, 4), np.uint8)
    test = np.zeros((2, 4, 4), np.uint8)
    labels = np.arange(5)
    with pytest.raises(ValueError, match="16 features but test images have 9"):
        knn_predict(train, labels, np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="5 training images but 4 labels"):
        knn_predict(train, labels[:4], test)
    with pytest.raises(ValueError, match="must be integers"):
        knn_predict(train, labels.astype(np.float32), test)
    with pytest.raises(ValueError, match="NaN or infinity"):
        knn_predict(train, labels, np.full((2, 16), np.nan))
    with pytest.raises(ValueError, match="weights must be one of"):
        knn_predict(train, labels, test, weights="gaussian")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        knn_predict(train, labels, test, batch_size=0)
    with pytest.raises(ValueError, match="train_images is empty"):
        knn_predict(train[:0], labels[:0], test)
    assert knn_predict(train, labels, test[:0]).shape == (0,)


# --------------------------------------------------------------------------- the screen


def _block_shuffles(base: np.ndarray, copies: int, rng: np.random.Generator) -> np.ndarray:
    """``copies`` images that each permute the pixels inside every 2 x 2 block of ``base``:
    the screen's features (block sums, the spread inside each 4 x 4 region) are identical for
    all of them, their exact distances to a query are not."""
    h, w = base.shape
    blocks = base.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4)
    out = []
    for _ in range(copies):
        perm = rng.permuted(np.broadcast_to(np.arange(4), blocks.shape), axis=1)
        shuffled = np.take_along_axis(blocks, perm, axis=1)
        out.append(shuffled.reshape(h // 2, w // 2, 2, 2).transpose(0, 2, 1, 3).reshape(h, w))
    return np.stack(out)


def test_screen_features_bound_every_distance_and_keep_the_norm():
    from kmnist_torch.models import knn_screen

    rng = np.random.default_rng(3)
    for shape in [(28, 28), (10, 6), (37,)]:  # padded image, padded rows, a flat vector
        x = rng.integers(0, 256, (40, *shape), dtype=np.uint8)
        x[:20] = np.where(rng.random(x[:20].shape) < 0.7, 0, x[:20])  # sparse strokes too
        flat = torch.from_numpy(x.reshape(40, -1))
        layout = knn_screen.image_layout(shape)
        phi = knn_screen.features(flat, layout, torch.device("cpu")).double()
        v = flat.double() - 128
        np.testing.assert_allclose(phi.norm(dim=1), v.norm(dim=1), rtol=1e-6)
        lower = torch.cdist(phi, phi)
        exact = torch.cdist(v, v)
        assert bool((lower <= exact * (1 + 1e-6) + 1e-3).all())
        assert float((lower / exact.clamp(min=1)).mean()) > 0.3  # a bound that screens


@pytest.mark.parametrize("candidates", [4, 9, 64])
def test_screen_finds_the_exact_neighbours_when_decoys_fill_the_shortlist(candidates):
    # The query: one block holding [60, 0, 0, 0]. 70 decoys shuffle that block to
    # [0, 60, 0, 0] (invisible to the screen, 7,200 to the exact distance) and light one pixel
    # elsewhere at 101..119: screen 10,201..14,161, exact 17,401..21,361 (squared). Four near
    # images light one far pixel at 120..123: screen = exact = 14,400..15,129. Every
    # shortlist is all decoys, yet the true neighbours are the near ones, outside it: only a
    # correct bound sends this query to the exact scan (a bound half as large would not).
    q = np.zeros((28, 28), np.uint8)
    q[0, 0] = 60
    rng = np.random.default_rng(4)
    spots = [(r, c) for r in range(4, 28, 2) for c in range(0, 28, 2)]
    decoys = np.repeat(q[None], 70, 0)
    decoys[:, 0, 0], decoys[:, 0, 1] = 0, 60
    for i, (r, c) in enumerate(spots[:70]):
        decoys[i, r, c] = 101 + rng.integers(0, 19)
    near = np.repeat(q[None], 4, 0)
    for i, (r, c) in enumerate(spots[70:74]):
        near[i, r, c] = 120 + i
    train = np.concatenate([decoys[:35], near, decoys[35:]])
    labels = np.r_[np.zeros(35, int), np.ones(4, int), np.zeros(35, int)]
    dist, ind = kneighbors(train, q[None], k=4, candidates=candidates)
    np.testing.assert_array_equal(ind.numpy(), [[35, 36, 37, 38]])
    np.testing.assert_array_equal(dist.numpy() ** 2, [[120**2, 121**2, 122**2, 123**2]])
    assert knn_predict(train, labels, q[None], candidates=candidates).tolist() == [1]


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([2, 3, 256]),
    candidates=st.integers(4, 40),
    k=st.integers(1, 5),
)
def test_screen_equals_the_exact_scan_on_random_images(seed, levels, candidates, k):
    # Few grey levels: many exact ties at the k-th distance, which go to the lowest indices.
    rng = np.random.default_rng(seed)
    values = np.linspace(0, 255, levels).astype(np.uint8)
    train = values[rng.integers(0, levels, (120, 8, 8))]
    test = values[rng.integers(0, levels, (9, 8, 8))]
    exact = kneighbors(train, test, k=k, candidates=0)
    screened = kneighbors(train, test, k=k, candidates=candidates, batch_size=4)
    assert torch.equal(screened[0], exact[0]) and torch.equal(screened[1], exact[1])


def test_progress_is_shown_on_request(capsys, monkeypatch):
    monkeypatch.setenv("KMNIST_TORCH_PROGRESS_EVERY", "0")
    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    kneighbors(train, train[:7], k=2, batch_size=3, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("kmnist_torch: 4-NN: 7/7 test images (100%)")
    kneighbors(train, train[:7], k=2, batch_size=3)  # short: quiet by default
    assert capsys.readouterr().err == ""
