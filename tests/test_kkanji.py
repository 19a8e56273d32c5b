"""Kuzushiji-Kanji with the real PNGs of ../shared/data/real/kkanji, packed into tars here and
served from 127.0.0.1: classes, order, counts, splits, the decoded cache, the tar record, and
hostile or damaged tars."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import SHARED_REAL, Server, mirror_env
from fakedata import kkanji_files, kkanji_tar, write_kkanji_tree

from kmnist_torch import catalog
from kmnist_torch.data.kkanji import cache as kkcache
from kmnist_torch.data.kkanji.dataset import KKanji
from kmnist_torch.data.kkanji.layout import RECORD_NAME
from kmnist_torch.data.kkanji.split import write_split_file
from kmnist_torch.errors import ArchiveError, DataFilesError, FormatError, KKanjiWarning

SUBSET2 = "kkanji2-subset-2perclass"  # 3,832 classes, 6,849 images (815 singletons)
TOP100 = "kkanji2-top100-50perclass"  # the 100 largest classes, 50 images each
TAR_PATH = "/kkanji/kkanji.tar"
MTIME = 1_546_300_800  # 2019-01-01, a fixed member time so tars are reproducible


def _real_tree(name: str) -> Path:
    tree = SHARED_REAL / "kkanji" / name / "kkanji2"
    if not tree.is_dir():
        pytest.skip(f"real Kuzushiji-Kanji PNGs not available ({tree} is absent)")
    return tree


def _files(tree: Path, classes: int | None = None, per_class: int | None = None):
    """(class folder, file name, bytes) of a real tree, classes in codepoint order."""
    folders = sorted((d.name for d in tree.iterdir()), key=lambda n: int(n[2:], 16))
    out = []
    for folder in folders[:classes]:
        for f in sorted((tree / folder).iterdir())[:per_class]:
            out.append((folder, f.name, f.read_bytes()))
    return out


def _pack(files, extra=(), mtime: int = MTIME) -> bytes:
    return kkanji_tar(files, extra, mtime)


def _write_tree(folder: Path, files, order_seed: int | None = None) -> Path:
    """Write ``files`` as an extracted ``kkanji2/`` under ``folder``, optionally in a shuffled
    order (so the filesystem lists them differently)."""
    files = list(files)
    if order_seed is not None:
        random.Random(order_seed).shuffle(files)
    return write_kkanji_tree(folder, files)


def _png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _serve(server, monkeypatch, tar: bytes) -> None:
    server.add(TAR_PATH, tar)
    mirror_env(monkeypatch, server.url)


def _expect_counts(monkeypatch, classes: int, images: int) -> None:
    """Make a subset count as complete, to exercise verify=True with the real files here."""
    full = dataclasses.replace(catalog.KKANJI, num_classes=classes, split_sizes={"all": images})
    monkeypatch.setattr(catalog, "KKANJI", full)


@contextlib.contextmanager
def _no_kkanji_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", KKanjiWarning)
        yield


def _nothing_trusted(folder: Path) -> None:
    """No tree, no extraction leftovers, no cache and no record after a failure."""
    assert not (folder / "kkanji2").exists()
    assert not list(folder.glob(".kkanji2.extract-*"))
    assert not (folder / "cache").exists() or not any((folder / "cache").iterdir())
    assert not (folder / RECORD_NAME).exists()


# --------------------------------------------------------------------------- module fixtures


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The 2-per-class subset (all 3,832 classes), downloaded once from a local mirror."""
    files = _files(_real_tree(SUBSET2))
    tar = _pack(files)
    server = Server()
    server.add(TAR_PATH, tar)
    root = tmp_path_factory.mktemp("subset")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KMNIST_TORCH_TIMEOUT", "5")
            mp.setenv("KMNIST_TORCH_OFFICIAL", "0")
            mp.setenv("no_proxy", "127.0.0.1,localhost")
            for var in ("http_proxy", "HTTP_PROXY", "all_proxy"):
                mp.delenv(var, raising=False)
            mirror_env(mp, server.url)
            with pytest.warns(KKanjiWarning, match="3832 classes and 6849 images"):
                ds = KKanji(root, split="all", download=True, verify=False)
    finally:
        server.close()
    return SimpleNamespace(root=root, folder=root / "KKanji", tar=tar, files=files, ds=ds,
                           hits=len(server.hits(TAR_PATH)))  # fmt: skip


@pytest.fixture(scope="module")
def top100_files():
    """100 classes of 50 synthetic 64x64 grayscale PNGs, written by the package's own writer:
    the extraction, cache and split tests run on any clone, with or without ../shared."""
    return kkanji_files(100, 50, seed=0)


pytestmark = pytest.mark.filterwarnings("ignore::kmnist_torch.errors.KKanjiWarning")


# --------------------------------------------------------------------------- the real subset


def test_download_extracts_records_and_caches(subset, real_dir):
    folder = subset.folder
    assert subset.hits == 1
    assert sum(1 for _ in (folder / "kkanji2").glob("U+*/*.png")) == 6849
    rec = json.loads((folder / RECORD_NAME).read_text())
    assert rec["sha256"] == hashlib.sha256(subset.tar).hexdigest()
    assert rec["size"] == len(subset.tar) == (folder / "kkanji.tar").stat().st_size
    (npy,) = (folder / "cache").glob("images-*.npy")
    arr = np.load(npy, mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (6849, 64, 64) and arr.dtype == np.uint8
    (index_path,) = (folder / "cache").glob("index-*.json")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    assert len(index["files"]) == 6849 and len(index["codepoints"]) == 3832
    assert sum(index["counts"]) == 6849
    assert not list(folder.glob(".kkanji2.extract-*")) and not list(folder.glob("*.part"))


def test_classes_codepoints_counts(subset, real_dir):
    ds = subset.ds
    assert len(ds) == 6849 and ds.data.shape == (6849, 64, 64)
    assert ds.data.dtype == torch.uint8 and ds.targets.dtype == torch.int64
    assert len(ds.classes) == len(ds.codepoints) == 3832
    values = [int(cp[2:], 16) for cp in ds.codepoints]
    assert values == sorted(values) and len(set(values)) == 3832
    # The 7 five-digit codepoints come last, after U+FA5C; a string sort would put them first.
    assert ds.codepoints[:2] == ["U+4093", "U+4453"] and sorted(ds.codepoints)[0] == "U+241C6"
    assert ds.codepoints[-8:] == ["U+FA5C", "U+241C6", "U+24FA3", "U+25DA1", "U+27752",
                                  "U+29780", "U+29DDA", "U+29E75"]  # fmt: skip
    assert ds.class_to_idx["一"] == ds.codepoints.index("U+4E00")
    assert all(chr(int(cp[2:], 16)) == c for cp, c in zip(ds.codepoints, ds.classes))
    assert ds.class_to_idx == {c: i for i, c in enumerate(ds.classes)}
    counts = torch.bincount(ds.targets, minlength=3832)
    assert int((counts == 1).sum()) == 815 and int((counts == 2).sum()) == 3017


def test_pixels_match_the_pngs(subset, real_dir):
    ds = subset.ds
    by_class: dict[str, list] = {}
    for folder, name, data in subset.files:
        by_class.setdefault(folder, []).append((name, data))
    for cp in ("U+4E00", "U+241C6", ds.codepoints[1234]):
        k = ds.codepoints.index(cp)
        first = sorted(by_class[cp])[0][1]
        expected = np.asarray(PIL.Image.open(io.BytesIO(first)))
        assert np.array_equal(ds.data[ds.targets == k][0].numpy(), expected)


def test_getitem_and_transforms(subset, real_dir):
    img, target = subset.ds[5]
    assert isinstance(img, PIL.Image.Image) and img.mode == "L" and img.size == (64, 64)
    assert target == int(subset.ds.targets[5]) and isinstance(target, int)
    ds = KKanji(subset.root, split="all", verify=False, transform=lambda im: np.asarray(im) / 255,
                target_transform=lambda t: -t)  # fmt: skip
    x, y = ds[5]
    assert x.max() <= 1.0 and y == -target
    text = repr(ds)
    assert "Split: all" in text and "CC BY-SA 4.0" in text and "a subset" in text


def test_min_per_class_2_drops_the_815_singletons(subset, real_dir):
    ds = KKanji(subset.root, split="all", verify=False, min_per_class=2)
    assert len(ds.classes) == 3017 and len(ds) == 6034
    assert torch.equal(torch.bincount(ds.targets), torch.full((3017,), 2))
    per_class = collections.Counter(folder for folder, _, _ in subset.files)
    singles = {folder for folder, n in per_class.items() if n == 1}
    assert len(singles) == 815 and not singles & set(ds.codepoints)
    assert ds.class_to_idx[ds.classes[-1]] == 3016


def test_stratified_split_keeps_small_classes_in_train(subset, real_dir):
    train = KKanji(subset.root, "train", verify=False, test_fraction=0.5)
    test = KKanji(subset.root, "test", verify=False, test_fraction=0.5)
    assert len(train) + len(test) == 6849 and len(test) == 3017
    tr = torch.bincount(train.targets, minlength=3832)
    te = torch.bincount(test.targets, minlength=3832)
    full = tr + te
    assert torch.equal(te, full // 2)  # floor(n * 0.5): 1 of 2, 0 of 1
    assert bool((tr >= 1).all())  # every singleton stays in train
    # floor(2 * 0.2) = 0: at the default fraction this subset has no test image at all
    assert len(KKanji(subset.root, "test", verify=False)) == 0
    parts = train.split_indices()
    assert not set(parts["train"]) & set(parts["test"])
    assert len(parts["train"]) + len(parts["test"]) == 6849


def test_second_construction_touches_no_png(subset, real_dir, monkeypatch):
    (npy,) = (subset.folder / "cache").glob("images-*.npy")
    before = npy.stat().st_mtime_ns

    monkeypatch.setattr(PIL.Image, "open", _fail)
    monkeypatch.setattr(kkcache, "_decode_chunk", _fail)
    ds = KKanji(subset.root, split="all", verify=False)
    assert torch.equal(ds.data, subset.ds.data) and npy.stat().st_mtime_ns == before


def test_verify_true_refuses_a_partial_tree(subset, real_dir):
    with pytest.raises(DataFilesError, match="3832 classes and 6849 images.*verify=False"):
        KKanji(subset.root, split="all")


# --------------------------------------------------------------------------- splits


def test_split_is_the_same_in_two_roots_whatever_the_listing_order(
    top100_files, tmp_path, http_server, fast_net
):
    _serve(http_server, fast_net, _pack(top100_files))
    a = KKanji(tmp_path / "a", download=True, verify=False)
    # Root b: extracted by hand in a shuffled order, no tar, listed in reverse order.
    _write_tree(tmp_path / "b" / "KKanji", top100_files, order_seed=7)
    real_scandir = os.scandir

    @contextlib.contextmanager
    def reversed_scandir(path):
        with real_scandir(path) as it:
            entries = list(it)
        yield iter(sorted(entries, key=lambda e: e.name, reverse=True))

    fast_net.setenv("KMNIST_TORCH_MIRRORS", "")  # root b must need no network
    fast_net.setattr(os, "scandir", reversed_scandir)
    b = KKanji(tmp_path / "b", verify=False)
    fast_net.setattr(os, "scandir", real_scandir)
    assert not (tmp_path / "b" / "KKanji" / "kkanji.tar").exists()
    assert a.split_indices() == b.split_indices()
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    assert len(a) == 4000 and torch.equal(torch.bincount(a.targets), torch.full((100,), 40))
    test = a.split_indices()["test"]
    other = KKanji(tmp_path / "a", verify=False, seed=1).split_indices()
    assert other["test"] != test and len(other["test"]) == 1000


@pytest.mark.real_data
def test_published_split_of_the_real_top100_never_changes(real_dir, tmp_path):
    # A published split must never change: these are the seed-0 test files of U+4E00 in the
    # 100 largest real classes (50 images each).
    _write_tree(tmp_path / "KKanji", _files(_real_tree(TOP100)))
    test = KKanji(tmp_path, verify=False).split_indices()["test"]
    assert [t for t in test if "/U+4E00/" in t] == GOLDEN_U4E00_TEST and len(test) == 1000
    assert hashlib.sha256("\n".join(test).encode()).hexdigest() == GOLDEN_TOP100_TEST_SHA256


GOLDEN_U4E00_TEST = [
    "kkanji2/U+4E00/" + name + ".png"
    for name in (
        "01d3ccf8de2068a4 0242d1a4f26a096a 0265f2c12db960fb 02d4b1f2e0a6f222 03072957267692d2 "
        "0342d4204d9e7d0a 0515a072391e29f9 05a1d043e4ddad63 063ae1407c7498eb 06a5a4d5be78d372"
    ).split()
]
GOLDEN_TOP100_TEST_SHA256 = "69be9ab2f722784109dfb47c8a2103651bb95deb97d42eed81761167d51ec0ba"


def test_test_fraction_is_exact_decimal_arithmetic(top100_files, tmp_path):
    _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 3, 50))
    # 50 * 0.58 is 28.999999999999996 in floating point; a person computes 29.
    ds = KKanji(tmp_path, "test", verify=False, test_fraction=0.58)
    assert torch.equal(torch.bincount(ds.targets), torch.full((3,), 29))
    assert len(KKanji(tmp_path, "test", verify=False, test_fraction=0.0)) == 0


def _subset_of(files, classes: int, per_class: int):
    out, seen = [], {}
    for f in files:
        seen.setdefault(f[0], 0)
        if len(seen) <= classes and seen[f[0]] < per_class:
            seen[f[0]] += 1
            out.append(f)
    return out


def test_shots_keeps_k_training_images_per_class(top100_files, tmp_path):
    _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 10, 50))
    full = KKanji(tmp_path, verify=False)
    five = KKanji(tmp_path, verify=False, shots=5)
    ten = KKanji(tmp_path, verify=False, shots=10)
    assert torch.equal(torch.bincount(five.targets), torch.full((10,), 5))
    p_full, p5, p10 = full.split_indices(), five.split_indices(), ten.split_indices()
    assert p5["test"] == p10["test"] == p_full["test"]  # test unchanged
    assert set(p5["train"]) < set(p10["train"]) < set(p_full["train"])  # nested k-shot sets
    assert len(KKanji(tmp_path, "test", verify=False, shots=5)) == 100
    assert len(KKanji(tmp_path, verify=False, shots=1000)) == len(full)


def test_bad_arguments_are_refused(tmp_path):
    for kwargs, exc in (
        ({"split": "val"}, ValueError),
        ({"test_fraction": 1.0}, ValueError),
        ({"test_fraction": "0.2"}, TypeError),
        ({"min_per_class": 0}, ValueError),
        ({"shots": 0}, ValueError),
        ({"seed": 1.5}, TypeError),
    ):
        with pytest.raises(exc):
            KKanji(tmp_path, **kwargs)


def test_write_split_json_matches_the_dataset(top100_files, tmp_path):
    _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 4, 50))
    out = tmp_path / "out" / "split.json"
    doc = write_split_file(out, root=tmp_path, seed=3, shots=7, verify=False)
    assert json.loads(out.read_text(encoding="utf-8")) == doc
    # The split obeys the audit, which reads the decoded images: nothing found in these.
    assert doc["split_version"] == "kkanji-split-v2"
    assert doc["audit"]["identical_groups"] == 0 and doc["audit"]["blank_images"] == 0
    ds = KKanji(tmp_path, verify=False, seed=3, shots=7)
    assert {"train": doc["train"], "test": doc["test"]} == ds.split_indices()
    assert doc["arguments"] == {"test_fraction": 0.2, "seed": 3, "min_per_class": 1, "shots": 7}
    assert [c["char"] for c in doc["classes"]] == ds.classes
    assert all(c["train"] == 7 and c["test"] == 10 for c in doc["classes"])
    assert doc["source"]["images"] == 200 and doc["source"]["complete"] is False


# --------------------------------------------------------------------------- cache and source


def test_cache_is_rebuilt_when_the_source_changes(top100_files, tmp_path):
    tree = _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 5, 20))
    first = KKanji(tmp_path, split="all", verify=False)
    (old_npy,) = (tmp_path / "KKanji" / "cache").glob("images-*.npy")
    victim = sorted((tree / "U+4E00").iterdir())[0]
    inverted = PIL.Image.eval(PIL.Image.open(victim), lambda v: 255 - v)
    victim.write_bytes(_png(inverted))
    second = KKanji(tmp_path, split="all", verify=False)
    assert np.array_equal(second.data[0].numpy(), np.asarray(inverted))
    assert torch.equal(second.data[0], 255 - first.data[0])
    # Only the new tree's images, index and audit facts are left.
    left = sorted(p.name.split("-")[0] for p in (tmp_path / "KKanji" / "cache").iterdir())
    assert not old_npy.exists() and left == ["audit", "images", "index"]
    sorted((tree / "U+4E01").iterdir())[3].unlink()
    assert len(KKanji(tmp_path, split="all", verify=False)) == 99


def test_already_extracted_tree_needs_no_tar_or_network(top100_files, tmp_path, fast_net):
    _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 3, 10))
    ds = KKanji(tmp_path, split="all", verify=False, download=True)  # nothing to download
    assert len(ds) == 30 and ds.tar_sha256 is None
    assert not (tmp_path / "KKanji" / "kkanji.tar").exists()


def test_missing_data_says_what_to_fetch(tmp_path, fast_net):
    mirror_env(fast_net, "http://mirror.invalid/base")
    with pytest.raises(DataFilesError) as err:
        KKanji(tmp_path)
    msg = str(err.value)
    assert "http://mirror.invalid/base/kkanji/kkanji.tar" in msg and "download=True" in msg
    assert str(tmp_path / "KKanji" / "kkanji.tar") in msg


def test_a_damaged_png_in_a_tree_is_named_and_no_cache_written(top100_files, tmp_path, monkeypatch):
    tree = _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 4, 30))
    victim = sorted((tree / "U+4E02").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-60])
    # Through the process pool, small chunks: a worker's error must reach the caller.
    monkeypatch.setattr(kkcache, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(kkcache, "CHUNK_IMAGES", 16)
    monkeypatch.setenv("KMNIST_TORCH_DECODE_WORKERS", "2")
    with pytest.raises(FormatError, match=victim.name):
        KKanji(tmp_path, verify=False)
    assert not list((tmp_path / "KKanji" / "cache").glob("*.json"))
    assert not list((tmp_path / "KKanji" / "cache").glob("*.npy*"))


# ------------------------------------------------------------ verify=True and the tar record


def test_verify_true_accepts_a_complete_tree_silently(top100_files, tmp_path, monkeypatch):
    _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 5, 10))
    _expect_counts(monkeypatch, 5, 50)
    with _no_kkanji_warning():
        ds = KKanji(tmp_path, split="all")
    assert ds.complete and "complete (5 classes, 50 images)" in repr(ds)


def test_recorded_tar_sha256_is_checked_on_later_use(top100_files, tmp_path, http_server, fast_net):
    files = _subset_of(top100_files, 5, 10)
    tar1 = _pack(files)
    tar2 = _pack(files, mtime=MTIME + 1)  # same images, different bytes
    _expect_counts(fast_net, 5, 50)
    _serve(http_server, fast_net, tar1)
    folder = tmp_path / "KKanji"
    ds = KKanji(tmp_path, split="all", download=True)
    assert ds.tar_sha256 == hashlib.sha256(tar1).hexdigest()
    tar = folder / "kkanji.tar"

    # 1. the tar on disk is replaced while the tree is there: detected on the next use
    tar.write_bytes(tar2)
    with pytest.raises(DataFilesError, match="differs from the copy recorded"):
        KKanji(tmp_path)
    with pytest.warns(KKanjiWarning, match="differs from the copy recorded"):
        KKanji(tmp_path, verify=False)

    # 2. no tree: the replaced tar is not extracted
    shutil.rmtree(folder / "kkanji2")
    with pytest.raises(DataFilesError, match="sha256"):
        KKanji(tmp_path)
    assert not (folder / "kkanji2").exists() and tar.read_bytes() == tar2

    # 3. nothing local, and the mirror now serves other bytes: the download is refused
    tar.unlink()
    http_server.add(TAR_PATH, tar2)
    with pytest.raises(DataFilesError, match="recorded"):
        KKanji(tmp_path, download=True)
    assert not tar.exists() and not list(folder.glob("*.part"))
    assert not (folder / "kkanji2").exists()

    # 4. the original bytes again: accepted; the re-extracted tree keeps its fingerprint (member
    # times are restored), so the decoded cache is still valid and no PNG is decoded
    http_server.add(TAR_PATH, tar1)
    fast_net.setattr(kkcache, "_decode_chunk", _fail)
    again = KKanji(tmp_path, split="all", download=True)
    assert torch.equal(again.data, ds.data)


def _fail(*args, **kwargs):
    raise AssertionError("decoded although the cache is valid")


# --------------------------------------------------------------------------- hostile tars


def _small_png(size=(32, 32), mode="L") -> bytes:
    return _png(PIL.Image.new(mode, size, 128 if mode == "L" else (1, 2, 3)))


REG = {"type": tarfile.REGTYPE}
HOSTILE = {
    "traversal": ("../evil.png", b"x", REG),
    "nested-traversal": ("kkanji2/U+4E00/../../../evil.png", b"x", REG),
    "absolute": ("/tmp/kkanji-test-evil.png", b"x", REG),
    "symlink": ("kkanji2/U+4E00/link.png", None,
                {"type": tarfile.SYMTYPE, "linkname": "../../../../etc/passwd"}),
    "hardlink": ("kkanji2/U+4E00/hard.png", None,
                 {"type": tarfile.LNKTYPE, "linkname": "kkanji2/U+4E00/first.png"}),
    "device": ("kkanji2/U+4E00/dev.png", None,
               {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
    "fifo": ("kkanji2/U+4E00/fifo.png", None, {"type": tarfile.FIFOTYPE}),
    "non-png-name": ("kkanji2/U+4E00/readme.txt", b"hello", REG),
    "not-a-png": ("kkanji2/U+4E00/fake.png", b"<html>not an image</html>", REG),
    "wrong-size": ("kkanji2/U+4E00/small.png", "32x32", REG),
    "rgb": ("kkanji2/U+4E00/colour.png", "rgb", REG),
    "outside-layout": ("other/U+4E00/x.png", "ok", REG),
    "bad-class-folder": ("kkanji2/U+ZZZZ/x.png", "ok", REG),
    "duplicate": ("kkanji2/U+4E00/first.png", "ok", REG),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused_and_nothing_kept(
    case, top100_files, tmp_path, http_server, fast_net
):
    name, data, attrs = HOSTILE[case]
    ok = top100_files[0][2]
    data = {"32x32": _small_png(), "rgb": _small_png((64, 64), "RGB"), "ok": ok}.get(data, data)
    files = [("U+4E00", "first.png", ok)] + [("U+4E00", n, d) for _, n, d in top100_files[1:4]]
    root = tmp_path / "root"
    _serve(http_server, fast_net, _pack(files, extra=[(name, data, attrs)]))
    with pytest.raises(ArchiveError) as err:
        KKanji(root, download=True, verify=False)
    assert repr(name) in str(err.value)
    folder = root / "KKanji"
    _nothing_trusted(folder)
    assert not (folder / "kkanji.tar").exists()  # a fetched tar that failed is not kept
    assert not (tmp_path / "evil.png").exists() and not (root / "evil.png").exists()
    assert not Path("/tmp/kkanji-test-evil.png").exists()


def _offsets(tar: bytes) -> list[int]:
    """Where each member's header starts, and where the last member's data ends."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
    last = members[-1]
    return [m.offset for m in members] + [last.offset_data + -(-last.size // 512) * 512]


@pytest.mark.parametrize("cut", ["mid-member", "member-boundary", "no-end-marker", "not-a-tar"])
def test_truncated_or_damaged_tar_is_an_error(cut, top100_files, tmp_path, http_server, fast_net):
    tar = _pack(_subset_of(top100_files, 2, 5))
    offsets = _offsets(tar)
    data = {
        "mid-member": tar[: offsets[5] + 700],
        "member-boundary": tar[: offsets[6]],
        "no-end-marker": tar[: offsets[-1]],
        "not-a-tar": b"<html><body>502 Bad Gateway</body></html>" * 30,
    }[cut]
    _serve(http_server, fast_net, data)
    with pytest.raises(ArchiveError, match="truncated|damaged"):
        KKanji(tmp_path, download=True, verify=False)
    _nothing_trusted(tmp_path / "KKanji")


def test_a_hostile_tar_placed_by_hand_is_kept_but_not_trusted(top100_files, tmp_path):
    folder = tmp_path / "KKanji"
    folder.mkdir()
    files = _subset_of(top100_files, 1, 3)
    bad = _pack(files, extra=[("kkanji2/U+4E00/link.png", None, HOSTILE["symlink"][2])])
    (folder / "kkanji.tar").write_bytes(bad)
    for _ in range(2):  # and again: the failure left nothing a second run would trust
        with pytest.raises(ArchiveError, match="symbolic link"):
            KKanji(tmp_path, verify=False)
        _nothing_trusted(folder)
    assert (folder / "kkanji.tar").read_bytes() == bad


def test_verify_true_refuses_an_incomplete_tar_before_placing_it(
    top100_files, tmp_path, http_server, fast_net
):
    _expect_counts(fast_net, 5, 50)
    _serve(http_server, fast_net, _pack(_subset_of(top100_files, 5, 9)))
    with pytest.raises(ArchiveError, match="5 classes and 45 images"):
        KKanji(tmp_path, download=True)
    _nothing_trusted(tmp_path / "KKanji")


# --------------------------------------------------------------------------- the command line


def test_cli_info_kkanji_says_what_is_verified(capsys):
    from kmnist_torch.cli import main

    assert main(["info", "kkanji"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the note is wrapped to the terminal
    assert "Kuzushiji-Kanji (kkanji)" in out and "140,424" in out
    assert "kkanji/kkanji.tar" in out and "not published" in out
    assert "verification: no checksum of kkanji.tar is published" in out
    assert "3,832 classes and 140,424 images" in out


def test_cli_kkanji_split_writes_the_json_and_verify_reports(top100_files, tmp_path, capsys):
    from kmnist_torch.cli import main

    _write_tree(tmp_path / "KKanji", _subset_of(top100_files, 3, 20))
    out = tmp_path / "split.json"
    assert main(["kkanji-split", "--root", str(tmp_path), "--out", str(out), "--seed", "5",
                 "--no-verify"]) == 0  # fmt: skip
    assert "48 train / 12 test file names" in capsys.readouterr().out
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert (len(doc["train"]), len(doc["test"])) == (48, 12)
    assert doc == write_split_file(tmp_path / "again.json", root=tmp_path, seed=5, verify=False)
    # verify=True (the default) refuses the subset: a clear error, exit status 1, no JSON.
    assert main(["kkanji-split", "--root", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "3 classes and 60 images" in err and "verify=False" in err
    assert not (tmp_path / "x.json").exists()
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 1
    assert "kkanji: BAD" in capsys.readouterr().out


def test_cli_kkanji_split_without_data_is_an_error_not_a_traceback(tmp_path, fast_net, capsys):
    from kmnist_torch.cli import main

    assert main(["kkanji-split", "--root", str(tmp_path), "--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err
    assert "kkanji.tar" in err and str(tmp_path / "KKanji" / "kkanji.tar") in err
    assert main(["kkanji-split", "--root", str(tmp_path), "--out", str(tmp_path / "s.json"),
                 "--download"]) == 1  # fmt: skip
    assert "no download source" in capsys.readouterr().err


def test_trainer_runs_on_real_kkanji_images(real_dir, tmp_path, one_thread):
    from kmnist_torch import train

    _write_tree(tmp_path / "KKanji", _subset_of(_files(_real_tree(TOP100)), 4, 30))
    res = train.run(["--dataset", "kkanji", "--root", str(tmp_path), "--no-download",
                      "--no-verify", "--out", str(tmp_path / "run"), "--device", "cpu",
                      "--no-progress", "--recipe", "cnn", "--epochs", "1",
                      "--batch-size", "16", "--shots", "10", "--split-seed", "1"])  # fmt: skip
    ds = KKanji(tmp_path, split="test", seed=1, shots=10, verify=False)
    assert res["image_size"] == 64 and res["num_classes"] == 4
    assert res["num_test"] == len(ds) == 4 * 6 and res["num_train"] == 4 * 10
    assert res["epochs_done"] == 1 and res["finished"]


# ------------------------------------------------ the shipped digest and the audited split


def _use_digest_of(monkeypatch, tmp_path: Path, files) -> None:
    """Stand a digest of ``files`` in for the shipped one (and their counts for the full set's),
    as if they were the full Kuzushiji-Kanji."""
    from kmnist_torch.data.kkanji import digest

    ref = _write_tree(tmp_path / "reference", files)
    path = tmp_path / "digest.gz"
    digest.write(digest.compute(kkcache.scan_tree(ref, verify=False)), path)
    monkeypatch.setattr(digest, "DIGEST_PATH", path)
    _expect_counts(monkeypatch, len({f[0] for f in files}), len(files))


def test_verify_checks_every_image_against_the_digest_and_pins_a_mismatch(
    top100_files, tmp_path, monkeypatch
):
    from kmnist_torch.data.kkanji import digest

    files = _subset_of(top100_files, 4, 6)
    _use_digest_of(monkeypatch, tmp_path, files)
    tree = _write_tree(tmp_path / "KKanji", files)
    with _no_kkanji_warning():
        ds = KKanji(tmp_path, split="all")
    assert "every image checked against the shipped digest" in repr(ds)
    # A second load hashes nothing: every class is remembered as checked, by names, sizes
    # and mtimes.
    monkeypatch.setattr(digest, "class_digest", _fail)
    KKanji(tmp_path, split="all")
    monkeypatch.undo()
    _use_digest_of(monkeypatch, tmp_path, files)
    # One image of U+4E02 replaced by another valid 64x64 PNG (same name, same count): the
    # error names that class and only it; nothing is trusted on the way.
    victim = sorted((tree / "U+4E02").iterdir())[2]
    original = victim.read_bytes()
    victim.write_bytes(_png(PIL.Image.new("L", (64, 64), 7)))
    with pytest.raises(DataFilesError) as err:
        KKanji(tmp_path, split="all")
    message = str(err.value)
    assert "differs from the shipped digest" in message and "in 1 classes" in message
    assert "U+4E02: the images' names or bytes differ" in message and "U+4E00" not in message
    # An image moved to another class: both classes named, by their counts.
    victim.write_bytes(original)
    moved = sorted((tree / "U+4E00").iterdir())[0]
    moved.rename(tree / "U+4E01" / moved.name)
    with pytest.raises(DataFilesError, match=r"U\+4E00: 5 images, expected 6; U\+4E01: 7 images"):
        KKanji(tmp_path, split="all")
    (tree / "U+4E01" / moved.name).rename(moved)
    assert len(KKanji(tmp_path, split="all")) == 24


def test_the_shipped_digest_is_compact_and_holds_the_real_singletons(real_dir):
    # The digest of the full public tree (3,832 classes, 140,424 images): its own sha256 holds,
    # and each of the 815 classes of one image in the real subset hashes to its entry.
    from kmnist_torch.data.kkanji import digest

    shipped = digest.load()
    assert (len(shipped.classes), shipped.total) == (3832, 140424) and digest.applies()
    assert digest.DIGEST_PATH.stat().st_size < 300_000
    assert shipped.sha256 == "89007188da3b5b6578674641122e6ac33e002bad59ce34c1026db99d874bc779"
    tree = _real_tree(SUBSET2)
    singles = [f for f, (n, _) in shipped.classes.items() if n == 1]
    assert len(singles) == 815
    for folder in singles:
        names = [p.name for p in (tree / folder).iterdir()]
        assert (1, digest.class_digest(tree / folder, names)) == shipped.classes[folder]


def _audited_files():
    """Four classes of 10 synthetic images, plus in U+4E00 three identical images, in U+4E01
    and U+4E02 one image under both labels, and two blank images in U+4E03."""
    from fakedata import png_bytes

    files = kkanji_files(4, 10, seed=5)
    stroke = np.zeros((64, 64), np.uint8)
    stroke[8:56, 20:26] = 220
    other = stroke.T.copy()
    files += [("U+4E00", f"dddd00000000000{k}.png", png_bytes(stroke)) for k in range(3)]
    files += [("U+4E01", "eeee000000000000.png", png_bytes(other)),
              ("U+4E02", "eeee000000000001.png", png_bytes(other))]  # fmt: skip
    files += [("U+4E03", f"ffff00000000000{k}.png", png_bytes(np.full((64, 64), k, np.uint8)))
              for k in range(2)]  # fmt: skip
    return files


@pytest.mark.parametrize("seed", range(6))
def test_the_default_split_keeps_identical_images_on_one_side_and_blank_ones_out_of_test(
    tmp_path, seed
):
    _write_tree(tmp_path / "KKanji", _audited_files())
    ds = KKanji(tmp_path, split="all", verify=False, seed=seed, test_fraction=0.5)
    parts = ds.split_indices()
    test = set(parts["test"])
    same = [f"kkanji2/U+4E00/dddd00000000000{k}.png" for k in range(3)]
    assert len({p in test for p in same}) == 1  # all three on one side
    for name in ("U+4E01/eeee000000000000", "U+4E02/eeee000000000001", "U+4E03/ffff000000000000",
                 "U+4E03/ffff000000000001"):  # fmt: skip
        assert f"kkanji2/{name}.png" in parts["train"]
    # Every class still gives at most half of its images to the test part.
    counts = collections.Counter(p.split("/")[1] for p in test)
    assert counts["U+4E00"] <= 6 and counts["U+4E03"] == 6 and counts["U+4E01"] == 5
    assert "Audit: 2 groups of identical images (5 images), 2 blank" in repr(ds)


def test_the_verify_command_checks_the_tree_against_the_digest(top100_files, tmp_path, monkeypatch):
    from kmnist_torch.data import verify

    files = _subset_of(top100_files, 4, 6)
    _use_digest_of(monkeypatch, tmp_path, files)
    tree = _write_tree(tmp_path / "KKanji", files)
    said: list[str] = []
    with _no_kkanji_warning():
        assert not verify.check_archive(tmp_path / "KKanji").tree_bad
    victim = sorted((tree / "U+4E01").iterdir())[1]
    victim.write_bytes(_png(PIL.Image.new("L", (64, 64), 3)))
    state = verify.check_archive(tmp_path / "KKanji")
    assert state.tree_bad and "U+4E01: the images' names or bytes differ" in state.problems[0]
    assert verify.verify_dataset(tmp_path, "kkanji", say=said.append) == 1
    assert any("differs from the shipped digest" in line for line in said)
