"""The few-shot models and command: Conv-4's shapes, Prototypical Networks against easyfsl
1.5.0 (same episode, same weights, same logits), nearest class mean against a brute-force
reference, the confidence interval by hand, and ``python -m kmnist_torch.fewshot`` end to end
(results, table, a rerun that reuses the models, Ctrl-C), on a generated tree at 16x16."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import numpy as np
import pytest
import torch
from fakedata import kkanji_files, write_kkanji_tree
from test_signals import Command

from kmnist_torch import fewshot
from kmnist_torch.data.kkanji.fewshot import EpisodeSampler, load_fewshot, split_episode
from kmnist_torch.errors import INTERRUPTED
from kmnist_torch.models.conv4 import Conv4
from kmnist_torch.models.protonet import (
    distance_logits,
    flat,
    protonet_logits,
    squared_distances,
)
from kmnist_torch.reporting.fewshot_table import render
from kmnist_torch.settings import Progress
from kmnist_torch.training.fewshot import Setting, episode_accuracies, mean_ci, to_input
from kmnist_torch.training.fewshot_train import Budget, Part, train_baseline, train_protonet

pytestmark = pytest.mark.usefixtures("one_thread")

# 24 classes of 22 images: every class can give 5 support + 15 query images.
N_CLASSES, PER_CLASS = 24, 22
# 8 novel and 6 validation classes: the other 10 are base.
PARTITION = {"n_val": 6, "n_novel": 8}
SMALL = ["--image-size", "16", "--no-verify", "--device", "cpu", "--threads", "1",
         "--n-val", "6", "--n-novel", "8"]  # fmt: skip
QUICK = ["--quick", "--ways", "2", "3", "--shots", "1", "5", *SMALL]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kkanji")
    write_kkanji_tree(root / "KKanji", kkanji_files(N_CLASSES, PER_CLASS, seed=3))
    return root


@pytest.fixture(scope="module")
def loaded(root):
    with pytest.warns(UserWarning):  # verify=False on a subset of the tree says so
        return load_fewshot(root, image_size=16, seed=0, verify=False, **PARTITION)


def test_conv4_gives_64_channels_at_a_sixteenth_of_the_side():
    for size, features in ((16, 64), (28, 64), (32, 256), (64, 1024)):
        model = Conv4(img_size=size)
        assert model.out_features == features
        assert model(torch.zeros(3, 1, size, size)).shape == (3, features)
    convs = [m for m in Conv4().modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 64, (3, 3))] + [
        (64, 64, (3, 3))
    ] * 3
    with pytest.raises(ValueError, match="at least 16x16"):
        Conv4(img_size=8)


def _episode(loaded, way: int, shot: int, query: int, seed: int):
    classes = sorted({int(c) for c in loaded.targets.tolist()})
    sampler = EpisodeSampler(loaded.targets, classes, way, shot, query, 1, seed=seed)
    idx = torch.as_tensor(next(iter(sampler)))
    return split_episode(to_input(loaded.data[idx]), loaded.targets[idx], way, shot, query)


def test_protonet_logits_match_easyfsl(loaded):
    from easyfsl.methods import PrototypicalNetworks

    torch.manual_seed(0)
    backbone = Conv4(img_size=16)
    for m in backbone.modules():  # batch norm statistics of a trained model, not 0 and 1
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    backbone.eval()
    for way, shot in ((5, 1), (5, 5), (3, 2)):
        sx, sy, qx, qy = _episode(loaded, way, shot, 4, seed=way + shot)
        assert sorted(sy.tolist()) == sorted(list(range(way)) * shot) and len(qy) == 4 * way
        theirs = PrototypicalNetworks(backbone)
        with torch.no_grad():
            theirs.process_support_set(sx, sy)
            easy = theirs(qx)
            ours = protonet_logits(backbone, sx, sy, qx, way, squared=False)
            ours_sq = protonet_logits(backbone, sx, sy, qx, way)
        assert ours.shape == easy.shape == (4 * way, way)
        torch.testing.assert_close(ours, easy, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours_sq, -(easy**2), rtol=1e-5, atol=1e-5)
        assert torch.equal(ours_sq.argmax(1), easy.argmax(1))


def _brute_force(support: np.ndarray, sy: np.ndarray, query: np.ndarray, way: int) -> np.ndarray:
    means = [support[sy == c].astype(np.float64).mean(axis=0) for c in range(way)]
    return np.array(
        [int(np.argmin([((q.astype(np.float64) - m) ** 2).sum() for m in means])) for q in query]
    )


def test_nearest_class_mean_on_pixels_matches_brute_force(loaded):
    classes = sorted({int(c) for c in loaded.targets.tolist()})
    setting = Setting(way=5, shot=3, query=4, episodes=6)
    pixels = flat(to_input(loaded.data))
    got = episode_accuracies(pixels, loaded.targets, classes, setting, seed=7)
    sampler = EpisodeSampler(loaded.targets, classes, 5, 3, 4, 6, seed=7)
    expected = []
    for idx in sampler:
        sx, sy, qx, qy = split_episode(pixels[idx], loaded.targets[idx], 5, 3, 4)
        pred = _brute_force(sx.numpy(), sy.numpy(), qx.numpy(), 5)
        expected.append((pred == qy.numpy()).mean())
    np.testing.assert_array_equal(got, expected)
    assert 0 < np.mean(got) < 1  # neither trivial nor hopeless: the comparison means something
    # The identity embedding through protonet_logits predicts the same.
    sx, sy, qx, qy = _episode(loaded, 4, 2, 3, seed=1)
    pred = protonet_logits(flat, sx, sy, qx, 4).argmax(1).numpy()
    ref = _brute_force(flat(sx).numpy(), sy.numpy(), flat(qx).numpy(), 4)
    np.testing.assert_array_equal(pred, ref)


def test_confidence_interval_by_hand():
    mean, ci = mean_ci([0.5, 0.75, 1.0, 0.25])
    # mean 0.625; deviations ±0.125, ±0.375: population std sqrt(0.3125 / 4) = 0.2795085
    assert mean == 0.625
    assert ci == pytest.approx(1.96 * 0.27950849718747373 / 2, abs=1e-12)
    assert ci == pytest.approx(0.27391832724372425, abs=1e-12)
    assert mean_ci([0.4] * 600) == (pytest.approx(0.4), 0.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_distance_logits_squared_and_plain():
    q, p = torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    assert distance_logits(q, p).tolist() == [[0.0, -100.0], [-25.0, -25.0]]
    assert distance_logits(q, p, squared=False).tolist() == [[0.0, -10.0], [-5.0, -5.0]]
    # Evaluation's float64 product form: the same distances, no float32 cancellation.
    assert squared_distances(q, p).tolist() == [[0.0, 100.0], [25.0, 25.0]]
    big_q, big_p = torch.rand(50, 1024) + 100, torch.rand(7, 1024) + 100
    torch.testing.assert_close(squared_distances(big_q, big_p),
                               -distance_logits(big_q.double(), big_p.double()))  # fmt: skip


def test_training_is_seeded(loaded):
    classes = sorted({int(c) for c in loaded.targets.tolist()})
    part = Part(loaded.data, loaded.targets, classes)
    budget = Budget(train_way=3, train_shot=1, train_query=2, train_episodes=3, base_steps=3,
                    base_batch=16, val_way=2, val_shot=1, val_query=2, val_episodes=2,
                    val_checks=2)  # fmt: skip
    for train in (train_protonet, train_baseline):
        runs = [train(part, part, budget, 5, torch.device("cpu"), 16) for _ in range(2)]
        assert [h["step"] for h in runs[0]["history"]] == [2, 3]
        assert runs[0]["history"] == runs[1]["history"]
        for k, v in runs[0]["embedding"].items():
            assert torch.equal(v, runs[1]["embedding"][k]), k


def test_table_rows_are_methods_and_columns_the_four_settings():
    cells = [
        {"method": "ncm", "way": 5, "shot": 1, "query": 15, "episodes": 600,
         "mean": 0.45123, "ci95": 0.00781, "seconds": 1.0},
        {"method": "protonet", "way": 20, "shot": 5, "query": 15, "episodes": 600,
         "mean": 0.9, "ci95": 0.001, "seconds": 1.0},
    ]  # fmt: skip
    table = render({"cells": cells, "partition_sha256": "ab" * 32})
    lines = table.splitlines()
    assert lines[0] == ("| method | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | 20-way 5-shot |")
    assert lines[2] == "| Nearest class mean (pixels) | 45.12 ± 0.78 | — | — | — |"
    assert lines[3] == "| Prototypical Networks (Conv-4) | — | — | — | 90.00 ± 0.10 |"
    assert "600 episodes, 15 queries" in table and "ab" * 32 in table


def test_the_command_end_to_end(root, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = Command(tmp_path, "kmnist_torch.fewshot", "--root", str(root), "--out", str(out),
                  *QUICK)  # fmt: skip
    assert cmd.finish() == 0, cmd.stderr()[-3000:]
    doc = json.loads((out / "results.json").read_text())
    cells = {(c["method"], c["way"], c["shot"]): c for c in doc["cells"]}
    assert set(cells) == {
        (m, w, k) for m in ("ncm", "protonet", "baseline") for w in (2, 3) for k in (1, 5)
    }
    for c in cells.values():
        assert c["episodes"] == 5 and c["query"] == 15 and 0 <= c["mean"] <= 1
        assert c["ci95"] >= 0 and c["seconds"] >= 0
    assert len(doc["partition_sha256"]) == 64
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["device"]
    assert doc["arguments"]["quick"] is True and doc["image_size"] == 16
    assert doc["methods"]["protonet"]["training"]["resumed"] is False
    table = (out / "table.md").read_text()
    assert "| Prototypical Networks (Conv-4) |" in table and "2-way 5-shot" in table
    assert "protonet 3-way 5-shot:" in cmd.stdout()
    assert {p.name for p in out.iterdir()} == {
        ".kmnist_torch.lock",
        "protonet.pt",
        "baseline.pt",
        "results.json",
        "table.md",
    }
    # The same command again: the models are loaded, not trained, and every cell is the same.
    assert fewshot.main(["--root", str(root), "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert printed.count("not trained again") == 2
    again = json.loads((out / "results.json").read_text())
    assert [(c["mean"], c["ci95"]) for c in again["cells"]] == [
        (c["mean"], c["ci95"]) for c in doc["cells"]
    ]
    # Other settings: the model file is not trusted, nor trained over unasked.
    assert fewshot.main(["--root", str(root), "--out", str(out), *QUICK,
                         "--train-episodes", "5"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "protonet.pt was trained with other settings" in err
    assert "train_episodes 4 (now 5)" in err


def test_bad_requests_are_one_line_errors(root, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--root", str(root), "--out", str(out), "--methods", "ncm", *SMALL, "--quick"]
    assert fewshot.main([*args, "--ways", "99"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 99-way 1-shot needs 99 novel classes")
    assert fewshot.main([*args, "--shots", "30"]) == 1
    assert "needs 45 images per class" in capsys.readouterr().err
    assert fewshot.main([*args, "--ways", "2", "--methods", "protonet", "--train-way", "99"]) == 1
    assert "99-way training needs 99 base classes" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    out.mkdir(exist_ok=True)
    (out / "protonet.pt").write_bytes(b"not a model")
    assert fewshot.main([*args, "--methods", "protonet", "--ways", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out / 'protonet.pt'}: not a model file")
    assert "delete it" in err
    assert not (out / "results.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="signals to a PID")
def test_ctrl_c_exits_130_keeps_the_trained_models_and_writes_no_results(
    root, tmp_path, monkeypatch, capsys
):
    # In-process (a subprocess costs a torch import, ~20 s on the loaded 2-core machine): a
    # real SIGINT sent to this process's PID after protonet's first training episode, by then
    # the baseline's model file is written. The end-to-end test covers the subprocess's exit.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    out = tmp_path / "out"
    args = ["--root", str(root), "--out", str(out), "--methods", "baseline", "protonet",
            "--ways", "2", "--shots", "1", "--quick", *SMALL]  # fmt: skip
    update = Progress.update

    def ctrl_c(self, *a, **kw):
        update(self, *a, **kw)
        if self.desc == "protonet training":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "update", ctrl_c)
    assert fewshot.main(args) == INTERRUPTED
    err = capsys.readouterr().err
    assert "SIGINT: interrupted; results not written (trained models are kept)" in err
    assert "Traceback" not in err
    assert {p.name for p in out.iterdir()} == {".kmnist_torch.lock", "baseline.pt"}
    monkeypatch.setattr(Progress, "update", update)
    assert fewshot.main(args) == 0  # the same command: baseline loaded, protonet trained
    assert "baseline: " in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert doc["methods"]["baseline"]["training"]["resumed"] is True
    assert doc["methods"]["protonet"]["training"]["resumed"] is False


def test_the_harness_runs_the_few_shot_benchmark_into_its_table(root, tmp_path, capsys):
    from kmnist_torch import reproduce

    out = tmp_path / "harness"
    argv = ["--datasets", "kkanji", "--rows", "ncm", "--quick", "--root", str(root),
            "--no-verify", "--no-download", "--device", "cpu", "--out", str(out),
            "--image-size", "16", "--fewshot",
            "--fewshot-args", "--methods ncm --ways 2 --shots 1 --n-val 6 --n-novel 8"]  # fmt: skip
    assert reproduce.run(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    own = json.loads((out / "fewshot" / "results.json").read_text())
    # results.json holds the few-shot command's own document, the table its table.
    assert doc["fewshot"]["cells"] == own["cells"] and len(own["cells"]) == 1
    assert own["arguments"]["quick"] is True and own["image_size"] == 16
    table = (out / "table.md").read_text()
    assert "## KKanji few-shot" in table and "| Nearest class mean (pixels) |" in table
    assert (out / "fewshot" / "table.md").read_text() in table
    assert "== KKanji few-shot: python -m kmnist_torch.fewshot --out" in capsys.readouterr().out
    # A typo in --fewshot-args stops the harness before its first cell, not after the last.
    for bad, said in (("--bogus 1", "unrecognized arguments: --bogus 1"),
                      ("--ways '5", "--fewshot-args: No closing quotation")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            reproduce.run([*argv[:-1], bad, "--out", str(tmp_path / "never")])
        assert stop.value.code == 2 and said in capsys.readouterr().err
        assert not (tmp_path / "never").exists()


def test_the_command_draws_the_documented_episodes(loaded):
    # The command draws from each part's own rows; keyed on the dataset's indices, those are
    # the episodes of EpisodeSampler over the whole dataset, as the docs tell users to draw.
    from kmnist_torch.data.kkanji.fewshot import EpisodeSampler as Sampler

    novel = fewshot._parts(loaded)["novel"]
    setting = Setting(3, 5, 15, 4)
    drawn = fewshot.draw_episodes(novel.labels, novel.classes, setting, 7, novel.index)
    documented = Sampler(loaded.targets, list(loaded.partition.novel), 3, 5, 15, 4, seed=7,
                         exclude=~loaded.usable)  # fmt: skip
    assert [novel.index[ep].tolist() for ep in drawn] == list(documented)
    # Keyed on the part's own positions instead, the images differ (the bug this guards).
    unkeyed = fewshot.draw_episodes(novel.labels, novel.classes, setting, 7)
    assert [novel.index[ep].tolist() for ep in unkeyed] != list(documented)
    with pytest.raises(ValueError, match="increasing dataset indices"):
        Sampler([0, 0, 1], [0], 1, 1, 0, 1, ids=[5, 3, 9])
