"""KKanji at 32x32 and 16x16 (``image_size``): the exact 2x2 means of ``resize.downsample``
against a plain reference, the class on a generated tree (same split, smaller pixels), and a
run trained with ``--image-size 16`` that evaluate, predict and export take as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import kkanji_files, write_kkanji_tree
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kmnist_torch
from kmnist_torch import catalog, evaluate, export, predict, train
from kmnist_torch.data.kkanji import resize
from kmnist_torch.data.kkanji.dataset import KKanji
from kmnist_torch.data.splits import load_split
from kmnist_torch.errors import KKanjiWarning, ModelFileError
from kmnist_torch.models.modelfile import model_meta, save_model
from kmnist_torch.models.registry import create_model

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------- exact 2x2 means


def _reference(image: np.ndarray, size: int) -> np.ndarray:
    """Halvings written out pixel by pixel in Python integers: each output pixel the mean of
    its 2x2 block, rounded half up."""
    a = [[int(v) for v in row] for row in image]
    while len(a) > size:
        half = range(len(a) // 2)
        a = [[(sum(a[2 * i + y][2 * j + x] for y in (0, 1) for x in (0, 1)) + 2) // 4
              for j in half] for i in half]  # fmt: skip
    return np.array(a, dtype=np.uint8)


_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.just(64), st.just(64)))


@settings(max_examples=25, deadline=None)
@given(images=_images, size=st.sampled_from([32, 16]))
def test_downsample_equals_a_plain_reference_and_stays_within_each_image(images, size):
    out = resize.downsample(images, size)
    assert out.dtype == np.uint8 and out.shape == (len(images), size, size)
    for img, small in zip(images, out):
        assert np.array_equal(small, _reference(img, size))
        assert img.min() <= small.min() and small.max() <= img.max()  # 0..255, and no wider
    assert np.array_equal(resize.downsample(torch.from_numpy(images), size), out)


@settings(max_examples=25, deadline=None)
@given(value=st.integers(0, 255), n=st.integers(1, 4), size=st.sampled_from([32, 16]))
def test_downsample_keeps_a_constant_image_constant(value, n, size):
    out = resize.downsample(np.full((n, 64, 64), value, np.uint8), size)
    assert out.shape == (n, size, size) and (out == value).all()


@settings(max_examples=10, deadline=None)
@given(images=_images)
def test_downsample_to_64_returns_the_pixels_unchanged(images):
    assert np.array_equal(resize.downsample(images, 64), images)
    index = np.arange(len(images))[::-1].copy()
    assert np.array_equal(resize.downsample(images, 64, index), images[index])


def test_downsample_halves_exactly_at_the_rounding_edges():
    # One 2x2 block for each sum 0..1020: every remainder mod 4 rounds half up, none overflows.
    sums = np.arange(1021)
    blocks = np.zeros((1024, 4), np.uint8)
    blocks[:1021] = np.stack([np.clip(sums - k * 255, 0, 255) for k in range(4)], axis=1)
    assert np.array_equal(blocks[:1021].sum(axis=1), sums)
    # blocks[32 * i + j, 2 * a + b] is pixel (2i + a, 2j + b).
    img = blocks.reshape(32, 32, 2, 2).transpose(0, 2, 1, 3).reshape(1, 64, 64)
    out = resize.downsample(img, 32).reshape(-1)[:1021]
    assert np.array_equal(out, (sums + 2) // 4) and out.max() == 255


def test_sizes_come_from_the_catalog_and_other_sizes_are_refused():
    assert resize.SIZES == catalog.KKANJI.sizes == (64, 32, 16)
    assert catalog.KMNIST.sizes == (28,)
    for bad in (48, 8, 128, 32.0, True, "32"):
        with pytest.raises(ValueError, match="image_size must be one of 64, 32, 16"):
            resize.check_size(bad)
    with pytest.raises(ValueError, match="cannot halve 28x28 images down to 16x16"):
        resize.halve_to(np.zeros((1, 28, 28), np.uint8), 16)


def test_downsample_by_index_holds_the_result_and_a_chunk_never_the_selection(
    tmp_path, monkeypatch
):
    # A memory map as the decoded cache is, 16 MiB; 3/4 of it picked by index.
    n = 4096
    images = np.lib.format.open_memmap(tmp_path / "i.npy", "w+", np.uint8, (n, 64, 64))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    images = np.load(tmp_path / "i.npy", mmap_mode="r")
    index = np.sort(np.random.default_rng(1).choice(n, 3 * n // 4, replace=False))
    monkeypatch.setattr(resize, "CHUNK", 100)
    tracemalloc.start()
    try:
        out = resize.downsample(images, 32, index)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # images[index] alone would be 12 MiB; the result is 3 MiB, a chunk 0.4 MiB.
    assert peak < out.nbytes + 8 * resize.CHUNK * 64 * 64 < images[index].nbytes
    assert np.array_equal(out, resize.downsample(np.asarray(images[index]), 32))


# --------------------------------------------------------------------- the KKanji class


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A generated tree: 3 classes of 8 images, 64x64 PNGs as published."""
    base = tmp_path_factory.mktemp("kksize")
    write_kkanji_tree(base / "KKanji", kkanji_files(3, 8, seed=5))
    return base


def _kk(root: Path, **kw) -> KKanji:
    with pytest.warns(KKanjiWarning):  # a subset, verify=False
        return KKanji(root, verify=False, **kw)


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_smaller_kkanji_is_the_same_split_with_downsampled_pixels(root, split):
    full = _kk(root, split=split)
    assert full.image_size == 64 and full.data.shape[1:] == (64, 64)
    for size in (32, 16):
        small = _kk(root, split=split, image_size=size, test_fraction=0.2)
        assert small.data.dtype == torch.uint8 and small.data.shape == (len(full), size, size)
        assert np.array_equal(small.data.numpy(), resize.downsample(full.data, size))
        assert torch.equal(small.targets, full.targets) and small.classes == full.classes
        assert small.split_indices() == full.split_indices()
        assert f"Images: {size}x{size} (exact 2x2 means of the 64x64 ones)" in repr(small)
        assert small[0][0].size == (size, size)  # the PIL image of __getitem__
    assert "Images: 64x64\n" in repr(full)


def test_kkanji_refuses_other_sizes_and_load_split_passes_image_size(root):
    with pytest.raises(ValueError, match="image_size must be one of 64, 32, 16, got 48"):
        KKanji(root, verify=False, image_size=48)
    split = load_split("kkanji", root, False, None, False, False, image_size=32)  # says nothing
    test = _kk(root, split="test")
    assert split.data.shape == (3, 32, 32) and split.classes == test.classes  # 1 of 8 per class
    assert np.array_equal(split.data.numpy(), resize.downsample(test.data, 32))
    assert torch.equal(split.targets, test.targets)


# ------------------------------------------------------------- a run at 16x16, end to end


def _python(*args: str, cwd: Path, err: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KMNIST_TORCH_OFFICIAL": "0"}
    with open(err, "w") as fh:
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=fh, text=True, timeout=300,
        )  # fmt: skip


def _train_args(root: Path, out: Path, size: str) -> list[str]:
    return ["--dataset", "kkanji", "--image-size", size, "--model", "simple_cnn", "--epochs", "1",
            "--batch-size", "8", "--root", str(root), "--no-verify", "--threads", "1", "--out",
            str(out)]  # fmt: skip


def test_a_16x16_run_trains_resumes_only_at_16_and_evaluate_predict_export_read_it(
    root, tmp_path, capsys
):
    # One run, trained in a real process as a user would, then everything after training on
    # it (in this process: each command's own main, so the suite stays within its budget).
    run = tmp_path / "run"
    proc = _python("kmnist_torch.train", *_train_args(root, run, "16"), cwd=tmp_path,
                   err=tmp_path / "err")  # fmt: skip
    assert proc.returncode == 0, (tmp_path / "err").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["image_size"] == 16 and results["config"]["image_size"] == 16
    model = kmnist_torch.load_model(run)
    assert model.meta["image_size"] == 16 and model.meta["data"]["options"] == {"image_size": 16}
    # --resume with another size: one error line naming it, the checkpoint untouched.
    before = (run / "checkpoint.pt").read_bytes()
    assert train.main([*_train_args(root, run, "32"), "--resume"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "other settings: image_size=16 (now 32)." in errors[0], lines
    assert not any("Traceback" in ln for ln in lines)
    assert (run / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit) as usage:  # a usage error, before any work
        train.main(_train_args(root, run, "48"))
    assert usage.value.code == 2
    assert "invalid choice: 48 (choose from 64, 32, 16)" in capsys.readouterr().err
    # evaluate rebuilds the 16x16 test part from the model file's options.
    assert evaluate.main([str(run), "--no-verify", "--out", str(tmp_path / "eval")]) == 0
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["accuracy"] == pytest.approx(results["test_accuracy"])
    # predict on the test part's own 64x64 PNGs: the very 16x16 pixels the run tested on.
    test = _kk(root, split="test", image_size=16)
    pngs = [str(root / "KKanji" / p) for p in test.split_indices()["test"]]
    capsys.readouterr()
    assert predict.main([str(run), *pngs, "--json", "--top-k", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        probs = torch.softmax(model(test.data.unsqueeze(1).float() / 255), dim=1)
    assert len(got) == len(pngs) == len(test) == 3
    for row, want in zip(got, probs):
        best = row["predictions"][0]
        assert best["class"] == int(want.argmax())
        assert best["probability"] == pytest.approx(float(want.max()), abs=1e-5)
    # export checks the exported model against eager on the run's 16x16 test images.
    out = tmp_path / "m.ts"
    argv = [str(run), "--format", "torchscript", "--out", str(out), "--no-verify"]
    assert export.main(argv) == 0 and out.stat().st_size > 0
    assert "max abs difference from the eager model on 3 test images" in capsys.readouterr().out


# ------------------------------------------------------------------ model-file metadata


def _saved(path: Path, dataset: str, size: int, classes: list[str]) -> Path:
    args = {"num_classes": len(classes), "in_chans": 1, "img_size": size}
    model = create_model("simple_cnn", **args)
    save_model(path, model, model_meta("simple_cnn", args, dataset, classes, data={}))
    return path


def test_model_metadata_takes_the_dataset_sizes_and_no_other(tmp_path):
    kanji = ["\u4e00", "\u4e01", "\u4e02"]
    for size in (64, 32, 16):
        model = kmnist_torch.load_model(_saved(tmp_path / f"k{size}.pt", "kkanji", size, kanji))
        assert model.meta["input_size"] == [1, size, size]
    kana = [c.char for c in catalog.KMNIST.classes]
    kmnist_torch.load_model(_saved(tmp_path / "m28.pt", "kmnist", 28, kana))
    cases = [
        ("kmnist", 32, kana, "img_size for kmnist 32 (expected an integer from 28 to 28)"),
        ("kkanji", 48, kanji, "img_size for kkanji 48 (expected one of 64, 32, 16)"),
        ("kkanji", 8, kanji, "img_size for kkanji 8 (expected an integer from 16 to 64)"),
    ]
    for dataset, size, classes, words in cases:
        file = _saved(tmp_path / f"{dataset}{size}.pt", dataset, size, classes)
        with pytest.raises(ModelFileError, match="was not written by kmnist_torch") as info:
            kmnist_torch.load_model(file)
        assert words in str(info.value)
