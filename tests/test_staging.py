"""The folders the package stages its writes in (``.kmnist_torch-staging`` for downloads,
``.kmnist_torch-writing-*`` for derived roots) are never followed when a symbolic link sits at
their name: nothing is written, moved or deleted in the folder it points to. A failed staged
download tells the user where the file itself goes, and ``subset --out-root`` expands ``~``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_target, mirror_env
from fakedata import random_split

from kmnist_torch import DataFilesError
from kmnist_torch.cli import main
from kmnist_torch.data.formats import read_idx
from kmnist_torch.data.resplit import WRITING, write_derived, write_split
from kmnist_torch.download.manifest import MANIFEST_NAME
from kmnist_torch.download.sources import STAGING, ensure_files

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges there")


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def victim(tmp_path) -> Path:
    """A folder of someone's files, named as the files the tests stage."""
    v = tmp_path / "victim"
    v.mkdir()
    for name in ("file.bin", "file.bin.part", "file.bin.part.json", "train-images-idx3-ubyte.gz",
                 "train-labels-idx1-ubyte.gz", "kmnist_classmap.csv"):  # fmt: skip
        (v / name).write_bytes(f"the victim's {name}".encode())
    return v


# ------------------------------------------------------------------------------ downloads


def test_a_link_at_the_download_staging_folder_is_never_followed(
    tmp_path, victim, http_server, fast_net
):
    mirror_env(fast_net, http_server.url)
    data = b"K" * 5000
    http_server.add("/file.bin", data)
    root = tmp_path / "root"
    root.mkdir()
    (root / STAGING).symlink_to(victim, target_is_directory=True)
    # An older release's partial download beside the file: adopted into the staging folder.
    (root / "file.bin.part").write_bytes(data[:100])
    before = tree(victim)
    t = make_target(root, [f"{http_server.url}/file.bin"], data)
    ensure_files([t], True, name="KMNIST")
    assert tree(victim) == before  # nothing written, moved or deleted through the link
    assert t.dest.read_bytes() == data
    assert not (root / STAGING).is_symlink() and not (root / STAGING).exists()
    assert not (root / "file.bin.part").exists()


def test_a_file_at_the_download_staging_name_is_replaced_by_a_folder(
    tmp_path, http_server, fast_net
):
    mirror_env(fast_net, http_server.url)
    data = b"Z" * 3000
    http_server.add("/file.bin", data)
    (tmp_path / STAGING).write_bytes(b"stray")
    t = make_target(tmp_path, [f"{http_server.url}/file.bin"], data)
    ensure_files([t], True, name="KMNIST")
    assert t.dest.read_bytes() == data and not (tmp_path / STAGING).exists()


def test_a_failed_download_says_to_put_the_file_in_its_place_not_in_staging(
    tmp_path, http_server, fast_net
):
    mirror_env(fast_net, http_server.url)  # serves nothing: a 404
    t = make_target(tmp_path, [f"{http_server.url}/file.bin"], b"D" * 1000)
    with pytest.raises(DataFilesError) as info:
        ensure_files([t], True, name="KMNIST")
    message = str(info.value)
    assert f"put it at: {tmp_path / 'file.bin'}\n" in message + "\n"
    assert STAGING not in message
    assert "download failed for 1 file" in message and f"{http_server.url}/file.bin" in message


# --------------------------------------------------------------------------- derived roots


def small_splits(n_train: int = 50, n_test: int = 20) -> dict:
    x, y = random_split(n_train + n_test, seed=5)
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}


def test_a_link_at_a_writing_folder_name_is_never_followed(tmp_path, victim):
    raw = tmp_path / "R" / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    # Links at the old fixed name and at a name of the new pattern: left alone, never used.
    (raw / WRITING).symlink_to(victim, target_is_directory=True)
    (raw / f"{WRITING}-planted").symlink_to(victim, target_is_directory=True)
    stale = raw / f"{WRITING}-deadrun"  # left by a killed writer: swept
    stale.mkdir()
    (stale / "train-images-idx3-ubyte.gz").write_bytes(b"half written")
    before = tree(victim)
    splits = small_splits()
    assert write_derived(tmp_path / "R", "kmnist", splits, "mnist", "test", "a test") == raw
    assert tree(victim) == before
    assert (raw / WRITING).is_symlink() and (raw / f"{WRITING}-planted").is_symlink()
    assert not stale.exists()
    left = sorted(p.name for p in raw.iterdir() if p.name.startswith(WRITING))
    assert left == [WRITING, f"{WRITING}-planted"]  # no staging folder of this run is left
    images = read_idx(raw / "train-images-idx3-ubyte.gz", 3)
    assert np.array_equal(images, splits["train"][0])
    manifest = json.loads((raw / MANIFEST_NAME).read_text())
    assert manifest["splits"] == {"train": 50, "test": 20}


def test_a_refused_derived_root_is_left_exactly_as_it_was(tmp_path):
    raw = tmp_path / "R" / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"the user's own labels")
    with pytest.raises(DataFilesError, match="nothing was written"):
        write_derived(tmp_path / "R", "kmnist", small_splits(), "mnist", "test", "a test")
    assert sorted(p.name for p in raw.iterdir()) == ["train-labels-idx1-ubyte.gz"]


WRITER = """
import sys
from fakedata import random_split
from kmnist_torch.data.resplit import write_derived
seed = int(sys.argv[2])
x, y = random_split(3000, seed=seed)
for k in range(3):
    splits = {"train": (x[:2000], y[:2000]), "test": (x[2000:], y[2000:])}
    write_derived(sys.argv[1], "kmnist", splits, "mnist", "test", f"seed {seed}, round {k}")
"""


def test_two_concurrent_writers_never_remove_each_others_files(tmp_path):
    root = tmp_path / "R"
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    run = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed)], **run)
        for seed in (1, 2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    # The root is whole and matches its manifest (the writer that finished last).
    assert main(["verify", "kmnist", "--root", str(root)]) == 0
    raw = root / "KMNIST" / "raw"
    assert not [p for p in raw.iterdir() if p.name.startswith(WRITING)]


# ------------------------------------------------------------------------------ the CLI


def test_subset_out_root_expands_the_home_folder(tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    root = tmp_path / "R"
    x, y = random_split(300, seed=7)
    write_split(root, "kmnist", "train", x[:200], y[:200])
    write_split(root, "kmnist", "test", x[200:], y[200:])
    argv = ["subset", "kmnist", "--root", str(root), "--out-root", "~/small", "--train", "50",
            "--test", "20", "--no-verify"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (home / "small" / "KMNIST" / "raw" / MANIFEST_NAME).is_file()
    assert not (work / "~").exists()
