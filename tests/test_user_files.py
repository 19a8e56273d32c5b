"""A user's files are never destroyed: a file that fails verification is replaced only on an
explicit repair or download, the files of one dataset are replaced all together or not at
all, and a root the package derived (a re-split, a subset) carries a manifest it is verified
against. Each test does what a user does: real subprocesses, a real HTTP server on 127.0.0.1,
stderr redirected to a file."""

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

from kmnist_torch import KMNIST, DataFilesError
from kmnist_torch.cli import main
from kmnist_torch.data.formats import read_idx
from kmnist_torch.data.resplit import write_split
from kmnist_torch.download.manifest import MANIFEST_NAME
from kmnist_torch.download.sources import STAGING, ensure_files

REPO = Path(__file__).resolve().parent.parent


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(tmp_path: Path, *argv: str, module: str = "kmnist_torch") -> tuple[int, str, str]:
    """Run a command line as a user does, stderr redirected to a file; (rc, stdout, stderr)."""
    err = tmp_path / f"stderr-{len(list(tmp_path.glob('stderr-*')))}.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(err, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE,
                              stderr=fh, text=True, env=env, timeout=120)  # fmt: skip
    return proc.returncode, proc.stdout, err.read_text()


def train_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--root", str(root), "--recipe", "cnn", "--epochs", "1", "--batch-size", "32",
            "--limit-train", "200", "--limit-test", "100", "--device", "cpu", "--out", str(out),
            *extra]  # fmt: skip


@pytest.fixture
def source(tmp_path) -> Path:
    """A data root holding a KMNIST test split of 10,000 images (fake pixels, official names
    and formats): what ``resplit`` cuts."""
    src = tmp_path / "source"
    images, labels = random_split(10000, seed=3)
    write_split(src, "kmnist", "test", images, labels)
    return src


# --------------------------------------------------------------- the account, replayed


def test_trainer_never_overwrites_a_users_resplit_while_a_mirror_is_set(
    tmp_path, real_mirror, real_dir
):
    # The user's own re-split written before manifests existed (8,000 training labels), a
    # mirror serving the official files (60,000 labels), no --no-verify.
    root = tmp_path / "R"
    images, labels = random_split(80)
    write_split(root, "kmnist", "train", images, labels)
    write_split(root, "kmnist", "test", *random_split(20, seed=1))
    before = tree_hashes(root)
    rc, _, err = run_cli(tmp_path, *train_argv(root, tmp_path / "run"), module="kmnist_torch.train")
    assert rc == 1, err
    first = err.splitlines()[0]
    assert "not the official ones and were left as they are" in first
    assert "--no-verify" in first and f"verify kmnist --root {root} --repair" in first
    assert "train-labels-idx1-ubyte.gz: wrong size" in err and "Traceback" not in err
    assert tree_hashes(root) == before  # byte-identical
    assert real_mirror.requests == []  # nothing was even fetched
    # Their way out: verify=False (--no-verify) reads their own files, still as they were.
    with pytest.warns(UserWarning, match="verify=False"):
        assert KMNIST(root, train=True, verify=False).targets.tolist() == labels.tolist()


def test_a_failed_download_leaves_the_root_byte_identical(tmp_path, real_mirror, real_dir):
    # The mirror serves the official training labels but not the training images: the labels
    # arrive, are checked, and are not moved in, since their images could not be had.
    KMNIST(tmp_path, train=False, download=True)  # a root in use: record and lock exist
    before = tree_hashes(tmp_path)
    with pytest.raises(DataFilesError, match="nothing in .* was changed") as err:
        KMNIST(tmp_path, train=True, download=True)
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert real_mirror.hits("/kmnist/train-labels-idx1-ubyte.gz")  # fetched, then dropped
    assert tree_hashes(tmp_path) == before


def test_replacing_is_all_or_nothing(tmp_path, http_server, fast_net):
    # Two files of one dataset, both damaged by hand; a repair (replace=True) where the
    # mirror serves one and fails the other replaces neither.
    mirror_env(fast_net, http_server.url)
    good, other = b"A" * 3000, b"B" * 2000
    http_server.add("/a.bin", good)
    ta = make_target(tmp_path, [f"{http_server.url}/a.bin"], good)
    tb = make_target(tmp_path, [f"{http_server.url}/b.bin"], other)  # 404
    tb.dest = tmp_path / "b.bin"
    ta.dest.write_bytes(b"users A")
    tb.dest.write_bytes(b"users B")
    before = tree_hashes(tmp_path)
    with pytest.raises(DataFilesError, match="download failed for 1 file"):
        ensure_files([ta, tb], True, name="KMNIST", replace=True)
    assert len(http_server.hits("/a.bin")) == 1
    after = tree_hashes(tmp_path)
    after.pop(".download.lock")  # the lock of the folder, empty, created by the first writer
    assert after == before and not (tmp_path / STAGING).exists()
    # Unasked (replace=False) they are not even downloaded: the user is told the ways out.
    with pytest.raises(DataFilesError, match=r"2 file\(s\) .* left as they are"):
        ensure_files([ta, tb], True, name="KMNIST")
    assert len(http_server.hits("/a.bin")) == 1
    # Once both can be had, both are replaced together.
    http_server.add("/b.bin", other)
    ensure_files([ta, tb], True, name="KMNIST", replace=True)
    assert ta.dest.read_bytes() == good and tb.dest.read_bytes() == other
    assert not (tmp_path / STAGING).exists()


# --------------------------------------------------------------------------- derived roots


def test_resplit_gives_a_training_set_that_trains_without_no_verify(
    tmp_path, source, http_server, fast_net, capsys
):
    mirror_env(fast_net, http_server.url)  # a mirror is set; it must never be asked
    root = tmp_path / "R"
    assert main(["resplit", str(source), "--root", str(root), "--seed", "1"]) == 0
    assert "8,000 train / 2,000 test" in capsys.readouterr().out
    raw = root / "KMNIST" / "raw"
    manifest = json.loads((raw / MANIFEST_NAME).read_text())
    assert manifest["splits"] == {"train": 8000, "test": 2000}
    assert manifest["origin"] == str((source / "KMNIST" / "raw").resolve())
    for name, entry in manifest["files"].items():
        data = (raw / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    listed = {n: h for n, h in tree_hashes(raw).items() if n in manifest["files"]}
    rc, _, err = run_cli(tmp_path, *train_argv(root, tmp_path / "run"), module="kmnist_torch.train")
    assert rc == 0, err
    assert http_server.requests == []
    assert {n: h for n, h in tree_hashes(raw).items() if n in manifest["files"]} == listed
    assert main(["verify", "kmnist", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"kmnist: derived from {manifest['origin']} (" in out
    assert out.rstrip().endswith("verified against its manifest")
    ds = KMNIST(root, train=True)  # verify=True, no warning needed
    assert len(ds) == 8000 and "verified against its manifest" in repr(ds)


def test_a_file_changed_after_the_manifest_is_named(tmp_path, source, capsys):
    root = tmp_path / "R"
    assert main(["resplit", str(source), "--root", str(root)]) == 0
    victim = root / "KMNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    st = victim.stat()
    labels = read_idx(victim, 1).copy()
    labels[[0, 1]] = labels[[1, 0]]  # a hand edit (two labels swapped), size and mtime restored
    assert labels[0] != labels[1]
    from kmnist_torch.data.formats import write_idx

    write_idx(victim, labels)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size  # gzip of the same length: only sha256 tells
    capsys.readouterr()
    assert main(["verify", "kmnist", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "kmnist train-labels-idx1-ubyte.gz: BAD: changed after the manifest was written" in out
    # Loading checks as strictly (a fresh record: the hash is not taken on trust).
    (root / "KMNIST" / "raw" / ".kmnist_torch-verified.json").unlink()
    with pytest.raises(DataFilesError, match="train-labels-idx1-ubyte.gz: changed after"):
        KMNIST(root, train=True)


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda doc: "{not json", "not readable JSON"),
        (lambda doc: {**doc, "kind": "something else"}, "'kind' must be"),
        (
            lambda doc: {**doc, "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}},
            "bad file name",
        ),  # fmt: skip
        (
            lambda doc: {**doc, "files": {k: {"size": v["size"]} for k, v in doc["files"].items()}},
            "needs a whole 'size' and a 'sha256'",
        ),  # fmt: skip
    ],
)
def test_a_malformed_manifest_is_one_clear_error(tmp_path, source, edit, why, capsys):
    root = tmp_path / "R"
    assert main(["resplit", str(source), "--root", str(root)]) == 0
    path = root / "KMNIST" / "raw" / MANIFEST_NAME
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(DataFilesError, match=f"not a valid derived-root manifest.*{why}"):
        KMNIST(root, train=True)
    assert main(["verify", "kmnist", "--root", str(root)]) == 1
    assert capsys.readouterr().out.count("not a valid derived-root manifest") == 1


def test_a_manifest_cannot_vouch_for_a_hand_made_file(tmp_path, source):
    # Writing one's own manifest with the wrong hash for a file does not make it pass.
    root = tmp_path / "R"
    assert main(["resplit", str(source), "--root", str(root)]) == 0
    path = root / "KMNIST" / "raw" / MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc["files"]["t10k-labels-idx1-ubyte.gz"]["sha256"] = "f" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFilesError, match="t10k-labels-idx1-ubyte.gz: changed after"):
        KMNIST(root, train=False)


def test_resplit_never_writes_over_other_files(tmp_path, source):
    root = tmp_path / "R"
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"the user's own labels")
    before = tree_hashes(root)
    rc, _, err = run_cli(tmp_path, "resplit", str(source), "--root", str(root))
    assert rc == 1 and "nothing was written" in err and "train-labels-idx1-ubyte.gz" in err
    assert tree_hashes(root) == before
    # A root it derived itself may be written again (another seed).
    other = tmp_path / "R2"
    assert main(["resplit", str(source), "--root", str(other)]) == 0
    assert main(["resplit", str(source), "--root", str(other), "--seed", "2"]) == 0
    assert "seed 2" in json.loads((other / "KMNIST" / "raw" / MANIFEST_NAME).read_text())["how"]


def test_download_and_repair_refuse_a_derived_root(tmp_path, source, http_server, fast_net):
    mirror_env(fast_net, http_server.url)
    root = tmp_path / "R"
    assert main(["resplit", str(source), "--root", str(root)]) == 0
    before = tree_hashes(root)
    rc, out, err = run_cli(tmp_path, "download", "kmnist", "--root", str(root))
    assert rc == 0 and "verified against its manifest (nothing downloaded)" in out, err
    with pytest.raises(DataFilesError, match="is a derived root"):
        KMNIST(root, download=True).download()
    # Loading added only the idx copies it extracts from the .gz (and their hashes to its
    # record); every file that was there is byte-identical.
    after = tree_hashes(root)
    record = "KMNIST/raw/.kmnist_torch-verified.json"
    assert http_server.requests == []
    assert {k: after[k] for k in before if k != record} == {
        k: v for k, v in before.items() if k != record
    }
    assert {Path(k).name for k in set(after) - set(before)} <= {
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte"}  # fmt: skip


def test_subset_writes_a_stratified_derived_root(tmp_path, source, capsys):
    root, small = tmp_path / "R", tmp_path / "small"
    assert main(["resplit", str(source), "--root", str(root)]) == 0
    rc, out, err = run_cli(tmp_path, "subset", "kmnist", "--root", str(root), "--out-root",
                           str(small), "--train", "500", "--test", "100")  # fmt: skip
    assert rc == 0, err
    assert "500 train, 100 test" in out
    train = KMNIST(small, train=True)
    full = np.bincount(KMNIST(root, train=True).targets.numpy())
    counts = np.bincount(train.targets.numpy())
    assert len(train) == 500 and np.all(np.abs(counts - full * 500 / 8000) < 1)  # stratified
    assert len(KMNIST(small, train=False)) == 100
    assert main(["verify", "kmnist", "--root", str(small)]) == 0
    assert "stratified subset, seed 0: 500 train, 100 test" in capsys.readouterr().out
    assert main(["subset", "kmnist", "--root", str(root), "--out-root", str(root)]) == 1


# ------------------------------------------------------------------- what a user reads


def test_missing_data_error_starts_with_one_summary_line(tmp_path, fast_net):
    rc, _, err = run_cli(tmp_path, *train_argv(tmp_path / "E", tmp_path / "run"),
                         module="kmnist_torch.train")  # fmt: skip
    assert rc == 1
    first = err.splitlines()[0]
    assert first.startswith("error: KMNIST: 3 file(s) to download into ")
    assert f"python -m kmnist_torch resplit SOURCE_DIR --root {tmp_path / 'E'}" in first
    assert "download kmnist" in first
    assert err.count("train-images-idx3-ubyte.gz: missing") == 1
    assert len(err.splitlines()) <= 50


def test_verify_names_the_files_a_split_needs_that_were_never_downloaded(tmp_path, real_root):
    # The root after the failed download: training labels, no training images.
    real_root("train-labels-idx1-ubyte.gz")
    rc, out, _ = run_cli(tmp_path, "verify", "kmnist", "--root", str(tmp_path))
    assert rc == 1
    assert "kmnist train-labels-idx1-ubyte.gz: OK" in out
    assert "kmnist train-images-idx3-ubyte.gz: MISSING: the train split needs it" in out
    assert "t10k-images-idx3-ubyte.gz: MISSING" in out  # the test split was never fetched


def test_info_mnist_gives_mnists_own_licence_and_citation(capsys):
    assert main(["info", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "licence: CC BY-SA 3.0" in out and "LeCun" in out
    terms = "\n".join(line for line in out.splitlines() if "licence:" in line or "cite:" in line)
    assert "LeCun" in terms and "Kuzushiji" not in terms and "Clanuwat" not in terms
    assert "CODH" not in terms and "4.0" not in terms
    assert main(["info", "kmnist"]) == 0
    out = capsys.readouterr().out
    assert "licence: CC BY-SA 4.0" in out and "Clanuwat" in out and "LeCun" not in out
