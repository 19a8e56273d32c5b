"""benchmarks/cpu_speed.py's accuracy row (whole simple-CNN recipe runs, ours against the plain
loop; benchmarks/_accuracy.py): the row on tiny random data, and the table and page written
from a run's JSON (``--from-json``) with the numbers it holds."""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """cpu_speed and _accuracy as the script imports them (its folder first on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("cpu_speed"), importlib.import_module("_accuracy")


def tiny_split(acc, n_train: int = 256, n_test: int = 32):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (n_train + n_test, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return acc.Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "random test images")


def test_accuracy_row_trains_both_sides_on_the_same_images(bench, one_thread, monkeypatch):
    cpu_speed, acc = bench
    data = tiny_split(acc)
    made = []  # each model's initial weights, in the order the runs build them

    def create_model(*args, **kw):
        model = real_create(*args, **kw)
        made.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return model

    real_create = acc.create_model
    monkeypatch.setattr(acc, "create_model", create_model)
    row = cpu_speed.accuracy_row(1, 2, data=data)
    # Per seed, ours then the plain loop: the same initial weights; another seed, others.
    assert len(made) == 4 and torch.equal(made[0], made[1]) and torch.equal(made[2], made[3])
    assert not torch.equal(made[0], made[2])
    assert (row["epochs"], row["recipe_epochs"], row["batch"]) == (1, 12, 128)
    assert (row["train"], row["test"], row["source"]) == (256, 32, "random test images")
    assert [(r["ours"]["seed"], r["peer"]["seed"]) for r in row["runs"]] == [(0, 0), (1, 1)]
    handed = acc.digest(data.train_x, data.train_y)
    for run in row["runs"]:
        for side in run.values():
            assert side["data"] == handed  # each side trained on exactly the split's images
            assert side["images"] == 256  # 1 epoch of 2 whole batches of 128
            assert 0 < side["train_s"] and side["img_s"] == pytest.approx(256 / side["train_s"])
            assert 0.0 <= side["accuracy"] <= 1.0
            assert side["accuracy"] * 32 == pytest.approx(round(side["accuracy"] * 32))
            assert side["threads"] >= 1 and side["load"] >= 0
    for key in ("ours", "peer"):
        runs = [r[key] for r in row["runs"]]
        assert row[f"{key}_img_s"] == max(r["img_s"] for r in runs)
        assert row[f"{key}_accuracy"] == pytest.approx(sum(r["accuracy"] for r in runs) / 2)
    assert row["ratio"] == pytest.approx(row["ours_img_s"] / row["peer_img_s"])
    assert row["accuracy_diff"] == pytest.approx(row["ours_accuracy"] - row["peer_accuracy"])
    p, q = row["ours_accuracy"], row["peer_accuracy"]
    assert row["band"] == pytest.approx(2 * math.sqrt((p * (1 - p) + q * (1 - q)) / 32))
    assert row["equal"] == (abs(row["accuracy_diff"]) <= row["band"])
    assert len(row["loads"]) == 4
    json.dumps(row)  # goes into the run's JSON as it is


@pytest.mark.parametrize("shared", ["as found", "absent"])
def test_the_split_is_fixed_and_disjoint(bench, monkeypatch, shared):
    _, acc = bench
    if shared == "absent":
        monkeypatch.setattr(acc._shared, "real_kmnist_test_npz", lambda: None)
    a, b = acc.split(300, 100), acc.split(300, 100)
    real = acc._shared.real_kmnist_test_npz() is not None
    absent = "random images with random labels (../shared absent: top-1 stays near chance)"
    assert a.source == ("real KMNIST test images" if real else absent)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (300, 28, 28)
    seen = {bytes(x.numpy()) for x in a.train_x}
    assert not any(bytes(x.numpy()) in seen for x in a.test_x)


def test_the_plain_model_is_the_simple_cnn_written_plainly(bench, one_thread):
    """The peer's network computes ours' function from ours' initial weights, in torch's
    default memory format, and leaves the generator where creating ours does."""
    from kmnist_torch.models.registry import create_model

    _, acc = bench
    torch.manual_seed(4)
    ours = create_model("simple_cnn", 10, in_chans=1)
    after_ours = torch.rand(3)
    torch.manual_seed(4)
    plain = acc.plain_cnn()
    assert torch.equal(torch.rand(3), after_ours)
    assert type(plain.drop1) is torch.nn.Dropout and type(plain.drop2) is torch.nn.Dropout
    for k, v in ours.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v)
    assert plain.conv2.weight.is_contiguous()
    x = torch.randn(5, 1, 28, 28)
    assert torch.allclose(plain.eval()(x), ours.eval()(x), rtol=0, atol=1e-6)


def test_each_training_run_can_start_in_a_fresh_process(bench, monkeypatch):
    """The script runs each of our training runs in its own process (the package's malloc
    setting is process-wide); the peer's runs stay in the script's process."""
    cpu_speed, acc = bench
    import _shared

    assert _shared.fresh_process(os.getpid) != os.getpid()
    sides = []

    def recorder(fn, *args):
        sides.append(fn.__name__)
        run = {"accuracy": 0.5, "img_s": 100.0, "load": 0.0}
        return (100.0, 1) if fn.__name__.endswith("_steps") else run

    monkeypatch.setattr(_shared, "fresh_process", recorder)
    monkeypatch.setattr(cpu_speed.tt, "load_images", lambda n: (None, None, "none"))
    monkeypatch.setattr(cpu_speed, "_peer_steps", lambda *a: (50.0, 2))
    row = cpu_speed.train_row("simple_cnn", 8, 1, 2, isolate=True)
    assert sides == ["_our_steps"] * 2 and row["isolated"]  # the peer: here
    assert len(row["loads"]) == 4 and row["ours_img_s"] == 100.0 and row["peer_img_s"] == 50.0
    sides.clear()
    monkeypatch.setattr(acc, "plain", lambda *a: {"accuracy": 0.5, "img_s": 50.0, "load": 0.0})
    row = cpu_speed.accuracy_row(1, 1, data=tiny_split(acc), isolate=True)
    assert sides == ["ours"] and row["ratio"] == 2.0


def test_the_plain_loop_refuses_a_recipe_it_does_not_write(bench):
    _, acc = bench
    from kmnist_torch.training.recipes import RECIPES

    with pytest.raises(ValueError, match="simple CNN recipe's"):
        acc.plain(RECIPES["paper"], tiny_split(acc), 0)


def side(seed, img_s, seconds, accuracy, threads):
    return {"seed": seed, "train_s": seconds, "images": 15872, "img_s": img_s,
            "accuracy": accuracy, "threads": threads, "load": 1.25, "data": "ab"}  # fmt: skip


def run_json(tmp_path: Path, accuracy: dict | None, **extra) -> Path:
    res = {
        "command": "python benchmarks/cpu_speed.py --repeats 2",
        "repeats": 2,
        "machine": {
            "cpu": "Test CPU",
            "cpus": 2,
            "flags": ["avx2"],
            "bf16_units": [],
            "torch": "2.x",
        },  # fmt: skip
        "gemm_gflops": {"float32": 15.0, "bf16": 2.5},
        "knn": {},
        "train": {},
        "inference": {"images": 2000, "ours_s": 0.5, "peer_s": 0.25, "loads": [1.0, 1.5]},
    }
    if accuracy is not None:
        res["accuracy"] = accuracy
    res.update(extra)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(res))
    return path


ROW = {
    "recipe": "cnn", "epochs": 2, "recipe_epochs": 12, "batch": 128, "optimizer": "adadelta",
    "lr": 1.0, "train": 8000, "test": 2000, "source": "real KMNIST test images",
    "runs": [
        {"ours": side(0, 612.34, 25.9, 0.8123, 1), "peer": side(0, 401.27, 39.6, 0.8011, 2)},
        {"ours": side(1, 598.0, 26.5, 0.8201, 1), "peer": side(1, 399.9, 39.7, 0.7989, 2)},
    ],
    "ours_img_s": 612.34, "peer_img_s": 401.27, "ratio": 1.526, "ours_accuracy": 0.8162,
    "peer_accuracy": 0.8, "accuracy_diff": 0.0162, "band": 0.0243, "equal": True,
    "loads": [1.1, 1.2, 1.3, 1.9],
}  # fmt: skip


def test_page_and_table_carry_the_accuracy_row_from_json(bench, tmp_path, capsys):
    cpu_speed, _ = bench
    page = tmp_path / "page.md"
    assert cpu_speed.main(["--from-json", str(run_json(tmp_path, ROW)), "--docs", str(page)]) == 0
    printed = capsys.readouterr().out
    text = page.read_text()
    words = " ".join(text.split())  # the page's paragraphs are wrapped
    line = next(row for row in text.splitlines() if row.startswith("| simple CNN recipe"))
    assert line in printed  # the table printed is the page's
    for shown in ("2 of its 12 epochs on 8,000 images, batch 128, top-1 on 2,000 others",
                  "612.3 img/s (1 thread, 25.9 s), top-1 81.6% (seeds 0, 1: 81.2%, 82.0%)",
                  "401.3 img/s (2 threads, 39.6 s), top-1 80.0% (seeds 0, 1: 80.1%, 79.9%)",
                  "1.53x; top-1 +1.6 points, inside +/-2.4", "| 1.1-1.9 |"):  # fmt: skip
        assert shown in line, shown
    assert "The accuracy of whole runs was not measured" not in text
    assert "2 of the recipe's 12 epochs (`--acc-epochs`: all 12 take 6 times as long)" in words
    assert "adadelta lr 1, batch 128" in words and "8,000 real KMNIST test images" in words
    assert "two binomial standard errors" in words

    outside = {**ROW, "accuracy_diff": -0.031, "equal": False, "ratio": 0.8}
    cpu_speed.main(["--from-json", str(run_json(tmp_path, outside)), "--docs", str(page)])
    assert "0.80x; top-1 -3.1 points, outside +/-2.4" in page.read_text()
    # A run from before the row still renders, and says the accuracy was not measured.
    cpu_speed.main(["--from-json", str(run_json(tmp_path, None)), "--docs", str(page)])
    text = page.read_text()
    assert "The accuracy of whole runs was not measured" in text
    assert "simple CNN recipe, whole runs" not in text


def test_bad_acc_epochs_are_one_line(bench, capsys):
    cpu_speed, _ = bench
    with pytest.raises(SystemExit) as stop:
        cpu_speed.main(["--acc-epochs", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--acc-epochs: expected a whole number of at least 1, got '0'" in err
    assert "Traceback" not in err


def test_page_says_when_the_4nn_rows_ran_more_times(bench, tmp_path):
    cpu_speed, _ = bench
    page = tmp_path / "page.md"
    for extra, said in (({}, "best of 2."), ({"knn_repeats": 2}, "best of 2."),
                        ({"knn_repeats": 3}, "best of 2 (the 4-NN rows: best of 3).")):  # fmt: skip
        cpu_speed.main(["--from-json", str(run_json(tmp_path, ROW, **extra)), "--docs", str(page)])
        assert said in " ".join(page.read_text().split()), extra


def test_page_says_how_the_4nn_screen_ran(bench, tmp_path):
    cpu_speed, _ = bench
    page = tmp_path / "page.md"
    knn_row = {"train": 60000, "test": 10000, "ours_s": 5.0, "peer_s": 26.0, "mismatches": 0,
               "screen": "default", "floor_float32_s": 8.7, "floor_bf16_s": 57.1,
               "loads": [1.2, 1.3]}  # fmt: skip
    for fields, said in (
        ({"screen_dims": 144, "screen_lanes": 2}, "from 144 principal directions and the "
         "residual norm, then exact distances for the images it cannot rule out; two batches "
         "of test images at a time, each in a thread of its own;"),
        ({}, "from 160 principal directions and the residual norm, then exact distances for the "
         "images it cannot rule out; one batch of test images at a time;"),  # before the fields
    ):  # fmt: skip
        knn = {"KMNIST size": {**knn_row, **fields}}
        cpu_speed.main(["--from-json", str(run_json(tmp_path, ROW, knn=knn)), "--docs", str(page)])
        words = " ".join(page.read_text().split())
        assert said in words, fields
        assert "| 5.0 s | scikit-learn 26.0 s | 5.20x, 0 predictions differ |" in words


@pytest.mark.parametrize(
    "gemm, shown",
    [
        (True, "chunked matrix products (`kmnist_torch.training.cpu_conv`)"),
        (False, "oneDNN's"),
        (None, "oneDNN's"),  # a run from before it was recorded
    ],
)
def test_page_says_how_our_weight_gradients_were_summed(bench, tmp_path, gemm, shown):
    cpu_speed, _ = bench
    path = run_json(tmp_path, ROW)
    res = json.loads(path.read_text())
    if gemm is not None:
        res["machine"]["gemm_wgrad"] = gemm
    path.write_text(json.dumps(res))
    page = tmp_path / "page.md"
    cpu_speed.main(["--from-json", str(path), "--docs", str(page)])
    words = " ".join(page.read_text().split())
    assert f"our convolutions' weight gradients: {shown}." in words


def test_training_rows_give_their_flop_rate_and_what_one_and_a_half_times_would_need(
    bench, tmp_path
):
    cpu_speed, _ = bench
    row = {"ours_img_s": 60.0, "peer_img_s": 48.0, "ours_threads": 2, "peer_threads": 2,
           "batch": 100, "steps": 5, "loads": [2.0, 2.1], "flops_per_image": 2.5e9}  # fmt: skip
    path = run_json(tmp_path, ROW, train={"preact18": row})
    page = tmp_path / "page.md"
    cpu_speed.main(["--from-json", str(path), "--docs", str(page)])
    text = page.read_text()
    line = next(r for r in text.splitlines() if r.startswith("| PreActResNet-18"))
    assert "60.0 img/s (2 threads; 150 GFLOP/s)" in line  # 60 x 2.5 GFLOP
    assert "48.0 img/s (2 threads; 120 GFLOP/s)" in line
    words = " ".join(text.split())
    # 1.5 x 48 img/s x 2.5 GFLOP = 180 GFLOP/s, 12x the test run's 15 GFLOP/s product
    assert (
        "preact18 2,500.0 MFLOP an image, so 1.5x the alternative would sustain 180 GFLOP/s"
        in words
    )
    assert "(12.00x the float32 matrix product of the last row)" in words
    # A run from before the count: no rate, no sentence.
    del row["flops_per_image"]
    cpu_speed.main(["--from-json", str(run_json(tmp_path, ROW, train={"preact18": row})),
                    "--docs", str(page)])  # fmt: skip
    assert "GFLOP/s)" not in page.read_text() and "MFLOP an image" not in page.read_text()


def test_step_flops_counts_a_training_step(bench):
    cpu_speed, _ = bench
    # conv1 forward 2*26*26*32*9, conv2 2*24*24*64*32*9, fc1 2*9216*128, fc2 2*128*10; the
    # backward twice that, less conv1's input gradient (the images need none).
    conv1, conv2, fc = 2 * 676 * 32 * 9, 2 * 576 * 64 * 32 * 9, 2 * (9216 * 128 + 1280)
    assert cpu_speed.step_flops("simple_cnn") == 3 * (conv1 + conv2 + fc) - conv1


def test_an_accuracy_difference_of_nothing_is_not_negative(bench, tmp_path):
    cpu_speed, _ = bench
    row = {**ROW, "accuracy_diff": -1e-12}
    page = tmp_path / "page.md"
    cpu_speed.main(["--from-json", str(run_json(tmp_path, row)), "--docs", str(page)])
    assert "top-1 +0.0 points" in page.read_text()
