"""The extracted idx copies torchvision reads (``train-labels-idx1-ubyte`` beside its ``.gz``)
are the user's unless this package wrote them: loading never rewrites one it did not write, and
the ``download`` command replaces a split's pair of files together or not at all (issue 18)."""

from __future__ import annotations

import gzip
import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import mirror_env
from fakedata import random_split

from kmnist_torch import KMNIST, DataFilesError
from kmnist_torch._io import HashRecord
from kmnist_torch.cli import main
from kmnist_torch.data.formats import write_idx
from kmnist_torch.data.resplit import write_split
from kmnist_torch.download.sources import STAGING

LABELS = "t10k-labels-idx1-ubyte"


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _relabel(raw: Path) -> np.ndarray:
    """Relabel the extracted test labels as a user of torchvision would: every label + 1."""
    labels = np.frombuffer((raw / LABELS).read_bytes()[8:], np.uint8)
    mine = ((labels.astype(np.int64) + 1) % 10).astype(np.uint8)
    write_idx(raw / LABELS, mine, compress=False)
    return mine


def test_a_relabelled_copy_is_refused_with_the_ways_out_and_never_rewritten(
    tmp_path, real_root, capsys
):
    # torchvision's root: the official .gz files and the idx files it extracted from them,
    # the labels edited by hand. Verification on: an error naming the file, nothing rewritten.
    raw = real_root()
    real_root(gunzip=True)
    official = gzip.decompress((raw / f"{LABELS}.gz").read_bytes())
    mine = _relabel(raw)
    before = tree_hashes(tmp_path)
    with pytest.raises(DataFilesError) as err:
        KMNIST(tmp_path, train=False)
    first = str(err.value).splitlines()[0]
    assert f"{raw / LABELS} differs from {LABELS}.gz" in first
    assert "--no-verify (verify=False)" in first
    assert f"python -m kmnist_torch verify kmnist --root {tmp_path} --repair" in first
    after = tree_hashes(tmp_path)
    after.pop("KMNIST/raw/.kmnist_torch-verified.json")  # the hashes of the .gz, remembered
    assert after == before
    # verify=False: "my own files". Their copy is read (what torchvision reads), and said so.
    with pytest.warns(UserWarning, match=f"read your .*{LABELS}"):
        ds = KMNIST(tmp_path, train=False, verify=False)
    assert ds.targets.numpy().tolist() == mine.tolist()
    assert (raw / LABELS).read_bytes()[8:] == mine.tobytes()
    # The other way out: verify --repair rewrites it from the .gz; then it loads verified.
    capsys.readouterr()
    assert main(["verify", "kmnist", "--root", str(tmp_path)]) == 1
    assert f"{LABELS}: BAD: differs from {LABELS}.gz" in capsys.readouterr().out
    main(["verify", "kmnist", "--root", str(tmp_path), "--repair"])  # 1: no train split
    out = capsys.readouterr().out
    assert f"{LABELS}: repaired (rewritten from the .gz)" in out
    assert "kmnist test (mnist): decodes, 10,000 images" in out
    assert (raw / LABELS).read_bytes() == official
    assert KMNIST(tmp_path, train=False).targets.numpy().tolist() != mine.tolist()


def test_no_verify_reads_the_users_copy_beside_its_gz(tmp_path):
    # The same without the real files: verify=False reads the edited copy, never rewrites it.
    images, labels = random_split(30)
    raw = write_split(tmp_path, "kmnist", "test", images, labels, extracted=True)
    mine = _relabel(raw)
    before = (raw / LABELS).stat()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = KMNIST(tmp_path, train=False, verify=False)
        again = KMNIST(tmp_path, train=False, verify=False)
    assert ds.targets.numpy().tolist() == mine.tolist() != labels.tolist()
    assert again.targets.numpy().tolist() == mine.tolist()
    said = [str(w.message) for w in caught if "read your" in str(w.message)]
    assert len(said) == 1 and f"{LABELS}.gz beside it, whose content differs" in said[0]
    after = (raw / LABELS).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(ds.data.numpy(), images)  # the images' copy is the gz's: used as is


def test_a_copy_with_the_gz_content_is_kept_and_remembered(tmp_path, real_root, monkeypatch):
    # torchvision extracted this very .gz: not rewritten (same inode and mtime), and the next
    # load reads it without decompressing the .gz again.
    raw = real_root()
    real_root(gunzip=True)
    before = (raw / LABELS).stat()
    first = KMNIST(tmp_path, train=False)
    after = (raw / LABELS).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    entry = HashRecord(raw).lookup(raw / LABELS)
    assert entry["from_md5"] == hashlib.md5((raw / f"{LABELS}.gz").read_bytes()).hexdigest()
    import kmnist_torch.data.formats as formats

    def no_gunzip(path, *a, **k):
        raise AssertionError(f"decompressed {path} again")

    monkeypatch.setattr(formats, "read_gzip", no_gunzip)
    assert KMNIST(tmp_path, train=False).targets.tolist() == first.targets.tolist()


def test_a_copy_this_package_wrote_follows_its_gz(tmp_path):
    # Our own copy, untouched since we wrote it, is rewritten when the .gz changes (here the
    # user's own re-encoding, verify=False): no warning about a user's copy.
    images, labels = random_split(30)
    raw = write_split(tmp_path, "kmnist", "test", images, labels)
    with pytest.warns(UserWarning, match="verify=False"):
        KMNIST(tmp_path, train=False, verify=False)
    assert (raw / LABELS).read_bytes()[8:] == labels.tobytes()  # written: it was absent
    new = labels[::-1].copy()
    write_split(tmp_path, "kmnist", "test", images, new)  # the .gz files only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = KMNIST(tmp_path, train=False, verify=False)
    assert not [w for w in caught if "read your" in str(w.message)]
    assert ds.targets.numpy().tolist() == new.tolist()
    assert (raw / LABELS).read_bytes()[8:] == new.tobytes()


def test_a_symlink_at_the_copy_is_kept_never_followed(tmp_path):
    images, labels = random_split(30)
    raw = write_split(tmp_path, "kmnist", "test", images, labels)
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    (raw / LABELS).symlink_to(precious)
    for verify in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(DataFilesError, match="symbolic link") as err:
                KMNIST(tmp_path, train=False, verify=verify, download=False)
        assert f"verify kmnist --root {tmp_path} --repair" in str(err.value)
    assert (raw / LABELS).is_symlink() and precious.read_bytes() == b"precious"


def test_download_replaces_a_splits_pair_together_or_not_at_all(
    tmp_path, http_server, fast_net, real_dir, capsys
):
    # The user's own test labels (not the official ones) and no test images; the mirror serves
    # the official labels and fails the images. `download` is asked to replace bad files, but
    # the pair is one transaction: the labels are fetched, checked, and not moved in.
    labels_gz = real_dir / "kmnist" / f"{LABELS}.gz"
    http_server.add(f"/kmnist/{LABELS}.gz", labels_gz.read_bytes())
    mirror_env(fast_net, http_server.url)
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / f"{LABELS}.gz", random_split(30)[1])
    (raw / ".download.lock").touch()  # a root in use: the folder's lock exists
    before = tree_hashes(tmp_path)
    assert main(["download", "kmnist", "--root", str(tmp_path)]) == 1
    assert http_server.hits(f"/kmnist/{LABELS}.gz")  # fetched, then dropped
    err = capsys.readouterr().err
    assert "error: kmnist test (mnist): kmnist: download failed for 1 file(s); nothing in" in err
    assert tree_hashes(tmp_path) == before  # byte-identical, every file
    assert not (raw / STAGING).exists()
    # Once both can be had, both are replaced together.
    http_server.add_file("/kmnist/t10k-images-idx3-ubyte.gz", real_dir / "kmnist" /
                         "t10k-images-idx3-ubyte.gz")  # fmt: skip
    main(["download", "kmnist", "--root", str(tmp_path)])
    assert (raw / f"{LABELS}.gz").read_bytes() == labels_gz.read_bytes()
    assert len(KMNIST(tmp_path, train=False)) == 10000
