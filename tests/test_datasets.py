"""KMNIST and K49 end to end: real files from ../shared served by a real HTTP server on
127.0.0.1, both formats, torchvision compatibility, and the errors a user sees."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from kmnist_torch import K49, KMNIST, DataFilesError, FormatError, catalog
from kmnist_torch.data.formats import write_idx, write_npz

KMNIST_TEST_FILES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "kmnist-test-imgs.npz",
    "kmnist-test-labels.npz",
    "kmnist_classmap.csv",
]


@pytest.mark.parametrize("fmt", ["mnist", "npz"])
def test_kmnist_test_split_downloads_end_to_end(tmp_path, real_mirror, fmt):
    ds = KMNIST(tmp_path, train=False, download=True, format=fmt)
    assert ds.data.shape == (10000, 28, 28) and ds.data.dtype == torch.uint8
    assert ds.targets.dtype == torch.int64
    assert torch.bincount(ds.targets).tolist() == [1000] * 10
    assert ds.classes == list("おきすつなはまやれを")
    assert ds.codepoints[0] == "U+304A" and ds.romaji[:3] == ["o", "ki", "su"]
    assert ds.class_to_idx["を"] == 9
    raw = tmp_path / "KMNIST" / "raw"
    assert (raw / "kmnist_classmap.csv").is_file()
    assert not list(raw.glob("*.part"))
    img, label = ds[0]
    assert img.mode == "L" and img.size == (28, 28) and isinstance(label, int)
    text = repr(ds)
    assert "Split: Test" in text and "10000" in text and "CC BY-SA 4.0" in text


def test_formats_pixel_equal_and_classmap_agrees(tmp_path, real_mirror, real_dir):
    a = KMNIST(tmp_path, train=False, download=True, format="mnist")
    b = KMNIST(tmp_path, train=False, download=True, format="npz")
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    rows = _classmap_rows(real_dir / "kmnist" / "kmnist_classmap.csv")
    assert [(r[1], r[2]) for r in rows] == list(zip(a.codepoints, a.classes))
    rows49 = _classmap_rows(real_dir / "k49" / "k49_classmap.csv")
    assert [r[2] for r in rows49] == [c.char for c in catalog.K49.classes]


def _classmap_rows(path):
    """The rows (index, codepoint, char) of an official ``*_classmap.csv``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index,codepoint,char"
    rows = [tuple(line.split(",")) for line in lines[1:]]
    assert [r[0] for r in rows] == [str(i) for i in range(len(rows))]
    return rows


def test_second_load_needs_no_network_and_no_rehash(tmp_path, real_mirror, monkeypatch):
    KMNIST(tmp_path, train=False, download=True)
    n = len(real_mirror.requests)
    import kmnist_torch.download.fetch as fetch

    def no_hash(path):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(fetch, "hash_file", no_hash)
    ds = KMNIST(tmp_path, train=False, download=True)
    assert len(ds) == 10000 and len(real_mirror.requests) == n


def test_torchvision_reuses_our_download_and_we_reuse_its(tmp_path, real_root):
    torchvision = pytest.importorskip("torchvision")
    raw = real_root()
    # torchvision checks that both splits exist: fake train files only for its existence check.
    ours = KMNIST(tmp_path, train=False)  # writes the extracted copies torchvision reads
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), compress=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(1, np.uint8), compress=False)
    theirs = torchvision.datasets.KMNIST(str(tmp_path), train=False)
    assert torch.equal(theirs.data, ours.data) and torch.equal(theirs.targets, ours.targets)
    # The reverse: a root where only torchvision's files are (gz + extracted) loads as is.
    (raw / ".kmnist_torch-verified.json").unlink()
    again = KMNIST(tmp_path, train=False)
    assert torch.equal(again.data, ours.data)


def test_tampered_extracted_copy_is_not_trusted(tmp_path, real_root):
    # Changed after we wrote it: neither read as ours nor rewritten (it may be the user's
    # edit, which torchvision reads); tests/test_extracted.py covers the ways out.
    raw = real_root()
    KMNIST(tmp_path, train=False)
    plain = raw / "t10k-images-idx3-ubyte"
    blob = bytearray(plain.read_bytes())
    blob[100] ^= 0xFF
    plain.write_bytes(bytes(blob))
    with pytest.raises(DataFilesError, match="differs from t10k-images-idx3-ubyte.gz"):
        KMNIST(tmp_path, train=False)
    assert plain.read_bytes() == bytes(blob)


def test_read_only_root_with_data_loads(tmp_path, real_root):
    raw = real_root(fmt="npz")
    for p in (raw, raw.parent, tmp_path):
        os.chmod(p, 0o555)
    try:
        ds = KMNIST(tmp_path, train=False, format="npz", download=True)
        assert len(ds) == 10000
        ds = KMNIST(tmp_path, train=False, format="npz")
        assert len(ds) == 10000
    finally:
        for p in (tmp_path, raw.parent, raw):
            os.chmod(p, 0o755)


def test_missing_files_error_lists_urls_sizes_md5_and_paths(tmp_path, fast_net, monkeypatch):
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "1")
    with pytest.raises(DataFilesError) as err:
        KMNIST(tmp_path, train=True)
    msg = str(err.value)
    raw = tmp_path / "KMNIST" / "raw"
    assert "train-images-idx3-ubyte.gz: missing" in msg
    assert "http://codh.rois.ac.jp/kmnist/dataset/kmnist/train-images-idx3-ubyte.gz" in msg
    assert "18165135 bytes" in msg and "bdb82020997e1d708af4cf47b453dcf7" in msg
    assert str(raw / "train-labels-idx1-ubyte.gz") in msg
    assert "download=True" in msg
    # Every file the run needs, so a user fetching them by hand does not fail a second time.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "kmnist_classmap.csv"):
        assert f"{name}: missing" in msg and str(raw / name) in msg


def test_wrong_checksum_without_download_raises(tmp_path, real_root):
    raw = real_root(fmt="npz")
    blob = bytearray((raw / "kmnist-test-imgs.npz").read_bytes())
    blob[-100] ^= 0x01
    (raw / "kmnist-test-imgs.npz").write_bytes(bytes(blob))
    with pytest.raises(DataFilesError, match="kmnist-test-imgs.npz: md5 mismatch"):
        KMNIST(tmp_path, train=False, format="npz")


def test_a_file_that_fails_its_check_is_kept_unless_a_repair_is_asked(
    tmp_path, real_mirror, real_dir
):
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "kmnist-test-labels.npz").write_bytes(b"not the file")
    # download=True fetches what is missing, never over a file the user put there.
    with pytest.raises(DataFilesError) as err:
        KMNIST(tmp_path, train=False, format="npz", download=True)
    summary = str(err.value).splitlines()[0]
    assert "not the official ones and were left as they are" in summary
    assert "--no-verify" in summary and f"verify kmnist --root {tmp_path} --repair" in summary
    assert (raw / "kmnist-test-labels.npz").read_bytes() == b"not the file"
    assert not (raw / "kmnist-test-imgs.npz").exists()  # nothing fetched either
    # The download command is a request to replace (the mirror has no training images: that
    # split fails, the test split is replaced).
    from kmnist_torch.cli import main

    assert main(["download", "kmnist", "--root", str(tmp_path), "--format", "npz"]) == 1
    assert (raw / "kmnist-test-labels.npz").read_bytes() == (
        real_dir / "kmnist" / "kmnist-test-labels.npz"
    ).read_bytes()
    assert len(KMNIST(tmp_path, train=False, format="npz")) == 10000


def test_stale_release_is_named_and_replaced(tmp_path, real_root, real_mirror):
    raw = real_root("old_release_pre_2019-02-05/kmnist-test-imgs.npz", "kmnist-test-labels.npz")
    with pytest.raises(DataFilesError, match=r"stale: .*before the 2019-02-05 fix"):
        KMNIST(tmp_path, train=False, format="npz")
    with pytest.warns(UserWarning, match="stale"):
        ds = KMNIST(tmp_path, train=False, format="npz", download=True)
    assert len(ds) == 10000
    assert (raw / "kmnist-test-imgs.npz").stat().st_size == 3079479


def _write_kmnist_fixture(raw, n_train=60, n_test=20, fmt="mnist"):
    rng = np.random.default_rng(0)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        imgs, labels = catalog.KMNIST.splits[split][fmt]
        if fmt == "mnist":
            write_idx(raw / imgs.name, x)
            write_idx(raw / labels.name, y)
        else:
            write_npz(raw / imgs.name, x)
            write_npz(raw / labels.name, y)
        out[split] = (x, y)
    return out


def test_verify_false_accepts_own_subset_with_warning(tmp_path):
    arrays = _write_kmnist_fixture(tmp_path / "KMNIST" / "raw")
    with pytest.warns(UserWarning, match="verify=False"):
        ds = KMNIST(tmp_path, train=True, verify=False)
    assert np.array_equal(ds.data.numpy(), arrays["train"][0])
    with pytest.raises(DataFilesError, match="wrong size"):
        KMNIST(tmp_path, train=True)


def test_format_checks_still_apply_without_verify(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    _write_kmnist_fixture(raw)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.full(20, 12, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FormatError, match="expected labels below 10, found 12"):
            KMNIST(tmp_path, train=False, verify=False)
        write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
        with pytest.raises(FormatError, match="20 images but .* 19 labels"):
            KMNIST(tmp_path, train=False, verify=False)


def test_transforms_and_dataloader(tmp_path):
    from torch.utils.data import DataLoader
    from torchvision.transforms import ToTensor

    _write_kmnist_fixture(tmp_path / "KMNIST" / "raw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = KMNIST(tmp_path, transform=ToTensor(), target_transform=lambda t: t + 100,
                    verify=False)  # fmt: skip
    x, y = next(iter(DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert y.tolist() == [100 + i % 10 for i in range(8)]


def test_k49_from_fixture_and_real_labels(tmp_path, real_dir, real_root):
    raw = real_root("k49-test-labels.npz", dataset="k49")
    labels = np.load(raw / "k49-test-labels.npz")["arr_0"]
    assert len(labels) == 38547 and labels.max() == 48
    imgs = np.zeros((len(labels), 28, 28), np.uint8)
    imgs[:100] = np.load(real_dir / "k49" / "partial" / "k49-test-imgs-first100.npz")["arr_0"]
    write_npz(raw / "k49-test-imgs.npz", imgs)
    with pytest.warns(UserWarning):
        ds = K49(tmp_path, train=False, verify=False)
    assert len(ds) == 38547 and len(ds.classes) == 49 and ds.classes[-1] == "ゝ"
    assert ds.romaji[44:46] == ["wi", "we"]
    assert torch.equal(ds.data[:100], torch.from_numpy(imgs[:100]))
    with pytest.raises(DataFilesError, match="k49-test-imgs.npz: wrong size"):
        K49(tmp_path, train=False)


def test_bad_format_argument(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        KMNIST(tmp_path, format="csv")


def test_default_root_from_env(tmp_path, monkeypatch):
    from kmnist_torch import default_root

    monkeypatch.setenv("KMNIST_TORCH_ROOT", str(tmp_path / "r"))
    assert default_root() == tmp_path / "r"
    monkeypatch.delenv("KMNIST_TORCH_ROOT")
    assert str(default_root()).endswith(os.path.join(".cache", "kmnist_torch"))


def test_mirrors_order_and_official_last(monkeypatch):
    from kmnist_torch import mirrors

    monkeypatch.setenv(
        "KMNIST_TORCH_MIRRORS", "http://a.example/x, http://b.example/y/ http://a.example/x"
    )
    monkeypatch.delenv("KMNIST_TORCH_OFFICIAL", raising=False)
    assert mirrors() == ["http://a.example/x/", "http://b.example/y/", catalog.OFFICIAL_BASE]
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "0")
    assert mirrors() == ["http://a.example/x/", "http://b.example/y/"]


@pytest.mark.parametrize("name", ["kmnist", "k49"])
def test_catalog_counts_match_the_real_label_files(real_dir, name):
    info = catalog.get(name)
    for split in ("train", "test"):
        labels = np.load(real_dir / name / f"{name}-{split}-labels.npz")["arr_0"]
        assert len(labels) == info.split_sizes[split]
        assert tuple(np.bincount(labels, minlength=info.num_classes)) == info.class_counts[split]


def test_no_download_source_still_loads_files_placed_by_hand(tmp_path, real_root, fast_net):
    # $KMNIST_TORCH_OFFICIAL=0 and no mirror: an offline site with the files placed by hand.
    raw = real_root()
    from kmnist_torch import mirrors

    assert mirrors() == []
    assert len(KMNIST(tmp_path, train=False, download=True)) == 10_000
    with pytest.raises(DataFilesError) as exc:  # a download that is really needed says why
        KMNIST(tmp_path, train=True, download=True)
    msg = str(exc.value)
    assert "no download source" in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(raw / "train-images-idx3-ubyte.gz") in msg
    assert not list(raw.glob("train-*"))
