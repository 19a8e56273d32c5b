"""MNIST, KMNIST and K49 checked the way torchvision checks its own datasets: fake data written
into a root in every layout a user can have (the official .gz, the extracted idx files alone,
npz, torchvision's legacy processed .pt), then every configuration, the types of an item's
features, len, transforms and ``wrap_dataset_for_transforms_v2``. Written for this package in
the style of torchvision's dataset test harness (``inject_fake_data`` per configuration)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from fakedata import random_split
from torchvision.datasets import wrap_dataset_for_transforms_v2

from kmnist_torch import K49, KMNIST, MNIST, DataFilesError, FormatError
from kmnist_torch.data.formats import read_idx, write_idx
from kmnist_torch.data.resplit import write_split
from kmnist_torch.errors import UncheckedContentWarning

SIZES = {"train": 24, "test": 13}  # small and different, so a mix-up of splits shows


def _layout_root(root: Path, name: str, layout: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Write both splits of ``name`` under ``root`` in ``layout``; returns the labels."""
    out = {}
    for i, split in enumerate(("train", "test")):
        images, labels = random_split(SIZES[split], name, seed=seed + i)
        out[split] = (images, labels)
        if layout == "legacy":
            folder = root / ("MNIST" if name == "mnist" else "KMNIST") / "processed"
            folder.mkdir(parents=True, exist_ok=True)
            pair = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
            torch.save(pair, folder / ("training.pt" if split == "train" else "test.pt"))
            continue
        fmt = "npz" if layout == "npz" or name == "k49" else "mnist"
        folder = write_split(root, name, split, images, labels, fmt=fmt, extracted=True)
        if layout == "extracted":
            for gz in folder.glob("*.gz"):
                gz.unlink()
    return out


class DatasetTestCase:
    """torchvision's harness in miniature: a subclass names the class, its configurations and
    how to fake a root for one configuration."""

    DATASET_CLASS: type
    NAME: str
    CONFIGS: list[dict]

    def inject_fake_data(self, root: Path, config: dict) -> tuple[int, np.ndarray]:
        layout = config.get("layout", "gz")
        fake = _layout_root(root, self.NAME, layout)
        images, labels = fake["train" if config["train"] else "test"]
        return len(images), labels

    def create(self, root: Path, config: dict, **kwargs):
        kw = {k: v for k, v in config.items() if k != "layout"}
        with warnings.catch_warnings():
            # Fake data has no published checksum: verify=False, as a user's re-encoding.
            warnings.simplefilter("ignore", UserWarning)
            return self.DATASET_CLASS(root, verify=False, **kw, **kwargs)

    def configs(self):
        return self.CONFIGS

    def test_every_config(self, tmp_path):
        for i, config in enumerate(self.configs()):
            root = tmp_path / str(i)
            n, labels = self.inject_fake_data(root, config)
            ds = self.create(root, config)
            assert len(ds) == n, config
            assert ds.targets.tolist() == labels.tolist(), config
            img, target = ds[0]
            assert isinstance(img, PIL.Image.Image) and img.mode == "L", config
            assert img.size == (28, 28) and type(target) is int, config
            assert ds.data.dtype == torch.uint8 and ds.targets.dtype == torch.int64

    def test_transforms(self, tmp_path):
        config = self.configs()[0]
        self.inject_fake_data(tmp_path, config)
        seen = []
        ds = self.create(
            tmp_path,
            config,
            transform=lambda im: (seen.append(im), "image")[1],
            target_transform=lambda t: ("target", t),
        )
        assert ds[1] == ("image", ("target", int(ds.targets[1])))
        assert isinstance(seen[0], PIL.Image.Image)

    def test_transforms_v2_wrapper(self, tmp_path):
        from torchvision.transforms import v2

        config = self.configs()[0]
        self.inject_fake_data(tmp_path, config)
        ds = self.create(tmp_path, config, transform=v2.PILToTensor())
        wrapped = wrap_dataset_for_transforms_v2(ds)
        img, target = wrapped[2]
        assert isinstance(img, torch.Tensor) and img.shape == (1, 28, 28)
        assert target == int(ds.targets[2]) and len(wrapped) == len(ds)

    def test_is_in_torchvisions_mnist_family(self, tmp_path):
        config = self.configs()[0]
        self.inject_fake_data(tmp_path, config)
        ds = self.create(tmp_path, config)
        assert isinstance(ds, torchvision.datasets.MNIST)
        assert ds.class_to_idx == {c: i for i, c in enumerate(ds.classes)}
        assert ds.raw_folder == str(tmp_path / ds.info.folder / "raw")
        assert ds.processed_folder == str(tmp_path / ds.info.folder / "processed")
        assert ds.resources and all(len(r) == 2 and len(r[1]) == 32 for r in ds.resources)
        assert ds.mirrors and all(m.endswith("/") for m in ds.mirrors)
        assert ds.training_file == "training.pt" and ds.test_file == "test.pt"
        with pytest.warns(UserWarning, match="renamed"):
            old = ds.train_labels if ds.train else ds.test_labels
        assert old is ds.targets
        with pytest.warns(UserWarning, match="renamed"):
            assert (ds.train_data if ds.train else ds.test_data) is ds.data
        assert ds._check_exists()
        assert f"Split: {'Train' if ds.train else 'Test'}" in repr(ds)


class TestKMNIST(DatasetTestCase):
    DATASET_CLASS = KMNIST
    NAME = "kmnist"
    CONFIGS = [
        {"train": t, "layout": lay, **({"format": "npz"} if lay == "npz" else {})}
        for t, lay in itertools.product((True, False), ("extracted", "gz", "npz", "legacy"))
    ]

    def test_is_a_torchvision_kmnist(self, tmp_path):
        self.inject_fake_data(tmp_path, {"train": False})
        assert isinstance(self.create(tmp_path, {"train": False}), torchvision.datasets.KMNIST)


class TestK49(DatasetTestCase):
    DATASET_CLASS = K49
    NAME = "k49"
    CONFIGS = [{"train": True}, {"train": False}]


class TestMNIST(DatasetTestCase):
    DATASET_CLASS = MNIST
    NAME = "mnist"
    CONFIGS = [
        {"train": t, "layout": lay}
        for t, lay in itertools.product((True, False), ("extracted", "gz", "legacy"))
    ]


# ------------------------------------------------------------------ side by side with torchvision


@pytest.mark.parametrize("layout", ["gz", "extracted"])
def test_equal_to_torchvision_bit_for_bit(tmp_path, layout):
    _layout_root(tmp_path, "kmnist", layout)
    for train in (True, False):
        theirs = torchvision.datasets.KMNIST(str(tmp_path), train=train)
        with pytest.warns(UserWarning, match="verify=False"):
            ours = KMNIST(tmp_path, train=train, verify=False)
        assert torch.equal(ours.data, theirs.data) and torch.equal(ours.targets, theirs.targets)
        assert np.array_equal(np.asarray(ours[5][0]), np.asarray(theirs[5][0]))


def test_legacy_root_equals_torchvision_reading_it(tmp_path):
    _layout_root(tmp_path, "kmnist", "legacy")
    # A test split of the official size, so verify=True gets to the legacy warning.
    images, labels = random_split(10000, seed=3)
    pair = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    torch.save(pair, tmp_path / "KMNIST" / "processed" / "test.pt")
    for train in (True, False):
        theirs = torchvision.datasets.KMNIST(str(tmp_path), train=train)
        if train:
            with pytest.warns(UserWarning, match="verify=False"):
                ours = KMNIST(tmp_path, train=True, verify=False)
        else:
            with pytest.warns(UncheckedContentWarning, match="legacy"):
                ours = KMNIST(tmp_path, train=False)
        assert ours.source == "legacy .pt" and not ours.verified
        assert torch.equal(ours.data, theirs.data) and torch.equal(ours.targets, theirs.targets)


def test_a_damaged_legacy_file_is_a_format_error(tmp_path):
    _layout_root(tmp_path, "kmnist", "legacy")
    torch.save({"not": "a pair"}, tmp_path / "KMNIST" / "processed" / "test.pt")
    with pytest.raises(FormatError, match="legacy"):
        KMNIST(tmp_path, train=False, verify=False)


# ------------------------------------------------------------------ what is and is not verified


def test_extracted_labels_are_checked_against_the_official_files_checksum(tmp_path):
    # Official sizes, so verify=True gets as far as the checksums: the extracted train
    # images have none we know; the train labels do, and random ones fail it.
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    images, _ = random_split(60000)
    write_idx(raw / "train-images-idx3-ubyte", images, compress=False)
    write_idx(raw / "train-labels-idx1-ubyte", (np.arange(60000) % 10).astype(np.uint8), False)
    with pytest.raises(DataFilesError, match="train-labels-idx1-ubyte is not usable: md5"):
        KMNIST(tmp_path, train=True)


def test_extracted_real_test_split_is_verified(tmp_path, real_root):
    raw = real_root(gunzip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known checksums: nothing to warn about
        ds = KMNIST(tmp_path, train=False)
    assert ds.verified and ds.source == "idx" and len(ds) == 10000
    # A flipped byte in the extracted copy is caught by the checksum of the official file.
    blob = bytearray((raw / "t10k-images-idx3-ubyte").read_bytes())
    blob[5000] ^= 1
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes(blob))
    with pytest.raises(DataFilesError, match="t10k-images-idx3-ubyte is not usable: md5"):
        KMNIST(tmp_path, train=False)


def test_extracted_train_images_have_no_checksum_so_a_warning_says_so(
    tmp_path, real_dir, real_root
):
    # The real extracted test split stands in for a train split: the size is official.
    import kmnist_torch.data.arrays as arrays

    raw = real_root("train-labels-idx1-ubyte.gz", gunzip=True)
    images = read_idx(real_dir / "kmnist" / "t10k-images-idx3-ubyte.gz", 3)
    write_idx(raw / "train-images-idx3-ubyte", np.concatenate([images] * 6), compress=False)
    arrays._WARNED.clear()
    with pytest.warns(UncheckedContentWarning, match="no published checksum"):
        ds = KMNIST(tmp_path, train=True)
    assert not ds.verified and "content not verified" in repr(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedContentWarning)  # once per process
        KMNIST(tmp_path, train=True)


def test_verify_command_checks_extracted_files_and_never_overstates(tmp_path, capsys):
    from kmnist_torch.cli import main

    _layout_root(tmp_path, "kmnist", "extracted")
    assert main(["verify", "kmnist", "--root", str(tmp_path)]) == 1  # fixture sizes: not official
    out = capsys.readouterr().out
    assert "t10k-labels-idx1-ubyte: BAD: wrong size" in out
    # An extracted training-images file of the official size: no checksum exists for it.
    raw = tmp_path / "KMNIST" / "raw"
    for p in raw.iterdir():
        p.unlink()
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((60000, 28, 28), np.uint8), False)
    assert main(["verify", "kmnist", "--root", str(tmp_path)]) == 1  # the labels: missing
    out = capsys.readouterr().out
    assert "train-images-idx3-ubyte: OK (size only: no published checksum to check)" in out
    assert "train-labels-idx1-ubyte.gz: MISSING: the train split needs it" in out
