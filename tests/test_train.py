"""The trainer: metrics, augmentation, schedules, the recipe table, the command line end to end
on KMNIST fixtures served from 127.0.0.1, results.json, checkpoints, Ctrl-C and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import epoch_numbers, mirror_env
from fakedata import random_split

from kmnist_torch import train
from kmnist_torch.data.resplit import write_split
from kmnist_torch.data.splits import LIMIT_SEED, load_split, stratified_subset
from kmnist_torch.errors import RecipeError, TrainError
from kmnist_torch.reporting.scores import accuracy, balanced_accuracy
from kmnist_torch.training import cpu, engine
from kmnist_torch.training.augment import random_translate
from kmnist_torch.training.recipes import RECIPES, Recipe
from kmnist_torch.training.runtime import CHECKPOINT

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# ------------------------------------------------------------------------------------ metrics


def test_balanced_accuracy_hand_worked_example():
    # Class 0: 3 of 4 right; class 1: 1 of 2; class 2: 1 of 1.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    assert accuracy(pred, target) == pytest.approx(5 / 7)
    assert balanced_accuracy(pred, target) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)


def test_balanced_accuracy_counts_only_classes_present_in_the_targets():
    # Class 3 is predicted but never true: it has no recall to average.
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 3, 1, 1])
    assert balanced_accuracy(pred, target) == pytest.approx((1 / 2 + 1) / 2)
    # Imbalance: a majority-class guesser is 90% accurate but 50% balanced.
    target = torch.tensor([0] * 9 + [1])
    assert accuracy(torch.zeros(10, dtype=torch.long), target) == pytest.approx(0.9)
    assert balanced_accuracy(torch.zeros(10, dtype=torch.long), target) == pytest.approx(0.5)


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="same length"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="empty set"):
        balanced_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


# --------------------------------------------------------------------------------- augmentation


def test_translation_shifts_each_image_by_its_own_offset_with_zero_fill():
    x = torch.zeros(64, 1, 12, 12)
    x[:, 0, 5, 6] = 1.0  # one bright pixel, asymmetric so a flip would show
    x[:, 0, 5, 7] = 0.5
    out = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = set()
    for img in out[:, 0]:
        (r,), (c,) = torch.nonzero(img == 1.0, as_tuple=True)
        dy, dx = int(r) - 5, int(c) - 6
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        assert img[r, c + 1] == 0.5  # the neighbour moved along: no flip
        assert float(img.sum()) == pytest.approx(1.5)  # zeros came in, nothing else
        shifts.add((dy, dx))
    assert len(shifts) > 15  # 25 possible offsets, drawn per image
    # Content shifted off the edge is gone, and the new border is background.
    edge = torch.zeros(200, 1, 4, 4)
    edge[:, 0, 0, 0] = 1.0
    moved = random_translate(edge, 1, torch.Generator().manual_seed(1))
    assert {float(m.sum()) for m in moved} == {0.0, 1.0}


def test_translation_is_reproducible_and_zero_is_identity():
    x = torch.rand(8, 1, 28, 28)
    a = random_translate(x, 2, torch.Generator().manual_seed(5))
    b = random_translate(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert random_translate(x, 0) is x
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        random_translate(x, -1)


# --------------------------------------------------------------------------- recipes, schedule


def test_recipes_hold_the_issues_values():
    paper = RECIPES["paper"]
    assert (paper.model, paper.optimizer, paper.nesterov) == ("preact18", "sgd", True)
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.batch_size) == (0.1, 0.9, 1e-4, 100)
    assert (paper.schedule, paper.gamma, paper.translate) == ("step", 0.1, 2)
    assert paper.epochs == 200 and paper.milestones == (0.5, 0.75)
    fast = RECIPES["fast"]
    assert (fast.model, fast.mixup, fast.loss) == (paper.model, paper.mixup, paper.loss)
    assert fast.amp and fast.channels_last and fast.batch_size > paper.batch_size
    cnn = RECIPES["cnn"]
    assert (cnn.model, cnn.optimizer, cnn.lr, cnn.batch_size, cnn.epochs) == (
        "simple_cnn",
        "adadelta",
        1.0,
        128,
        12,
    )
    assert (cnn.rho, cnn.eps, cnn.mixup, cnn.translate) == (0.95, 1e-7, "none", 0)


def test_step_schedule_decays_at_fractions_of_the_run():
    r = RECIPES["paper"]  # 200 epochs, x0.1 at 100 and 150
    f = [engine.lr_factor(e * 10, 10, r) for e in (0, 99, 100, 149, 150, 199)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_onecycle_warms_up_then_decays_to_zero():
    r = RECIPES["fast"]  # 30 epochs, 20% warm-up
    total = 30 * 10
    f = [engine.lr_factor(s, 10, r) for s in range(total)]
    peak = int(np.argmax(f))
    assert f[peak] == pytest.approx(1.0) and peak == round(0.2 * total) - 1
    assert all(a < b for a, b in zip(f[:peak], f[1 : peak + 1]))
    assert all(a > b for a, b in zip(f[peak:-1], f[peak + 1 :]))
    assert f[-1] < 0.01
    assert engine.lr_factor(7, 10, RECIPES["cnn"]) == 1.0


def test_every_recipe_value_is_a_flag(tmp_path):
    args = train.build_parser().parse_args(
        [
            "--epochs",
            "3",
            "--batch-size",
            "7",
            "--lr",
            "0.02",
            "--weight-decay",
            "0",
            "--momentum",
            "0.5",
            "--no-nesterov",
            "--alpha",
            "0.4",
            "--milestones",
            "0.3,0.6",
            "--mixup",
            "input",
            "--loss",
            "ce",
            "--translate",
            "1",
            "--amp",
            "--compile",
        ]
    )
    name, r = train.resolve_recipe(args)
    assert name == "paper"
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay, r.momentum) == (3, 7, 0.02, 0, 0.5)
    assert (r.nesterov, r.alpha, r.milestones, r.mixup, r.loss) == (
        False,
        0.4,
        (0.3, 0.6),
        "input",
        "ce",
    )
    assert r.translate == 1 and r.amp and r.compile
    flags = train.build_parser().format_help()
    for f in dataclasses.fields(Recipe):
        assert "--" + f.name.replace("_", "-") in flags
    # The default alpha follows the mixup mode, as in the reference.
    for mode, alpha in (("input", 1.0), ("manifold", 2.0)):
        _, r = train.resolve_recipe(train.build_parser().parse_args(["--mixup", mode]))
        assert r.alpha == alpha
    _, r = train.resolve_recipe(train.build_parser().parse_args(["--model", "simple_cnn"]))
    assert r.optimizer == "adadelta"  # simple_cnn implies the cnn recipe


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "-1"], "--lr must be positive"),
        (["--lr", "nan"], "--lr must be positive (at most 1e30)"),
        (["--lr", "1e300"], "--lr must be positive (at most 1e30)"),
        (["--checkpoint-every", "0"], "give a number of steps (200) or a time (10min"),
        (["--checkpoint-every", "5 days"], "give a number of steps (200) or a time (10min"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--milestones", "0.5,1.5"], "fractions of the run"),
        (["--resume", "--overwrite"], "exclude each other"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
    ],
)
def test_bad_values_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.run(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_recipes_check_their_values_when_built_in_code():
    paper = RECIPES["paper"]
    with pytest.raises(RecipeError, match="epochs must be at least 1") as exc:
        dataclasses.replace(paper, epochs=0)
    assert exc.value.problems == [("epochs", "must be at least 1")]
    with pytest.raises(ValueError, match="lr must be positive.*optimizer must be one of"):
        paper.override(lr=0.0, optimizer="adam")
    with pytest.raises(RecipeError, match="warmup is a fraction"):
        paper.override(warmup=1.0)
    # override fills alpha from the mode; an alpha given stays; none for no mixup.
    assert paper.alpha is None and paper.override().alpha == 2.0
    assert paper.override(mixup="input").alpha == 1.0
    assert paper.override(mixup="input", alpha=0.3).alpha == 0.3
    assert RECIPES["cnn"].override().alpha is None


# ------------------------------------------------------------------------ --limit-* subsets


def test_stratified_subset_keeps_class_proportions_sorted_and_seeded():
    # Sorted by class, as KKanji is: the first N would be a single class.
    targets = np.repeat([0, 1, 2, 3], [500, 300, 150, 50])
    keep = stratified_subset(targets, 100)
    assert len(keep) == 100 and np.all(np.diff(keep) > 0)  # sorted, no repeats
    assert np.bincount(targets[keep]).tolist() == [50, 30, 15, 5]
    # Largest remainders get the leftovers: 7 of (500, 300, 150, 50) is 3.5, 2.1, 1.05, 0.35.
    assert np.bincount(targets[stratified_subset(targets, 7)], minlength=4).tolist() == [
        4,
        2,
        1,
        0,
    ]
    assert np.array_equal(keep, stratified_subset(torch.as_tensor(targets), 100))
    assert not np.array_equal(keep, stratified_subset(targets, 100, seed=LIMIT_SEED + 1))
    assert np.array_equal(stratified_subset(targets, 5000), np.arange(1000))
    with pytest.raises(ValueError, match="n must be >= 0"):
        stratified_subset(targets, -1)


def test_load_split_limits_are_stratified_subsets(tmp_path):
    images, _ = random_split(400, "kmnist", 0)
    labels = np.repeat(np.arange(10), 40).astype(np.uint8)  # sorted by class
    write_split(tmp_path, "kmnist", "train", images, labels, fmt="npz")
    write_split(tmp_path, "kmnist", "test", images[:100], labels[::4], fmt="npz")
    cut = load_split("kmnist", tmp_path, True, limit=50, download=False, verify=False, format="npz")
    assert np.bincount(cut.targets.numpy()).tolist() == [5] * 10
    keep = stratified_subset(labels, 50)
    assert torch.equal(cut.data, torch.from_numpy(images[keep]))
    test = load_split(
        "kmnist", tmp_path, False, limit=20, download=False, verify=False, format="npz"
    )
    assert np.bincount(test.targets.numpy()).tolist() == [2] * 10
    whole = load_split("kmnist", tmp_path, False, download=False, verify=False, format="npz")
    assert len(whole.targets) == 100 and whole.classes == cut.classes


# ---------------------------------------------------------------------- runs on fixture data


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fixtures: class k is a bright bar at its own place, over random_split's noise."""
    images, labels = random_split(n, "kmnist", seed)
    labels = labels.copy()
    np.random.default_rng(seed).shuffle(labels)
    images = images // 4  # noise up to 63, under the bars
    for i, k in enumerate(labels):
        r, c = 3 + 12 * (k // 5), 2 + 5 * (k % 5)
        images[i, r : r + 8, c : c + 4] = 255
    return images, labels


def _write_kmnist(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """A KMNIST root in the official formats and names (kmnist_torch.data.resplit)."""
    write_split(root, "kmnist", "train", *_images(n_train, 0), fmt="mnist")
    return write_split(root, "kmnist", "test", *_images(n_test, 1), fmt="mnist")


@pytest.fixture(scope="module")
def kmnist_root(tmp_path_factory) -> Path:
    """A data root already holding small KMNIST fixtures (no download needed)."""
    root = tmp_path_factory.mktemp("data")
    _write_kmnist(root)
    return root


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--root",
        str(root),
        "--no-download",
        "--no-verify",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


# A small but complete recipe: dropout (simple_cnn), manifold mixup and translation all draw
# random numbers, so resuming must restore every random stream.
SMALL = [
    "--model",
    "simple_cnn",
    "--mixup",
    "manifold",
    "--translate",
    "2",
    "--epochs",
    "2",
    "--batch-size",
    "25",
    "--lr",
    "0.5",
    "--deterministic",
]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=True)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_end_to_end_on_kmnist_served_from_loopback(http_server, fast_net, tmp_path):
    for path in _write_kmnist(tmp_path / "served").iterdir():
        http_server.add(f"/kmnist/{path.name}", path.read_bytes())
    mirror_env(fast_net, http_server.url)
    root, out = tmp_path / "root", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmnist_torch.train",
            "--dataset",
            "kmnist",
            "--recipe",
            "cnn",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--root",
            str(root),
            "--no-verify",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    # Downloaded from the mirror into torchvision's layout.
    assert http_server.hits("/kmnist/train-images-idx3-ubyte.gz")
    assert (root / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("epoch ")] == [
        "1/3",
        "2/3",
        "3/3",
    ]
    assert "warning: training on the CPU" in proc.stderr and "need about" in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and not res["interrupted"]
    assert res["num_train"] == 200 and res["num_test"] == 100 and res["num_classes"] == 10
    assert res["test_accuracy"] > 0.5  # the fixture classes are learnable; chance is 0.1
    assert (out / CHECKPOINT).is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_results_schema(kmnist_root, tmp_path):
    out = tmp_path / "run"
    res = train.run(_argv(kmnist_root, out, *SMALL, "--limit-test", "60", "--seed", "3"))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key, kind in {
        "config": dict,
        "epochs": list,
        "test_accuracy": float,
        "test_balanced_accuracy": float,
        "best_test_accuracy": float,
        "best_test_balanced_accuracy": float,
        "images_per_second": float,
        "wall_seconds": float,
        "device_seconds": float,
        "device": str,
        "torch_version": str,
        "seed": int,
    }.items():
        assert isinstance(res[key], kind), key
    assert "git_commit" in res and (res["git_commit"] is None or len(res["git_commit"]) == 40)
    assert res["seed"] == 3 and res["torch_version"] == torch.__version__
    assert res["device"].startswith("CPU") and res["num_test"] == 60
    assert res["config"]["model"] == "simple_cnn" and res["config"]["alpha"] == 2.0
    assert res["config"]["recipe"] == "cnn" and res["config"]["batch_size"] == 25
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    for e in res["epochs"]:
        assert set(e) >= {
            "train_loss",
            "test_loss",
            "test_accuracy",
            "test_balanced_accuracy",
            "images_per_second",
            "lr",
        }
        assert e["images_per_second"] > 0
    assert res["test_accuracy"] == res["epochs"][-1]["test_accuracy"]
    assert res["best_test_accuracy"] == max(e["test_accuracy"] for e in res["epochs"])
    assert res["test_balanced_accuracy"] == res["epochs"][-1]["test_balanced_accuracy"]
    assert res["best_test_balanced_accuracy"] == max(
        e["test_balanced_accuracy"] for e in res["epochs"]
    )
    assert res["wall_seconds"] >= res["device_seconds"] > 0


def test_resume_after_an_epoch_ends_with_the_same_numbers(kmnist_root, tmp_path):
    whole = train.run(_argv(kmnist_root, tmp_path / "whole", *SMALL))
    first = train.run(_argv(kmnist_root, tmp_path / "split", *SMALL, "--stop-after", "1"))
    assert first["interrupted"] and not first["finished"] and len(first["epochs"]) == 1
    rest = train.run(_argv(kmnist_root, tmp_path / "split", *SMALL, "--resume"))
    assert rest["finished"] and epoch_numbers(rest) == epoch_numbers(whole)
    assert rest["test_accuracy"] == whole["test_accuracy"]
    assert _same_weights(tmp_path / "whole", tmp_path / "split")


def test_ctrl_c_mid_epoch_checkpoints_and_resume_matches(kmnist_root, tmp_path, monkeypatch):
    whole = train.run(_argv(kmnist_root, tmp_path / "whole", *SMALL))
    calls = {"n": 0}
    real = engine.random_translate

    def translate_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of epoch 1 (8 steps an epoch)
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "random_translate", translate_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    stopped = train.run(_argv(kmnist_root, tmp_path / "split", *SMALL))
    assert stopped["interrupted"] and stopped["epochs"] == []
    state = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 3)  # the step under way was finished
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works as before again
    monkeypatch.setattr(engine, "random_translate", real)
    rest = train.run(_argv(kmnist_root, tmp_path / "split", *SMALL, "--resume"))
    assert epoch_numbers(rest) == epoch_numbers(whole)
    assert _same_weights(tmp_path / "whole", tmp_path / "split")


@pytest.mark.parametrize("wgrad", ["other", "absent"])
def test_a_run_from_before_the_cpu_used_channels_last_resumes(kmnist_root, tmp_path, wgrad):
    """channels_last_active is a layout, as the device is: a checkpoint written when a CPU
    run trained in torch's default layout resumes, and its weights load into either. So is
    gemm_wgrad_active (training/cpu_conv.py), whether it differs or the checkpoint is from
    before it was recorded."""
    out = tmp_path / "run"
    first = train.run(_argv(kmnist_root, out, *SMALL, "--stop-after", "1"))
    assert first["interrupted"]
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["config"]["channels_last_active"] is True
    assert state["config"]["gemm_wgrad_active"] is cpu.gemm_wgrad_enabled(torch.device("cpu"))
    assert all(v.is_contiguous() for v in state["model"].values())  # stored row-major
    state["config"]["channels_last_active"] = False
    if wgrad == "absent":
        del state["config"]["gemm_wgrad_active"]
    else:
        state["config"]["gemm_wgrad_active"] = not state["config"]["gemm_wgrad_active"]
    torch.save(state, out / CHECKPOINT)
    rest = train.run(_argv(kmnist_root, out, *SMALL, "--resume"))
    assert rest["finished"]


def test_output_folder_is_not_overwritten_by_accident(kmnist_root, tmp_path):
    out = tmp_path / "run"
    argv = _argv(kmnist_root, out, *SMALL, "--epochs", "1")
    train.run(argv)
    with pytest.raises(TrainError, match="already holds a run.*--resume.*--overwrite"):
        train.run(argv)
    with pytest.raises(TrainError, match=r"other settings: lr=0\.5 \(now 0\.2\)"):
        train.run(argv + ["--resume", "--lr", "0.2"])
    done = train.run(argv + ["--resume"])  # finished already: nothing to train
    assert done["finished"] and len(done["epochs"]) == 1
    again = train.run(argv + ["--overwrite", "--seed", "1"])
    assert again["seed"] == 1 and len(again["epochs"]) == 1


def test_too_few_images_for_a_batch_is_explained(kmnist_root, tmp_path):
    argv = _argv(kmnist_root, tmp_path / "run", *SMALL, "--limit-train", "10")
    with pytest.raises(TrainError, match="10 training images make no full batch of 25"):
        train.run(argv)


def test_missing_files_without_download_fail_with_the_dataset_error(tmp_path, capsys):
    code = train.main(_argv(tmp_path / "empty", tmp_path / "run", "--recipe", "cnn"))
    assert code == 1
    err = capsys.readouterr().err
    assert "\nerror: KMNIST: " in err and "train-images-idx3-ubyte.gz" in err


def test_preact18_trains_through_the_cli(kmnist_root, tmp_path):
    argv = [
        "--model",
        "preact18",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--limit-train",
        "16",
        "--limit-test",
        "16",
    ]
    res = train.run(_argv(kmnist_root, tmp_path / "run", *argv))
    assert res["finished"] and res["config"]["mixup"] == "manifold"
    assert res["parameters"] == 11_171_146 - 2 * 64 * 9
    assert np.isfinite(res["epochs"][0]["train_loss"])


def test_kkanji_gets_its_split_options_and_64x64_images_train(tmp_path, monkeypatch):
    # KKanji lives in kmnist_torch/kkanji.py, imported only for --dataset kkanji; a stand-in
    # records what the trainer asks of it.
    calls = []

    class FakeKKanji:
        def __init__(self, root, **kwargs):
            calls.append((Path(root), kwargs))
            n = 24 if kwargs["split"] == "train" else 9
            g = torch.Generator().manual_seed(n)
            self.data = torch.randint(0, 256, (n, 64, 64), dtype=torch.uint8, generator=g)
            self.targets = torch.arange(n) % 3
            self.classes = ["\u4e00", "\u4e01", "\u4e03"]

    from kmnist_torch.data import registry

    entry = dataclasses.replace(registry.DATASETS["kkanji"], cls=FakeKKanji)
    monkeypatch.setitem(registry.DATASETS, "kkanji", entry)
    argv = _argv(
        tmp_path / "root",
        tmp_path / "run",
        "--dataset",
        "kkanji",
        "--recipe",
        "cnn",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--test-fraction",
        "0.25",
        "--min-per-class",
        "2",
        "--shots",
        "5",
        "--split-seed",
        "7",
    )
    res = train.run(argv)
    expected = {
        "download": False,
        "verify": False,
        "test_fraction": 0.25,
        "min_per_class": 2,
        "shots": 5,
        "seed": 7,
    }
    assert calls == [
        (tmp_path / "root", {"split": "train", **expected}),
        (tmp_path / "root", {"split": "test", **expected}),
    ]
    assert res["image_size"] == 64 and res["num_classes"] == 3 and res["num_test"] == 9
    # Options left out are not passed, so KKanji's own defaults apply.
    calls.clear()
    train.run(argv[:-8] + ["--overwrite"])
    assert calls[0][1] == {"split": "train", "download": False, "verify": False}


def _cxx_compiler() -> str | None:
    return next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)


@pytest.mark.skipif(_cxx_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compile_trains_like_eager(kmnist_root, tmp_path, monkeypatch):
    # --compile runs the same model through inductor: the eager run's numbers, up to float
    # rounding. Inductor draws dropout from its own generator unless told to fall back.
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    compiled_models = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled_models.append(type(model).__name__)
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    argv = [*SMALL, "--epochs", "1", "--limit-train", "100", "--limit-test", "50"]
    eager = train.run(_argv(kmnist_root, tmp_path / "eager", *argv))
    compiled = train.run(_argv(kmnist_root, tmp_path / "compiled", *argv, "--compile"))
    assert compiled_models == ["SimpleCNN"]  # the compiled run alone, and it was compiled
    assert compiled["config"]["compile"] and not eager["config"]["compile"]
    (e,), (c,) = eager["epochs"], compiled["epochs"]
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
    assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-4)
    assert c["test_accuracy"] == e["test_accuracy"]


def test_a_preact18_run_at_chance_early_says_why():
    paper, cnn = RECIPES["paper"], RECIPES["cnn"]
    note = paper.slow_start(20, 10, 0.1)
    assert "at chance after 20 steps" in note and "BatchNorm's running statistics" in note
    assert "--recipe cnn" in note
    assert paper.slow_start(20, 10, 0.4) is None  # learning already
    assert paper.slow_start(5000, 10, 0.1) is None  # past the start: a fault, not a note
    assert cnn.slow_start(20, 10, 0.1) is None  # no BatchNorm: no excuse


def test_the_epoch_line_explains_a_preact18_first_epoch_at_chance(tmp_path):
    """Every test image the same: the model gives them all one class, exactly chance."""
    root = tmp_path / "data"
    write_split(root, "kmnist", "train", *random_split(100, "kmnist", 0), fmt="mnist")
    blank, labels = np.zeros((50, 28, 28), np.uint8), np.arange(50, dtype=np.uint8) % 10
    write_split(root, "kmnist", "test", blank, labels, fmt="mnist")
    argv = ["--root", str(root), "--no-download", "--no-verify", "--device", "cpu",
            "--no-progress", "--epochs", "1", "--batch-size", "50"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    for model, noted in (("preact18", True), ("simple_cnn", False)):
        out = tmp_path / model
        proc = subprocess.run([sys.executable, "-m", "kmnist_torch.train", *argv, "--model", model,
                               "--out", str(out)], capture_output=True, text=True, timeout=120,
                              env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        res = json.loads((out / "results.json").read_text())
        assert res["test_balanced_accuracy"] == 0.1
        assert ("note: test accuracy at chance after 2 steps" in proc.stdout) is noted
