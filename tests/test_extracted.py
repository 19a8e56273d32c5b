"""The extracted idx copies torchvision reads (``train-labels-idx1-ubyte`` beside its ``.gz``)
are the user's unless this package wrote them: loading never rewrites one it did not write, and
the ``download`` command replaces a split's pair of files together or not at all (issue 18).
An extracted Kuzushiji-Kanji tree is read like the tar's members: regular files only, links
never followed, the tar's size cap, names escaped when printed; the copies copy tools leave are
set aside (issues 19 and 20)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
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


# ------------------------------------------------ extracted KKanji trees, read like tar members


def _kkanji_tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    from fakedata import kkanji_files, write_kkanji_tree

    return write_kkanji_tree(root / "KKanji", kkanji_files(classes, per_class, seed=9))


def _full_is(monkeypatch, classes: int, images: int) -> None:
    import dataclasses

    from kmnist_torch import catalog

    full = dataclasses.replace(catalog.KKANJI, num_classes=classes, split_sizes={"all": images})
    monkeypatch.setattr(catalog, "KKANJI", full)


def test_copy_artefacts_are_set_aside_by_their_bytes_not_their_names(tmp_path, monkeypatch, capfd):
    from kmnist_torch.data.kkanji.dataset import KKanji

    tree = _kkanji_tree(tmp_path)
    first, second, third = sorted((tree / "U+4E00").iterdir())[:3]
    stem = first.name[:-4]
    (tree / "U+4E00" / f"{stem}(1).png").write_bytes(first.read_bytes())
    (tree / "U+4E00" / f"{second.name[:-4]} copy.png").write_bytes(second.read_bytes())
    _full_is(monkeypatch, 3, 12)
    ds = KKanji(tmp_path, split="all")  # verified: the 12 images, the two copies set aside
    err = capfd.readouterr().err
    assert len(ds) == 12 and "set aside 2 copy artefacts" in err and err.count("\n") == 1
    assert "copy artefacts set aside" in repr(ds)
    again = KKanji(tmp_path, split="train")  # the same tree again: said once per process
    assert "copy artefacts" not in capfd.readouterr().err
    assert "2 copy artefacts set aside" in repr(again)
    # Named like a copy but not the same bytes as its sibling: no name the tar could hold,
    # so verification refuses it, naming it.
    odd = f"{third.name[:-4]} (1).png"
    (tree / "U+4E00" / odd).write_bytes(first.read_bytes())
    with pytest.raises(DataFilesError, match=re.escape(f"unexpected entries (U+4E00/{odd})")):
        KKanji(tmp_path, split="all")


def _hostile_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tree of 12 good images plus, in its class folders: a .png that is a symbolic link to
    a FIFO outside the root, a class folder that is a symbolic link, a FIFO named .png, a
    sparse 4 GiB .png, and a file whose name holds a terminal escape sequence."""
    root = tmp_path / "root"
    tree = _kkanji_tree(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    (tree / "U+4E00" / "0000000000000001.png").symlink_to(outside / "fifo")
    (outside / "U+4E10").mkdir()
    (outside / "U+4E10" / "0000000000000002.png").write_bytes(
        (tree / "U+4E00").iterdir().__next__().read_bytes()
    )
    (tree / "U+4E10").symlink_to(outside / "U+4E10", target_is_directory=True)
    os.mkfifo(tree / "U+4E01" / "0000000000000003.png")
    with open(tree / "U+4E02" / "0000000000000004.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(4 << 30)  # sparse: 4 GiB on paper, nothing on disk
    (tree / "U+4E02" / "evil\x1b[31mred.png").write_bytes(b"x")
    return root, outside


def _run(code: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with open(tmp_path / "stderr", "w+", encoding="utf-8", errors="surrogateescape") as err:
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err,
                              text=True, timeout=120, env=env)  # fmt: skip
        err.seek(0)
        return proc, err.read()


def test_a_hostile_tree_is_read_like_tar_members(tmp_path, capfd):
    # In a real process (a FIFO opened for reading would block it for ever; the timeout says
    # so): nothing hostile is opened, followed or read whole, and the names print safely.
    root, _ = _hostile_tree(tmp_path)
    code = (  # the dataset's own steps, without its torch import: list, check, decode
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from kmnist_torch.data.kkanji.cache import images, open_source\n"
        f"folder = Path({str(root)!r}) / 'KKanji'\n"
        "listing = open_source(folder, False, False)\n"
        "arr = images(folder, listing)\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(arr), listing.folders, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc, err = _run(code, tmp_path)
    assert proc.returncode == 0, err
    peak_kib = int(proc.stdout.split()[-1])
    assert proc.stdout.startswith("12 ['U+4E00', 'U+4E01', 'U+4E02']")
    assert peak_kib < 2 << 20  # well under the 4 GiB a whole read would take
    for shown in ("U+4E00/0000000000000001.png (a symbolic link, not followed)",
                  "U+4E10 (a symbolic link, not followed)", "U+4E01/0000000000000003.png",
                  "U+4E02/0000000000000004.png (4294967296 bytes, far more than a 64x64 PNG)",
                  "U+4E02/evil\\x1b[31mred.png"):  # fmt: skip
        assert shown in err
    assert "\x1b" not in err
    # The command line, verifying: one error naming them, no traceback, nothing opened.
    capfd.readouterr()
    assert main(["audit", "kkanji", "--root", str(root), "--out", str(tmp_path / "a.json")]) == 1
    err = capfd.readouterr().err
    assert err.startswith("error: KKanji: ") and "Traceback" not in err
    assert "(a symbolic link, not followed)" in err and "\x1b" not in err
    assert not (tmp_path / "a.json").exists()


def test_the_bounded_reader_refuses_before_reading(tmp_path, monkeypatch):
    from kmnist_torch.data.kkanji import tree as tree_module
    from kmnist_torch.data.kkanji.tree import read_member
    from kmnist_torch.errors import FormatError

    _, outside = _hostile_tree(tmp_path)
    tree = tmp_path / "root" / "KKanji" / "kkanji2"
    cases = {
        tree / "U+4E00" / "0000000000000001.png": "a symbolic link (not followed)",
        tree / "U+4E01" / "0000000000000003.png": "not a regular file",  # no writer: no block
        tree / "U+4E02" / "0000000000000004.png": "4294967296 bytes, far more than a 64x64 PNG",
    }
    for path, why in cases.items():
        with pytest.raises(FormatError, match=re.escape(why)):
            read_member(path)
    # Under the size cap but not a PNG: refused from its first 33 bytes, the rest never read.
    (outside / "big.png").write_bytes(b"GIF89a" + bytes(900_000))
    read_sizes: list[int] = []

    class Counted(io.BufferedReader):
        def read(self, n=-1):
            data = super().read(n)
            read_sizes.append(len(data))
            return data

    monkeypatch.setattr(tree_module.os, "fdopen", lambda fd, mode: Counted(io.FileIO(fd, "r")))
    with pytest.raises(FormatError, match="not a PNG file"):
        read_member(outside / "big.png")
    assert read_sizes == [33]
