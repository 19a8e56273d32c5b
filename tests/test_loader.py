"""TensorLoader: the whole split on the device, batches of float32 in [0, 1]."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kmnist_torch import TensorLoader


def _ds(n=10, h=28, w=28):
    data = torch.arange(n * h * w, dtype=torch.int64).remainder(256).to(torch.uint8)
    return SimpleNamespace(data=data.view(n, h, w), targets=torch.arange(n) % 3)


def test_batches_cover_the_split_once_with_right_dtype_and_range():
    ds = _ds(10)
    loader = TensorLoader(ds, batch_size=4, shuffle=True, seed=0)
    assert len(loader) == 3
    xs, ys = zip(*loader)
    assert [len(y) for y in ys] == [4, 4, 2]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (10, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Every image exactly once, paired with its own label.
    flat = (x * 255).round().to(torch.uint8).view(10, -1)
    order = [int((ds.data.view(10, -1) == row).all(1).nonzero()) for row in flat]
    assert sorted(order) == list(range(10))
    assert torch.equal(torch.cat(ys), ds.targets[order])


def test_seed_reproduces_order_and_epochs_differ():
    a = [y.tolist() for _, y in TensorLoader(_ds(30), 5, seed=1)]
    b = [y.tolist() for _, y in TensorLoader(_ds(30), 5, seed=1)]
    assert a == b
    loader = TensorLoader(_ds(30), 30, seed=1)
    first, second = (next(iter(loader))[0] for _ in range(2))
    assert not torch.equal(first, second)


def test_no_shuffle_drop_last_and_state_dict():
    loader = TensorLoader(_ds(10), 4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 0], [1, 2, 0, 1]]
    l1 = TensorLoader(_ds(20), 20, seed=3)
    state = l1.state_dict()
    first = next(iter(l1))[1]
    l2 = TensorLoader(_ds(20), 20, seed=99)
    l2.load_state_dict(state)
    assert torch.equal(next(iter(l2))[1], first)


def test_works_for_64x64_and_channel_data():
    x, _ = next(iter(TensorLoader(_ds(4, 64, 64), 4)))
    assert x.shape == (4, 1, 64, 64)
    ds = SimpleNamespace(data=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), targets=torch.zeros(4))
    assert next(iter(TensorLoader(ds, 2)))[0].shape == (2, 3, 8, 8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(_ds(), 0)
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(SimpleNamespace(data=torch.zeros(4, 28, 28), targets=torch.zeros(4)), 2)
    with pytest.raises(ValueError, match="4 images but 3 targets"):
        TensorLoader(SimpleNamespace(data=torch.zeros(4, 8, 8, dtype=torch.uint8),
                                     targets=torch.zeros(3)), 2)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_device_resident():
    loader = TensorLoader(_ds(8), 4, device="cuda")
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda and loader.data.is_cuda


class _CountingData:
    """A loader's images that count the gathers (the batches made)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.gathers = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx):
        self.gathers += 1
        return self.data[idx]


def test_batches_from_a_step_are_the_whole_pass_s_tail_without_gathering_the_rest():
    # A run resumed, or checkpointed, mid-epoch continues the same order; the batches it skips
    # are never gathered (they were, one by one, through islice).
    expected = [y.tolist() for _, y in TensorLoader(_ds(30), 4, seed=5)][3:]
    tail = TensorLoader(_ds(30), 4, seed=5)
    tail.data = counting = _CountingData(tail.data)
    assert [y.tolist() for _, y in tail.batches(3)] == expected and len(expected) == 5
    assert counting.gathers == 5
    assert list(tail.batches(len(tail))) == []
