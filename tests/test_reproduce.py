"""The reproduction harness (kmnist_torch.reproduce, its table in
kmnist_torch.reporting.table): targets,
--check, the table and JSON it writes, quick runs end to end on fixture data (served from
127.0.0.1, or placed by hand), the real-image re-split, and every owned command's --help."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mirror_env
from fakedata import random_split

from kmnist_torch import catalog, reproduce
from kmnist_torch.data.arrays import raw_folder
from kmnist_torch.data.resplit import write_resplit, write_split
from kmnist_torch.models.knn import knn_predict
from kmnist_torch.reporting import table

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------- targets and --check


def test_targets_prefer_todays_data():
    assert table.target_for("knn", "kmnist") == (0.9210, "today")
    assert table.target_for("cnn", "k49") == (0.8936, "today")
    # Never re-run upstream, and MNIST never changed: the published table.
    assert table.target_for("preact18-manifold", "kmnist") == (0.9883, "old")
    assert table.target_for("knn", "mnist") == (0.9714, "old")
    assert table.target_for("knn", "kkanji") == (None, None)
    assert table.metric_name("k49") == "balanced_accuracy"
    assert table.metric_name("kmnist") == "accuracy"


def _cell(row, dataset, ours=None, error=None, comparable=True):
    cell = table.new_cell(row, dataset, comparable)
    if ours is not None:
        table.finish_cell(cell, ours, ours)
    cell["error"] = error
    return cell


def test_check_cells_tolerance_below_target_only():
    # cnn on KMNIST: target 94.63% (today's data), tolerance 0.5 points.
    at = _cell("cnn", "kmnist", 0.9463)
    within = _cell("cnn", "kmnist", 0.9414)
    above = _cell("cnn", "kmnist", 0.99)
    below = _cell("cnn", "kmnist", 0.9412)
    assert table.check_cells([at, within, above]) == []
    failures = table.check_cells([at, below, above])
    assert len(failures) == 1
    assert "Keras Simple CNN Benchmark on KMNIST" in failures[0]
    assert "94.12%" in failures[0] and "0.51 points below" in failures[0]
    assert "94.63%" in failures[0] and "today" in failures[0]
    # The difference is ours minus the target, in fractions.
    assert below["difference"] == pytest.approx(0.9412 - 0.9463)
    # One tolerance for every row overrides the per-row ones.
    assert table.check_cells([within], tolerance=0.001) != []
    assert table.check_cells([below], tolerance=0.01) == []


def test_check_cells_errors_fail_and_untargeted_cells_pass():
    broken = _cell("preact18", "k49", error="DataFilesError: K49: 2 file(s) ...")
    kkanji = _cell("knn", "kkanji", 0.01)  # our extension: no target
    smoke = _cell("knn", "kmnist", 0.10, comparable=False)
    failures = table.check_cells([broken, kkanji, smoke])
    assert failures == ["PreActResNet-18 on K49: did not run: DataFilesError: K49: 2 file(s) ..."]
    assert smoke["target"] is None and smoke["upstream_today"] == 0.9210
    # K49 is held to its balanced accuracy, not top-1.
    k49 = table.finish_cell(table.new_cell("knn", "k49"), 0.95, 0.80)
    assert k49["ours"] == 0.80
    assert table.check_cells([k49]) != []


def test_render_table():
    cells = [
        _cell("knn", "mnist", 0.9714),
        _cell("knn", "kmnist", 0.9210),
        _cell("cnn", "kmnist", 0.90),
        _cell("cnn", "mnist", error="RuntimeError: out of memory"),
        _cell("knn", "kkanji", 0.5),
    ]
    cells[1]["device_seconds"] = 1.234
    text = table.render_table(cells)
    lines = text.splitlines()
    # Upstream's layout first: one line per model, one column per dataset, in table order.
    assert lines[0] == "| Model | MNIST | KMNIST | KKanji |"
    assert "| 4-Nearest Neighbour Baseline | 97.14% | 92.10% | 50.00% |" in lines
    assert "| Keras Simple CNN Benchmark | error | 90.00% |  |" in lines
    detail = {tuple(p.strip() for p in ln.split("|")[1:3]): ln for ln in lines if ln.count("|") > 9}
    knn_k = detail[("4-Nearest Neighbour Baseline", "KMNIST")]
    assert "91.56%" in knn_k and "92.10%" in knn_k and "+0.00" in knn_k and "1.23" in knn_k
    assert knn_k.rstrip().endswith("| ok |")
    cnn_k = detail[("Keras Simple CNN Benchmark", "KMNIST")]
    assert "-4.63" in cnn_k and cnn_k.rstrip().endswith("| FAIL |")
    assert detail[("Keras Simple CNN Benchmark", "MNIST")].rstrip().endswith("| error |")
    kk = detail[("4-Nearest Neighbour Baseline", "KKanji")]
    assert kk.rstrip().endswith("| no target |") and "| — | — |" in kk


# ------------------------------------------------------------------------ runs on fixtures


def _fixture_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of 10 classes, each a fixed random stroke pattern plus noise: 4-NN sorts them
    well, so the accuracy means something."""
    rng = np.random.default_rng(1234)
    templates = (rng.random((10, 28, 28)) < 0.2) * 200
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    noise = rng.integers(0, 80, size=(n, 28, 28))
    images = np.clip(templates[labels] + noise - 40 * (rng.random((n, 28, 28)) < 0.3), 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


def _write_root(root: Path) -> Path:
    """A KMNIST root (official names and formats) of the fixture splits; its raw folder."""
    write_split(root, "kmnist", "train", *_fixture_split(1, 400), fmt="mnist")
    return write_split(root, "kmnist", "test", *_fixture_split(2, 120), fmt="mnist")


def _kmnist_files() -> dict[str, bytes]:
    """The official KMNIST file names (mnist format) with fixture contents."""
    with tempfile.TemporaryDirectory() as tmp:
        return {f.name: f.read_bytes() for f in _write_root(Path(tmp)).iterdir()}


def _offline(monkeypatch) -> None:
    """No official host and no mirror: a fetch could only fail, with "no download source"."""
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "0")
    monkeypatch.delenv("KMNIST_TORCH_MIRRORS", raising=False)


def _place(root: Path) -> None:
    _write_root(root)


def _expected_knn_accuracy() -> float:
    x, y = _fixture_split(1, 400)
    xt, yt = _fixture_split(2, 120)
    return float((knn_predict(x, y, xt).numpy() == yt).mean())


def test_quick_knn_run_downloads_from_a_mirror(http_server, fast_net, tmp_path):
    for name, data in _kmnist_files().items():
        http_server.add(f"/kmnist/{name}", data)
    mirror_env(fast_net, http_server.url)
    out = tmp_path / "out"
    argv = [
        "--datasets",
        "kmnist",
        "--rows",
        "knn",
        "--quick",
        "--check",
        "--no-verify",
        "--root",
        str(tmp_path / "root"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert reproduce.main(argv) == 0
    assert http_server.hits("/kmnist/t10k-images-idx3-ubyte.gz")
    assert (tmp_path / "root" / "KMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    results = json.loads((out / "results.json").read_text())
    (cell,) = results["cells"]
    assert cell["row"] == "knn" and cell["dataset"] == "kmnist" and cell["error"] is None
    assert cell["ours"] == pytest.approx(_expected_knn_accuracy())
    assert cell["ours"] > 0.5  # the fixture is learnable: a broken pipeline shows
    assert (cell["num_train"], cell["num_test"]) == (400, 120)
    assert cell["target"] is None and results["quick"] is True and results["failures"] == []
    table = (out / "table.md").read_text()
    assert (
        f"{100 * cell['ours']:.2f}%" in table and "not comparable (cut-down or unverified)" in table
    )


def _as_official(monkeypatch, raw: Path) -> None:
    """Make the fixture files in ``raw`` the published KMNIST release for this test (sizes,
    checksums, split sizes), so a run verifies them and is held to its target."""
    import dataclasses
    import gzip
    import hashlib

    from kmnist_torch import catalog
    from kmnist_torch.catalog import LocalFile
    from kmnist_torch.data import mnist as datasets

    def published(f):
        data = (raw / f.name).read_bytes()
        plain = gzip.decompress(data)
        return dataclasses.replace(
            f,
            size=len(data),
            md5=hashlib.md5(data).hexdigest(),
            sha256=hashlib.sha256(data).hexdigest(),
            extracted=LocalFile(f.extracted.name, len(plain), hashlib.md5(plain).hexdigest()),
        )

    info = catalog.KMNIST
    splits = {s: {"mnist": tuple(map(published, fm["mnist"]))} for s, fm in info.splits.items()}
    sizes = {"train": 400, "test": 120}
    fake = dataclasses.replace(info, splits=splits, split_sizes=sizes)
    monkeypatch.setattr(datasets.KMNIST, "info", fake)
    monkeypatch.setitem(catalog.DATASETS, "kmnist", fake)


def test_check_fails_below_target_and_no_download_uses_placed_files(tmp_path, monkeypatch):
    _offline(monkeypatch)
    _place(tmp_path / "root")
    _as_official(monkeypatch, tmp_path / "root" / "KMNIST" / "raw")
    expected = _expected_knn_accuracy()
    argv = [
        "--datasets",
        "kmnist",
        "--rows",
        "knn",
        "--check",
        "--no-download",
        "--root",
        str(tmp_path / "root"),
        "--device",
        "cpu",
    ]
    # A full (not --quick) run is held to its target: here set just above and just below.
    monkeypatch.setitem(table.UPSTREAM_TODAY, ("knn", "kmnist"), expected + 0.01)
    assert reproduce.main([*argv, "--out", str(tmp_path / "miss")]) == 1
    failures = json.loads((tmp_path / "miss" / "results.json").read_text())["failures"]
    assert len(failures) == 1 and "4-Nearest Neighbour Baseline on KMNIST" in failures[0]
    assert "| FAIL |" in (tmp_path / "miss" / "table.md").read_text()
    monkeypatch.setitem(table.UPSTREAM_TODAY, ("knn", "kmnist"), expected - 0.01)
    assert reproduce.main([*argv, "--out", str(tmp_path / "pass")]) == 0
    cell = json.loads((tmp_path / "pass" / "results.json").read_text())["cells"][0]
    assert cell["difference"] == pytest.approx(0.01)


def test_missing_files_are_a_cell_error(tmp_path, monkeypatch):
    _offline(monkeypatch)
    out = tmp_path / "out"
    argv = [
        "--datasets",
        "kmnist",
        "--rows",
        "knn",
        "--no-download",
        "--root",
        str(tmp_path / "empty"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert reproduce.main(argv) == 1
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    assert cell["error"].startswith("DataFilesError: KMNIST: 5 file(s) missing")
    assert "train-images-idx3-ubyte.gz" in cell["error"] and "put it at" in cell["error"]


def test_train_argv(tmp_path):
    args = reproduce.build_parser().parse_args(
        ["--out", "o", "--quick", "--no-download", "--no-verify", "--root", "r", "--recipe", "fast"]
    )
    cnn = reproduce.train_argv(table.new_cell("cnn", "k49"), args, tmp_path)
    assert cnn[cnn.index("--recipe") + 1] == "cnn" and cnn[cnn.index("--model") + 1] == "simple_cnn"
    for flag in ("--no-download", "--no-verify", "--resume", *reproduce.QUICK_TRAIN):
        assert flag in cnn
    assert cnn[cnn.index("--device") + 1] == "cpu" and cnn[cnn.index("--root") + 1] == "r"
    pre = reproduce.train_argv(table.new_cell("preact18-input", "mnist"), args, tmp_path)
    assert pre[pre.index("--recipe") + 1] == "fast" and pre[pre.index("--mixup") + 1] == "input"
    full = reproduce.build_parser().parse_args(["--out", "o", "--device", "cuda:1"])
    argv = reproduce.train_argv(table.new_cell("preact18-manifold", "kmnist"), full, tmp_path)
    assert "--download" in argv and "--epochs" not in argv and "--limit-train" not in argv
    assert argv[argv.index("--device") + 1] == "cuda:1" and "--root" not in argv


def test_recipe_and_dataset_choices_come_from_their_tables(capsys):
    from kmnist_torch.data.registry import DATASETS
    from kmnist_torch.training.recipes import RECIPES

    actions = {a.dest: a for a in reproduce.build_parser()._actions}
    assert sorted(actions["recipe"].choices) == sorted(RECIPES)
    assert list(actions["datasets"].choices) == list(DATASETS)
    assert actions["recipe"].default in RECIPES
    # A recipe beyond paper/fast is accepted, and reaches the trained rows' argv.
    other = next(name for name in RECIPES if name not in ("paper", "fast"))
    args = reproduce.build_parser().parse_args(["--recipe", other])
    argv = reproduce.train_argv(table.new_cell("preact18", "kmnist"), args, Path("o"))
    assert argv[argv.index("--recipe") + 1] == other
    with pytest.raises(SystemExit):
        reproduce.build_parser().parse_args(["--recipe", "no-such-recipe"])
    assert "invalid choice: 'no-such-recipe'" in capsys.readouterr().err


def test_quick_cnn_cell_trains(tmp_path, monkeypatch):
    pytest.importorskip("kmnist_torch.train")
    _offline(monkeypatch)
    _place(tmp_path / "root")
    out = tmp_path / "out"
    argv = [
        "--datasets",
        "kmnist",
        "--rows",
        "cnn",
        "--quick",
        "--check",
        "--no-download",
        "--no-verify",
        "--root",
        str(tmp_path / "root"),
        "--out",
        str(out),
    ]
    torch.manual_seed(0)
    assert reproduce.main(argv) == 0
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    assert cell["error"] is None and cell["target"] is None
    assert cell["epochs_done"] == 1 and cell["num_train"] == 256 and cell["num_test"] == 120
    assert cell["device_seconds"] > 0 and cell["device"].startswith("CPU")
    run = json.loads((out / "runs" / "kmnist-cnn" / "results.json").read_text())
    assert run["test_accuracy"] == cell["ours"]
    # Rerun: the finished cell is kept from results.json, not trained again.
    assert reproduce.main(argv) == 0
    (again,) = json.loads((out / "results.json").read_text())["cells"]
    assert again["ours"] == cell["ours"]


@pytest.mark.real_data
def test_real_resplit_root_is_the_real_test_split_cut_8000_2000(real_dir, tmp_path):
    from kmnist_torch import KMNIST
    from kmnist_torch.data.formats import read_idx

    assert write_resplit(tmp_path, real_dir / "kmnist", seed=0) == {
        "train": 8000,
        "test": 2000,
    }
    with pytest.warns(UserWarning, match="verify=False"):
        train = KMNIST(tmp_path, train=True, verify=False)
        test = KMNIST(tmp_path, train=False, verify=False)
    assert (len(train), len(test)) == (8000, 2000)
    assert train.classes == [c.char for c in catalog.KMNIST.classes]

    def rows(images, labels):
        flat = images.reshape(len(images), -1)
        return sorted(bytes(x) + bytes([int(y)]) for x, y in zip(flat, labels))

    # The same 10,000 (image, label) pairs as the real test split, each exactly once.
    source = rows(
        read_idx(real_dir / "kmnist" / "t10k-images-idx3-ubyte.gz", 3),
        read_idx(real_dir / "kmnist" / "t10k-labels-idx1-ubyte.gz", 1),
    )
    ours = rows(
        np.concatenate([train.data.numpy(), test.data.numpy()]),
        np.concatenate([train.targets.numpy(), test.targets.numpy()]),
    )
    assert ours == source


def test_resplit_writes_a_root_runs_knn_on_it_and_reuses_it(tmp_path, capsys):
    # A stand-in for the real test split: 10,000 images in the official t10k files.
    source = write_split(tmp_path / "src", "kmnist", "test", *random_split(10000), fmt="mnist")
    out = tmp_path / "out"
    argv = ["--rows", "knn", "--device", "cpu", "--out", str(out)]
    assert reproduce.main(["--resplit", str(source), "--write-only", *argv]) == 0
    raw = raw_folder(out / "resplit-data", catalog.KMNIST)
    assert (raw / "train-images-idx3-ubyte.gz").is_file() and not (out / "results.json").exists()
    # No SOURCE_DIR: the root written before is used (a machine without the source).
    assert reproduce.main(["--resplit", *argv]) == 0
    assert "using the re-split already in" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    (cell,) = results["cells"]
    assert (cell["dataset"], cell["num_train"], cell["num_test"]) == ("kmnist", 8000, 2000)
    assert cell["target"] is None and not results["comparable"] and results["resplit"]
    # Nothing to read from: one clear line, exit 1.
    empty = ["--resplit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]
    assert reproduce.main(empty) == 1
    assert "--resplit needs a folder holding the real KMNIST test split" in capsys.readouterr().err
    assert reproduce.main(["--resplit", "--out", str(tmp_path / "o3")]) == 1
    assert "holds no re-split" in capsys.readouterr().err


def test_out_has_a_default_and_write_only_needs_resplit(capsys):
    assert reproduce.build_parser().parse_args([]).out == "reproduce-out"
    with pytest.raises(SystemExit):
        reproduce.main(["--write-only"])
    assert "--write-only goes with --resplit" in capsys.readouterr().err


def test_a_run_on_unverified_files_is_held_to_no_target(tmp_path, monkeypatch):
    # Files not checked against the published checksums could be anything: the table shows
    # the figure but neither passes nor fails it, and says so.
    _offline(monkeypatch)
    _place(tmp_path / "root")
    argv = ["--datasets", "kmnist", "--rows", "knn", "--check", "--no-download", "--no-verify"]
    argv += ["--root", str(tmp_path / "root"), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert reproduce.main(argv) == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["verified"] is False and doc["comparable"] is False and doc["failures"] == []
    assert doc["cells"][0]["target"] is None and doc["cells"][0]["ours"] is not None
    assert "not comparable (cut-down or unverified)" in (tmp_path / "o" / "table.md").read_text()
