"""The KKanji long-tail benchmark: the long-tail scores (head / middle / tail by training
images), nearest class mean on pixels, the harness's ncm row and long-tail records, and
benchmarks/kkanji_longtail.py end to end on a generated tree."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import kkanji_files, write_kkanji_tree
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import NearestCentroid

from kmnist_torch import reproduce
from kmnist_torch._harness import rerun_settings
from kmnist_torch.models.knn import knn_predict
from kmnist_torch.models.ncm import class_means, ncm_predict
from kmnist_torch.reporting.longtail import class_groups, longtail_scores, longtail_table

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------- the long-tail scores


def test_groups_at_the_thresholds():
    # >= 100 training images: head; <= 10: tail; between: middle. Both edges are inclusive.
    counts = [150, 100, 99, 11, 10, 0]
    assert class_groups(counts).tolist() == [0, 0, 1, 1, 2, 2]
    assert class_groups(counts, head_min=150, tail_max=0).tolist() == [0, 1, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="tail_max < head_min"):
        class_groups(counts, head_min=10, tail_max=10)


def test_scores_per_group_equal_sklearn_on_each_group():
    rng = np.random.default_rng(0)
    counts = np.array([300, 120, 100, 99, 40, 11, 10, 5, 2, 7])
    # Class 9 (a tail class) has no test image: it is not counted anywhere.
    target = np.concatenate([np.full(n, k) for k, n in enumerate([30, 12, 10, 9, 4, 2, 2, 1, 1])])
    pred = np.where(rng.random(len(target)) < 0.6, target, rng.integers(0, 10, len(target)))
    rec = longtail_scores(torch.from_numpy(pred), torch.from_numpy(target), counts)
    assert rec["top1"] == pytest.approx(accuracy_score(target, pred), abs=1e-12)
    assert rec["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(target, pred), abs=1e-12
    )
    assert (rec["test_images"], rec["classes"]) == (len(target), 9)
    members = {"head": [0, 1, 2], "middle": [3, 4, 5], "tail": [6, 7, 8, 9]}
    for name, classes in members.items():
        g = rec["groups"][name]
        rows = np.isin(target, classes)
        assert g["test_images"] == rows.sum()
        assert g["classes"] == len(set(target[rows]))
        assert g["train_images"] == counts[classes].sum()
        assert g["top1"] == pytest.approx(accuracy_score(target[rows], pred[rows]), abs=1e-12)
        # Balanced over the group's classes: a wrong prediction into another group still
        # counts as a miss, and classes only predicted do not count.
        assert g["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(target[rows], pred[rows]), abs=1e-12
        )
    assert rec["groups"]["tail"]["classes_without_test"] == 1
    assert rec["groups"]["tail"]["classes"] == 3
    assert rec["thresholds"] == {"head_min": 100, "tail_max": 10}


def test_an_empty_group_has_no_score_and_the_table_says_so():
    rec = longtail_scores([0, 1, 1], [0, 1, 0], [20, 30], head_min=25, tail_max=5)
    assert rec["groups"]["tail"] == {"classes": 0, "test_images": 0, "train_images": 0,
                                     "classes_without_test": 0, "top1": None,
                                     "balanced_accuracy": None}  # fmt: skip
    assert rec["groups"]["head"]["top1"] == 1.0 and rec["groups"]["middle"]["top1"] == 0.5
    table = longtail_table([("NCM", rec)])
    assert "| NCM | 66.67% | 75.00% | 100.00% / 100.00% | 50.00% / 50.00% | — / — |" in table
    assert "Head (≥ 25)" in table and "Tail (≤ 5)" in table
    sizes = "head (≥ 25): 1 classes, 1 test images; middle: 1 classes, 2 test images"
    assert f"Groups: {sizes}; tail (≤ 5): 0 classes, 0 test images." in table
    # Rows with other groups (other splits) each say theirs.
    other = longtail_scores([0, 1], [0, 1], [30, 30], head_min=25, tail_max=5)
    both = longtail_table([("NCM", rec), ("4-NN", other)])
    assert f"- NCM: {sizes}" in both and "- 4-NN: head (≥ 25): 2 classes, 2 test images" in both


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="3 predictions but 2 targets"):
        longtail_scores([0, 1, 1], [0, 1], [5, 5])
    with pytest.raises(ValueError, match="train_counts has 2 classes"):
        longtail_scores([0, 2], [0, 2], [5, 5])
    with pytest.raises(ValueError, match="empty set"):
        longtail_scores([], [], [5])


# ---------------------------------------------------------------------- nearest class mean


def _brute_force(train, labels, test, num_classes):
    means = np.stack([train[labels == k].mean(axis=0) for k in range(num_classes)])
    d = ((test[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return d.argmin(axis=1)  # the first of equal minima: the lower class


@pytest.mark.parametrize("chunk", [64, 4096])
def test_ncm_equals_brute_force_and_sklearn(chunk):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (300, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 6, 300)
    test = rng.integers(0, 256, (120, 8, 8), dtype=np.uint8)
    means = class_means(train, labels, 6, chunk=chunk)
    flat = train.reshape(300, -1).astype(np.float64)
    np.testing.assert_array_equal(
        means.numpy(), np.stack([flat[labels == k].mean(axis=0) for k in range(6)])
    )
    pred = ncm_predict(means, torch.from_numpy(test), chunk=chunk).numpy()
    q = test.reshape(120, -1).astype(np.float64)
    np.testing.assert_array_equal(pred, _brute_force(flat, labels, q, 6))
    np.testing.assert_array_equal(pred, NearestCentroid().fit(flat, labels).predict(q))


def test_ncm_ties_go_to_the_lower_class_and_an_empty_class_is_never_chosen():
    # Means 0 (class 1) and 4 (class 2); class 0 and class 3 have no training image (NaN).
    train = np.array([[0.0], [0.0], [4.0], [4.0]])
    means = class_means(train, [1, 1, 2, 2], 4)
    assert torch.isnan(means[0]).all() and torch.isnan(means[3]).all()
    # 2 is as near to 0 as to 4: the lower class; -10 is nearest to class 1's mean.
    pred = ncm_predict(means, np.array([[2.0], [-10.0], [3.0], [100.0]]))
    assert pred.tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="every row of means is NaN"):
        ncm_predict(torch.full((2, 1), float("nan"), dtype=torch.float64), np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        class_means(train, [1, 1, 2, 4], 4)
    with pytest.raises(ValueError, match="have 2 pixels"):
        ncm_predict(means, np.zeros((1, 2)))


def test_knn_leaves_the_callers_float_images_alone():
    train = torch.randint(0, 256, (50, 16)).float()
    kept = train.clone()
    knn_predict(train, torch.arange(50) % 3, train[:5].clone(), device="cpu")
    assert torch.equal(train, kept)


# ----------------------------------------------- the harness and the benchmark, end to end

# Training images per class after the default split (test = floor(n / 5)): 101 (head), 32, 11
# (middle), 8, 4 (tail), and three classes too small for a test image (4, 2, 1 images).
COUNTS = [126, 40, 13, 10, 5, 4, 2, 1]


@pytest.fixture(scope="module")
def tree_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("longtail")
    write_kkanji_tree(root / "KKanji", kkanji_files(len(COUNTS), COUNTS, seed=3))
    return root


def test_harness_kkanji_cells_get_a_longtail_record(tree_root, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--datasets", "kkanji", "--rows", "knn", "ncm", "cnn", "--quick", "--root",
            str(tree_root), "--no-verify", "--no-download", "--out", str(out),
            "--image-size", "16"]  # fmt: skip
    assert reproduce.run(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["image_size"] == 16
    # Without --image-size the settings are those of a run from before it existed.
    plain = reproduce.build_parser().parse_args(["--datasets", "kkanji"])
    assert "image_size" not in rerun_settings(plain)
    cells = {c["row"]: c for c in doc["cells"]}
    assert cells["ncm"]["title"] == "Nearest Class Mean (pixels)" and cells["ncm"]["target"] is None
    assert "--image-size" in cells["cnn"]["train_argv"]
    for row, cell in cells.items():
        lt = cell["longtail"]
        # The trained row's record comes from its model.pt on the images it tested on: the
        # same scores as the run's last epoch.
        assert lt["top1"] == pytest.approx(cell["accuracy"], abs=1e-12), row
        assert lt["balanced_accuracy"] == pytest.approx(cell["balanced_accuracy"], abs=1e-12)
        groups = lt["groups"]
        assert [groups[g]["classes"] for g in ("head", "middle", "tail")] == [1, 2, 2], row
        assert [groups[g]["test_images"] for g in ("head", "middle", "tail")] == [25, 10, 3]
        assert groups["tail"]["classes_without_test"] == 3
    table = (out / "table.md").read_text()
    assert "## KKanji long tail" in table and "| Nearest Class Mean (pixels) |" in table
    # A rerun keeps the finished cells, long-tail records included.
    assert reproduce.run(argv) == 0
    assert "done in an earlier run" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert [c["longtail"] for c in again["cells"]] == [c["longtail"] for c in doc["cells"]]


def _script():
    """benchmarks/kkanji_longtail.py as a module (run in this process: a second interpreter
    importing torch costs more than the whole benchmark on a generated tree)."""
    spec = importlib.util.spec_from_file_location(
        "kkanji_longtail", ROOT / "benchmarks" / "kkanji_longtail.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_writes_rows_split_and_table_and_resumes(tree_root, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--root", str(tree_root), "--out", str(out), "--no-verify", "--image-size", "16",
            "--cnn-epochs", "1", "--skip", "knn", "preact18"]  # fmt: skip
    script = _script()
    assert script.main(argv) == 0
    first = capsys.readouterr().out
    doc = json.loads((out / "kkanji_longtail.json").read_text())
    split = (out / "kkanji-split.json").read_bytes()
    assert doc["split"]["sha256"] == hashlib.sha256(split).hexdigest()
    assert (doc["split"]["train"], doc["split"]["test"]) == (163, 38)
    assert list(doc["rows"]) == ["ncm", "cnn"]
    for row in doc["rows"].values():
        assert row["split_sha256"] == doc["split"]["sha256"] and row["seconds"] > 0
        assert len(row["load_before"]) == 3 and row["machine"]["cores"] == os.cpu_count()
        assert row["longtail"]["groups"]["head"]["test_images"] == 25
    assert doc["rows"]["cnn"]["image_size"] == 16 and doc["rows"]["ncm"]["image_size"] == 64
    cnn = doc["rows"]["cnn"]
    assert cnn["longtail"]["top1"] == pytest.approx(cnn["trainer_test_accuracy"], abs=1e-12)
    md = (out / "kkanji_longtail.md").read_text()
    assert doc["split"]["sha256"] in md and "Keras Simple CNN at 16x16" in md
    assert "== Nearest Class Mean" in first
    # Every row's JSON is there: a rerun runs none of them again.
    assert script.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("done in an earlier run") == 2 and "==" not in second
    assert json.loads((out / "kkanji_longtail.json").read_text())["rows"] == doc["rows"]
    # Other settings for a row: that row runs again, so one table never mixes settings.
    assert script.main([*argv[:-4], "2", *argv[-3:]]) == 0
    third = capsys.readouterr().out
    assert "cnn: " in third and "other settings or another split: running it again" in third
    assert third.count("done in an earlier run") == 1
    assert json.loads((out / "rows" / "cnn.json").read_text())["settings"]["epochs"] == 2
