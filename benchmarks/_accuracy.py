"""Whole training runs of the simple CNN recipe, ours and a plain loop, on the same images, for
cpu_speed.py's accuracy row: the split, the two runs (wall seconds of the training epochs
only, then top-1 on the held-out images) and the noise band of the comparison.

Imported as ``import _accuracy`` (a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, NamedTuple

import _shared
import numpy as np
import torch
import torch.nn.functional as F
import train_throughput as tt
from torch.utils.data import DataLoader

from kmnist_torch.data import formats
from kmnist_torch.models.registry import create_model
from kmnist_torch.training import cpu
from kmnist_torch.training.engine import Job, RunState, train_one_epoch
from kmnist_torch.training.recipes import Recipe

NUM_CLASSES = 10
DEVICE = torch.device("cpu")
EVAL_BATCH = 1000


class Split(NamedTuple):
    """uint8 N x 28 x 28 images and int64 labels to train on and to score, and their source."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def split(n_train: int, n_test: int, seed: int = 0) -> Split:
    """A fixed split of the real KMNIST test images (``seed`` draws one permutation of the
    10,000; the first ``n_train`` to train on, the next ``n_test`` to score), or random images
    with random labels without ../shared (accuracy then stays near chance)."""
    rng = np.random.default_rng(seed)
    real = _shared.real_kmnist_test_npz()
    if real is not None:
        x = formats.read_npz(real[0], (-1, 28, 28))
        y = formats.read_npz(real[1], (-1,))
        source = "real KMNIST test images"
    else:
        x = rng.integers(0, 256, (n_train + n_test, 28, 28), dtype=np.uint8)
        y = rng.integers(0, NUM_CLASSES, n_train + n_test)
        source = "random images with random labels (../shared absent: top-1 stays near chance)"
    if n_train + n_test > len(x):
        raise ValueError(f"{n_train} + {n_test} images asked for, {len(x)} there")
    order = rng.permutation(len(x))
    tr, te = order[:n_train], order[n_train : n_train + n_test]

    def pair(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(
            np.asarray(y[idx], dtype=np.int64)
        )

    return Split(*pair(tr), *pair(te), source)


class PlainCNN(torch.nn.Module):
    """The simple CNN as a user writes it from the Keras example: ``nn.Dropout``, ReLU before
    max pooling, torch's default memory format. The layers are named as the package's
    (``SimpleCNN``), so its weights load from one, and both compute the same function."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3)
        self.conv2 = torch.nn.Conv2d(32, 64, 3)
        self.drop1 = torch.nn.Dropout(0.25)
        self.fc1 = torch.nn.Linear(64 * 12 * 12, 128)
        self.drop2 = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.drop1(x), 1)
        x = self.drop2(F.relu(self.fc1(x)))
        return self.fc2(x)


def plain_cnn() -> PlainCNN:
    """A :class:`PlainCNN` with the initial weights ``create_model("simple_cnn")`` draws from
    torch's generator as it stands (Keras' initialisation), which it leaves where ours would
    (the plain model's own initialisation draws on a forked generator)."""
    weights = create_model("simple_cnn", NUM_CLASSES, in_chans=1).state_dict()
    with torch.random.fork_rng(devices=[]):
        model = PlainCNN()
    model.load_state_dict(weights)
    return model


def digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the images and labels a side was handed (both sides must report the same)."""
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no gradients) on uint8 N x 28 x 28 images
    scaled to [0, 1] as both sides' training batches were; the same code for both sides."""
    model.eval()
    right = 0
    with torch.no_grad():
        for lo in range(0, len(labels), EVAL_BATCH):
            x = images[lo : lo + EVAL_BATCH].unsqueeze(1).float().div_(255.0)
            right += int((model(x).argmax(1) == labels[lo : lo + EVAL_BATCH]).sum())
    return right / len(labels)


def _result(seconds: float, images: int, model, data: Split, seed: int, threads: int, load):
    return {
        "seed": seed,
        "train_s": seconds,
        "images": images,
        "img_s": images / seconds,
        "accuracy": top1(model, data.test_x, data.test_y),
        "threads": threads,
        "load": load,
    }


def ours(recipe: Recipe, data: Split, seed: int) -> dict[str, Any]:
    """The trainer's path: the thread policy ``train`` applies (kmnist_torch.training.cpu),
    the split held as a ``TensorLoader``, the engine's own epochs (``train_one_epoch``);
    wall seconds of the epochs only, then top-1 on the held-out images."""
    load = os.getloadavg()[0]
    default = torch.get_num_threads()
    cpu.configure("auto", None)
    try:
        threads = torch.get_num_threads()
        held = type("Held", (), {"data": data.train_x, "targets": data.train_y})()
        loader = tt.TensorLoader(held, recipe.batch_size, shuffle=True, device="cpu",
                                 drop_last=True, seed=seed)  # fmt: skip
        torch.manual_seed(seed)  # initial weights and dropout, as train does
        model = cpu.prepare_model(
            create_model(recipe.model, NUM_CLASSES, in_chans=1), DEVICE, training=True
        )
        job = Job(recipe, model, loader, None, DEVICE, NUM_CLASSES)
        state = RunState(job, seed)
        t0 = time.perf_counter()
        for epoch in range(recipe.epochs):
            state.epoch, state.step = epoch, 0
            train_one_epoch(job, state, progress=False)
        seconds = time.perf_counter() - t0
        res = _result(seconds, state.spent["train_images"], model, data, seed, threads, load)
    finally:
        torch.set_num_threads(default)
    return {**res, "data": digest(loader.data.squeeze(1), loader.targets)}


def plain(recipe: Recipe, data: Split, seed: int, workers: int = 2) -> dict[str, Any]:
    """What a user writes: a torchvision-style dataset (PIL image + ``ToTensor``), a
    ``DataLoader`` with ``workers``, the network written plainly (:class:`PlainCNN`) from the
    same initial weights, ``torch.optim.Adadelta`` with the recipe's lr, rho and eps,
    cross-entropy, torch's default threads and memory format; the same batch size
    (``drop_last``, so both sides take the same number of steps) and epochs."""
    from torchvision import transforms

    plan = (recipe.model, recipe.optimizer, recipe.loss, recipe.mixup, recipe.translate)
    if plan != ("simple_cnn", "adadelta", "ce", "none", 0):
        raise ValueError(
            "the plain loop is the simple CNN recipe's: simple_cnn, Adadelta, CE, no mixup"
        )
    load = os.getloadavg()[0]
    ds = tt.PILDataset(data.train_x, data.train_y, transforms.ToTensor())
    loader = DataLoader(ds, batch_size=recipe.batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    torch.manual_seed(seed)
    model = plain_cnn()
    opt = torch.optim.Adadelta(model.parameters(), lr=recipe.lr, rho=recipe.rho, eps=recipe.eps)
    images = 0
    t0 = time.perf_counter()
    for _ in range(recipe.epochs):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            images += len(y)
    seconds = time.perf_counter() - t0
    res = _result(seconds, images, model, data, seed, torch.get_num_threads(), load)
    return {**res, "data": digest(ds.data, ds.targets)}


def band(p_ours: float, p_peer: float, n: int) -> float:
    """Two binomial standard errors of the difference of two accuracies on ``n`` images:
    2 * sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n). A difference inside it is within noise."""
    return 2 * math.sqrt((p_ours * (1 - p_ours) + p_peer * (1 - p_peer)) / n)
