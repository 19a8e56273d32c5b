"""The command line: available, info, download, verify, montage."""

from __future__ import annotations

from conftest import mirror_env
from fakedata import random_split
from PIL import Image

from kmnist_torch import catalog
from kmnist_torch.cli import main
from kmnist_torch.data.resplit import write_split
from kmnist_torch.reporting.montage import montage_size


def test_available_lists_every_catalog_dataset(capsys):
    assert main(["available"]) == 0
    out = capsys.readouterr().out
    for info in catalog.DATASETS.values():
        assert info.name in out and info.title in out
    assert "270,912" in out


def test_info_k49_shows_classes_counts_files_licence(capsys):
    assert main(["info", "k49"]) == 0
    out = capsys.readouterr().out
    assert "U+309D    ゝ    iteration mark" in out
    assert "U+3090    ゐ    wi" in out
    assert "392" in out and "64" in out  # the rarest class, train and test
    assert "7ac088b20481cf51dcd01ceaab89d821" in out
    assert "CC BY-SA 4.0" in out and "doi:10.20676/00000341" in out


def test_unknown_dataset_is_a_clear_error(capsys):
    assert main(["info", "emnist"]) == 2
    assert "unknown dataset 'emnist'" in capsys.readouterr().err


def test_download_reports_failure_per_split(tmp_path, real_mirror, capsys):
    # Only the test split is served: train fails with the error naming its files.
    rc = main(["download", "kmnist", "--root", str(tmp_path), "--format", "npz"])
    captured = capsys.readouterr()
    assert rc == 1
    assert (
        "kmnist-train-imgs.npz" in captured.err
        and "a183fbc01ed9a345513b145673d3d0bb" in captured.err
    )


def test_verify_finds_good_and_bad_files(tmp_path, real_root, capsys):
    real_root()
    assert main(["verify", "kmnist", "k49", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kmnist t10k-images-idx3-ubyte.gz: OK" in out
    assert "kmnist test (mnist): decodes, 10,000 images" in out
    assert "k49: not downloaded" in out
    real_root("old_release_pre_2019-02-05/kmnist-test-imgs.npz")
    assert main(["verify", "kmnist", "--root", str(tmp_path)]) == 1
    assert "kmnist-test-imgs.npz: BAD: stale" in capsys.readouterr().out


def test_montage_draws_one_row_per_class(tmp_path, real_root, capsys):
    real_root()
    out = tmp_path / "m.png"
    assert main(["montage", "kmnist", "--root", str(tmp_path), "--out", str(out),
                 "--per-class", "5"]) == 0  # fmt: skip
    img = Image.open(out)
    assert img.size == montage_size(10, 5)
    # Tiles hold real strokes: the grid is not blank.
    assert img.crop((3 * 32, 40, img.size[0], img.size[1])).getextrema()[0] < 50
    assert "wrote" in capsys.readouterr().out


def test_download_carries_on_and_lists_every_missing_file(tmp_path, http_server, fast_net, capsys):
    # The mirror has only KMNIST's test split (fixture files, so --no-verify): the train split
    # and all of K49 fail, the test split still downloads, and the end lists what is missing.
    images, labels = random_split(13)
    for f in write_split(tmp_path / "src", "kmnist", "test", images, labels).iterdir():
        http_server.add(f"/kmnist/{f.name}", f.read_bytes())
    mirror_env(fast_net, http_server.url)
    root = tmp_path / "root"
    rc = main(["download", "kmnist", "k49", "--root", str(root), "--no-verify"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "kmnist test (mnist): 13 images, checksums not checked (--no-verify)" in out
    assert "verified" not in out and "verified" not in err.replace("--no-verify", "")
    summary = err.split("Files still missing", 1)[1]
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "k49-train-imgs.npz", "k49-test-labels.npz", "k49_classmap.csv"):  # fmt: skip
        assert "put it at: " in summary and name in summary
    assert f"{http_server.url}/k49/k49-test-imgs.npz" in summary
    assert str(root / "K49" / "raw" / "k49-test-imgs.npz") in summary
    assert "t10k-images-idx3-ubyte.gz" not in summary  # downloaded


def test_montage_says_why_each_split_failed(tmp_path, fast_net, capsys):
    rc = main(["montage", "k49", "--root", str(tmp_path), "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "train split: K49" in err and "test split: K49" in err
    assert not (tmp_path / "m.png").exists()
