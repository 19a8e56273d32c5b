"""Data-parallel training (torchrun, gloo, two CPU processes) and the harness's fan-out over
devices: world size 2 follows world size 1 at the same global batch, rank 0 alone writes, a
stopped run resumes, the sharded pieces (loader, translation, mixup) add up to the one-process
batch, and ``--devices cpu,cpu`` gives the sequential table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import epoch_numbers, wait_for
from test_reproduce import _offline, _place
from test_train import _write_kmnist

from kmnist_torch import reproduce, train
from kmnist_torch.data.loader import TensorLoader
from kmnist_torch.training import distributed, mixup
from kmnist_torch.training.augment import random_translate
from kmnist_torch.training.runtime import CHECKPOINT, RunDir

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

# No BatchNorm, no dropout, no mixup: world size 2 must follow world size 1 exactly (up to the
# order of float sums). Translation stays on: its offsets are drawn for the global batch. The
# 91 test images in batches of 20 end with 11, cut 5 + 6 over the two ranks.
EXACT = [
    "--model",
    "simple_cnn",
    "--no-dropout",
    "--mixup",
    "none",
    "--translate",
    "1",
    "--epochs",
    "2",
    "--batch-size",
    "20",
    "--eval-batch-size",
    "20",
    "--limit-test",
    "91",
    "--deterministic",
]


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--root", str(root), "--no-download", "--no-verify", "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kmnist_torch.train", *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_kmnist(root)
    return root


@pytest.fixture(scope="module")
def two_ranks(root, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One whole run at world size 2 (shared by the tests that compare with it)."""
    out = tmp_path_factory.mktemp("w2") / "run"
    return _torchrun(*_argv(root, out, *EXACT)), out


# --------------------------------------------------------------------------- the pieces


def test_rank_parts_of_each_batch_are_the_one_process_batch():
    data = types_dataset(50)
    whole = [y for _, y in TensorLoader(data, 10, shuffle=True, drop_last=True, seed=3)]
    parts = [
        [
            y
            for _, y in TensorLoader(
                data, 10, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2
            )
        ]  # fmt: skip
        for r in range(2)
    ]
    assert all(len(p) == len(whole) == 5 for p in parts)
    for i, y in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), y)
    # Unsharded test order, uneven last batch: 7 = 3 + 4; every image once.
    test = [torch.cat([y for _, y in TensorLoader(data, 7, shuffle=False, rank=r, world_size=2)])
            for r in range(2)]  # fmt: skip
    assert sorted(torch.cat(test).tolist()) == sorted(data.targets.tolist())
    with pytest.raises(ValueError, match="rank must be in"):
        TensorLoader(data, 10, rank=2, world_size=2)


def types_dataset(n: int) -> types.SimpleNamespace:
    """``n`` tiny 2 x 2 images whose targets are their indices."""
    data = torch.arange(n * 4, dtype=torch.int64).reshape(n, 2, 2).to(torch.uint8)
    return types.SimpleNamespace(data=data, targets=torch.arange(n))


def test_translation_of_a_part_is_that_part_of_the_whole_batch():
    x = torch.rand(8, 1, 12, 12)
    whole = random_translate(x, 2, torch.Generator().manual_seed(4))
    for r in range(2):
        part = random_translate(x[4 * r : 4 * r + 4], 2, torch.Generator().manual_seed(4),
                                shard=(r, 2))  # fmt: skip
        assert torch.equal(part, whole[4 * r : 4 * r + 4])


def test_mixup_draws_alike_on_every_rank_and_pairs_within_the_part():
    plans = [
        mixup.draw(
            "manifold",
            2.0,
            6,
            (0, 1, 2),
            np.random.default_rng(5),
            torch.Generator().manual_seed(6),
            shard=(r, 2),
        )  # fmt: skip
        for r in range(2)
    ]
    assert plans[0].lam == plans[1].lam and plans[0].layer == plans[1].layer
    assert all(sorted(p.perm.tolist()) == list(range(6)) for p in plans)
    assert not torch.equal(plans[0].perm, plans[1].perm)  # each rank its own pairing
    # One process: exactly the draw it always made.
    one = mixup.draw("manifold", 2.0, 6, (0, 1, 2), np.random.default_rng(5),
                     torch.Generator().manual_seed(6))  # fmt: skip
    assert one.lam == plans[0].lam and torch.equal(one.perm, plans[0].perm)


def test_part_bounds_cover_the_batch_once():
    for n in (0, 1, 5, 20):
        bounds = [distributed.part(10, 10 + n, r, 3) for r in range(3)]
        assert bounds[0][0] == 10 and bounds[-1][1] == 10 + n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_only_the_main_run_dir_writes(tmp_path):
    quiet = RunDir(tmp_path / "run", main=False)
    quiet.save_checkpoint({}, {"epoch": 0})
    quiet.write_results({"a": 1})
    assert not (tmp_path / "run").exists()


def test_global_batch_must_split_over_the_ranks(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        distributed, "setup", lambda device: (distributed.Dist(0, 2), torch.device("cpu"))
    )
    with pytest.raises(SystemExit):
        train.run(_argv(root, tmp_path / "run", "--recipe", "cnn", "--batch-size", "25"))
    assert "--batch-size 25 is the global batch: it must split evenly over the 2" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        train.run(_argv(root, tmp_path / "run", "--model", "preact18", "--sync-bn"))
    assert "--sync-bn needs CUDA" in capsys.readouterr().err


# ------------------------------------------------------------------------ torchrun runs


def test_world_size_2_writes_once_and_follows_world_size_1(two_ranks, root, tmp_path):
    proc, out = two_ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 alone writes the folder and prints the epoch lines.
    names = ["checkpoint.pt", "curves.png", "model.pt", "results.json"]
    assert sorted(p.name for p in out.iterdir()) == names  # the run's lock went with it
    assert proc.stdout.count("run folder ") == 1
    assert [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("epoch ")] == [
        "1/2",
        "2/2",
    ]
    two = json.loads((out / "results.json").read_text())
    assert two["finished"] and two["world_size"] == 2 and two["config"]["world_size"] == 2
    assert two["num_test"] == 91 and two["images_per_second"] > 0
    one = train.run(_argv(root, tmp_path / "one", *EXACT))
    assert one["world_size"] == 1
    assert len(epoch_numbers(one)) == len(epoch_numbers(two)) == 2
    for a, b in zip(epoch_numbers(one), epoch_numbers(two)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_world_size_2_stopped_and_resumed_finishes_like_the_whole_run(two_ranks, root, tmp_path):
    proc, whole = two_ranks
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    first = _torchrun(*_argv(root, out, *EXACT, "--stop-after", "1"))
    assert first.returncode == 0  # a stop asked for is a success; results say unfinished
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["interrupted"] and not stopped["finished"] and len(stopped["epochs"]) == 1
    rest = _torchrun(*_argv(root, out, *EXACT))  # the same command line continues it
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "holds an unfinished run: continuing it" in rest.stderr
    assert "resuming" in rest.stderr and rest.stderr.count("resuming") == 1
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and epoch_numbers(res) == epoch_numbers(
        json.loads((whole / "results.json").read_text())
    )


def test_ctrl_c_under_torchrun_stops_every_rank_with_one_checkpoint(root, tmp_path):
    # torchrun forwards the SIGINT to both ranks; they agree on the step to stop after, and
    # rank 0 writes the checkpoint with both ranks' random streams (no deadlock, no kill).
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kmnist_torch.train", *_argv(root, out, *EXACT, "--epochs", "500")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/500"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] and not res["finished"] and 1 <= res["epochs_done"] < 500, err
    state = torch.load(out / CHECKPOINT, weights_only=True)
    ranks = state["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def _rank_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers a torchrun process started, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher
            ):
                env = dict(
                    v.split("=", 1)
                    for v in (entry / "environ").read_bytes().decode().split("\0")
                    if "=" in v
                )
                found[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_lost_worker_restarts_from_the_checkpoint_and_ends_like_the_whole_run(
    two_ranks, root, tmp_path
):
    # kill -9 rank 1 once a checkpoint inside epoch 1 exists (every 2 of its 10 steps):
    # torchrun restarts the group, which continues from that checkpoint by itself.
    proc, whole = two_ranks
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "kmnist_torch.train",
           *_argv(root, out, *EXACT, "--checkpoint-every", "2")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    err = tmp_path / "err"
    with open(err, "w") as fh:
        run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env=env)
    try:
        assert wait_for(lambda: (out / CHECKPOINT).exists() or run.poll() is not None, 200)
        ranks = _rank_pids(run.pid)
        os.kill(ranks[1], signal.SIGKILL)
        assert run.wait(300) == 0, err.read_text()[-3000:]
    finally:
        run.kill()
    text = err.read_text()
    assert "holds an unfinished run: continuing it" in text and "resuming" in text
    assert "rank 0 lost contact with another rank" in text
    assert "[rank0]: Traceback" not in text and "kmnist_torch/train.py" not in text
    res = json.loads((out / "results.json").read_text())
    ref = json.loads((whole / "results.json").read_text())
    assert res["finished"] and len(res["epochs"]) == 2
    for a, b in zip(epoch_numbers(ref), epoch_numbers(res)):
        for key in a:  # the training loss is summed in another order: equal to rounding
            assert b[key] == (a[key] if key != "train_loss" else pytest.approx(a[key], 1e-12))


# ------------------------------------------------------------------------ harness fan-out


def test_fan_out_over_devices_gives_the_sequential_table(tmp_path, monkeypatch):
    _offline(monkeypatch)
    _place(tmp_path / "root")
    common = ["--datasets", "kmnist", "--rows", "knn", "cnn", "--quick", "--no-download",
              "--no-verify", "--root", str(tmp_path / "root")]  # fmt: skip
    assert reproduce.main([*common, "--out", str(tmp_path / "seq"), "--device", "cpu"]) == 0
    assert reproduce.main([*common, "--out", str(tmp_path / "fan"), "--devices", "cpu,cpu"]) == 0
    seq, fan = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("seq", "fan"))
    assert fan["devices"] == ["cpu", "cpu"]
    keys = ("row", "dataset", "ours", "error", "num_train", "num_test", "epochs_done")
    assert [{k: c.get(k) for k in keys} for c in fan["cells"]] == [
        {k: c.get(k) for k in keys} for c in seq["cells"]
    ]
    assert all(c["error"] is None for c in fan["cells"])


def test_devices_are_parsed_and_exclude_device(capsys):
    assert reproduce.parse_devices("0, 1,cpu") == ["cuda:0", "cuda:1", "cpu"]
    with pytest.raises(SystemExit):
        reproduce.main(["--devices", "0", "--device", "cpu"])
    assert "--device and --devices exclude each other" in capsys.readouterr().err
