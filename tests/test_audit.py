"""``python -m kmnist_torch audit``: exact duplicates within and across classes (with their
labels), blank images, per-class counts, as JSON and a picture; for KMNIST, what the 2019 fix
removed (black and duplicated images), found in a generated pre-2019-style root (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
from fakedata import kkanji_files, png_bytes, random_split, write_kkanji_tree

from kmnist_torch import catalog
from kmnist_torch.cli import main
from kmnist_torch.data.audit import BLANK_SHARE, INK_LEVEL, blank_mask, identical_groups
from kmnist_torch.data.resplit import write_split

REPO = Path(__file__).resolve().parent.parent


def _stroke(value: int = 200) -> np.ndarray:
    img = np.zeros((64, 64), np.uint8)
    img[10:50, 30:34] = value
    return img


def _kkanji_root(tmp_path: Path) -> Path:
    """Three classes of five images, plus: a pair of identical images inside U+4E00, one image
    also filed under U+4E01 and U+4E02 (the same bytes under three labels), and two blank
    images (one black, one with a 3-pixel speck) in U+4E02."""
    files = kkanji_files(3, 5, seed=3)
    same = png_bytes(_stroke())
    speck = np.zeros((64, 64), np.uint8)
    speck[0, :3] = 255
    files += [
        ("U+4E00", "aaaa000000000001.png", png_bytes(_stroke(150))),
        ("U+4E00", "aaaa000000000002.png", png_bytes(_stroke(150))),
        ("U+4E00", "bbbb000000000001.png", same),
        ("U+4E01", "bbbb000000000002.png", same),
        ("U+4E02", "bbbb000000000003.png", same),
        ("U+4E02", "cccc000000000001.png", png_bytes(np.zeros((64, 64), np.uint8))),
        ("U+4E02", "cccc000000000002.png", png_bytes(speck)),
    ]
    write_kkanji_tree(tmp_path / "KKanji", files)
    return tmp_path


def test_the_measures_are_what_the_docs_say():
    images = np.zeros((4, 64, 64), np.uint8)
    limit = int(np.ceil(BLANK_SHARE * 64 * 64))  # 21: the fewest ink pixels of a non-blank
    images[1].flat[: limit - 1] = INK_LEVEL  # 20 pixels at half intensity: still blank
    images[2].flat[:limit] = INK_LEVEL  # 21: a (faint) character
    images[3].flat[:4000] = INK_LEVEL - 1  # bright everywhere but below the ink level
    assert blank_mask(images).tolist() == [True, True, False, True]
    assert identical_groups(np.stack([images[0], images[2], images[0], images[3]])) == [[0, 2]]


def test_audit_kkanji_finds_duplicates_with_their_classes_and_blank_images(tmp_path, capsys):
    root = _kkanji_root(tmp_path)
    out, pic = tmp_path / "a.json", tmp_path / "a.png"
    assert main(["audit", "kkanji", "--root", str(root), "--no-verify", "--out", str(out),
                 "--picture", str(pic)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    same = report["identical"]
    assert (same["groups"], same["within_one_class"], same["across_classes"]) == (2, 1, 1)
    cross = next(g for g in same["list"] if g["cross_class"])
    assert cross["classes"] == ["U+4E00 一", "U+4E01 丁", "U+4E02 丂"] and cross["size"] == 3
    assert [m["name"] for m in cross["images"]] == [
        f"kkanji2/U+4E0{k}/bbbb00000000000{k + 1}.png" for k in range(3)
    ]
    blank = report["blank"]
    assert blank["count"] == 2 and blank["black"] == 1
    assert {b["class"] for b in blank["list"]} == {"U+4E02 丂"}
    assert [c["images"] for c in report["per_class"]] == [8, 6, 8]
    assert [c["blank"] for c in report["per_class"]] == [0, 0, 2]
    assert "identical images: 2 groups holding 5 images (1 within one class, 1 across" in printed
    assert "blank images: 2 (1 all black), in 1 classes" in printed
    with PIL.Image.open(pic) as im:  # one row of blank images, one per group, under a title
        assert im.format == "PNG" and im.size[1] > 3 * 32


def _stale_style(root: Path, clean: bool = False) -> None:
    """A KMNIST root shaped like the pre-2019 release: some black images and some images
    repeated (inside the training part, and between training and test)."""
    train, train_labels = random_split(300, seed=1)
    test, test_labels = random_split(100, seed=2)
    if not clean:
        train[[5, 17, 40]] = 0  # black
        train[100] = train[7]  # duplicated inside train (same label: 100 % 10 == 7 % 10 is 0)
        test[3] = train[8]  # the same image in train and test
    write_split(root, "kmnist", "train", train, train_labels)
    write_split(root, "kmnist", "test", test, test_labels)


def test_audit_kmnist_finds_what_the_2019_fix_removed(tmp_path, capsys):
    _stale_style(tmp_path / "old")
    out = tmp_path / "old.json"
    argv = ["audit", "kmnist", "--root", str(tmp_path / "old"), "--out", str(out),
            "--picture", str(tmp_path / "old.png")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["splits"] == {"train": 300, "test": 100}
    stale = report["stale_release"]
    assert stale["black_images"] == 3
    # The three black images are one group of identical images too; then the two repeats.
    assert stale["identical_groups"] == 3 and report["identical"]["across_train_and_test"] == 1
    assert f"what the {catalog.STALE_RELEASE_DATE} fix removed" in stale["verdict"]
    assert ["train[5]", "train[17]", "train[40]"] == [b["name"] for b in report["blank"]["list"]]
    assert "stale release: 0 black" not in capsys.readouterr().out
    # The same files without black or repeated images: not the old release.
    _stale_style(tmp_path / "new", clean=True)
    argv = ["audit", "kmnist", "--root", str(tmp_path / "new"), "--out", str(out),
            "--picture", str(tmp_path / "new.png")]  # fmt: skip
    assert main(argv) == 0
    stale = json.loads(out.read_text(encoding="utf-8"))["stale_release"]
    assert stale["verdict"] == "no black and no duplicated image: not the pre-2019-02-05 data"


def test_audit_k49_reads_whatever_split_the_root_has(tmp_path, capsys):
    images, labels = random_split(98, "k49", seed=4)
    images[50] = images[1]  # labels 50 % 49 == 1: the same class
    write_split(tmp_path, "k49", "test", images, labels)
    out = tmp_path / "k49.json"
    assert main(["audit", "k49", "--root", str(tmp_path), "--out", str(out),
                 "--picture", str(tmp_path / "k49.png")]) == 0  # fmt: skip
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["splits"] == {"test": 98} and "stale_release" not in report
    assert [m["name"] for m in report["identical"]["list"][0]["images"]] == ["test[1]", "test[50]"]


def test_audit_without_data_is_one_error_line_and_no_traceback(tmp_path, capsys):
    # In a real process for KKanji (torch-free, quick to start); in this one for KMNIST.
    env = {**os.environ, "PYTHONPATH": str(REPO), "KMNIST_TORCH_OFFICIAL": "0"}
    with open(tmp_path / "err", "w+") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "kmnist_torch", "audit", "kkanji", "--root", str(tmp_path),
             "--out", str(tmp_path / "a.json")],  # fmt: skip
            stderr=err, stdout=subprocess.DEVNULL, timeout=120, env=env, cwd=tmp_path,
        )  # fmt: skip
        err.seek(0)
        lines = err.read().splitlines()
    assert proc.returncode == 1
    # One error (it names the file to fetch on the lines after it), no traceback.
    assert lines[0].startswith("error: ") and str(tmp_path) in lines[0]
    assert sum(line.startswith("error") for line in lines) == 1
    assert not any("Traceback" in line for line in lines)
    assert (
        main(["audit", "kmnist", "--root", str(tmp_path), "--out", str(tmp_path / "a.json")]) == 1
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: audit kmnist: no split of")
    assert not (tmp_path / "a.json").exists() and not list(tmp_path.glob("*.png"))
