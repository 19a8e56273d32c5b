"""What a training run does when the faults clusters bring meet it (docs/faults.md, "Training
runs"): a signal delivered twice, a diverging loss, a second trainer on the same folder, a
folder left by a dead run, a broken distributed environment, a rank that never comes.

The lost worker under ``torchrun --max-restarts`` and the scheduler's SIGTERM to a whole job
are in tests/test_distributed.py and tests/test_signals.py (they launch torchrun)."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _argv

from kmnist_torch import train
from kmnist_torch.errors import DivergedError, TrainError
from kmnist_torch.models.modelfile import load_model
from kmnist_torch.training import runtime
from kmnist_torch.training.runlock import LOCK_NAME
from kmnist_torch.training.runtime import CHECKPOINT, MODEL, RESULTS, StopRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

# 5 steps an epoch (100 images in batches of 20), 2 epochs.
TINY = ["--model", "simple_cnn", "--epochs", "2", "--batch-size", "20", "--limit-train", "100",
        "--limit-test", "20", "--mixup", "none"]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_train import _write_kmnist

    root = tmp_path_factory.mktemp("data")
    _write_kmnist(root, 100, 20)
    return root


# ------------------------------------------------------------------------------ preemption


def test_a_signal_delivered_twice_stops_once_and_a_later_ctrl_c_aborts(monkeypatch):
    # Real signals to this process's own PID, as Slurm's scancel and torchrun deliver them.
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)  # the scheduler's own SIGTERM ...
        signal.raise_signal(signal.SIGTERM)  # ... and the launcher's copy of it
        signal.raise_signal(signal.SIGINT)  # a terminal's Ctrl-C to the group, within 1 s
        assert stop.signum == signal.SIGTERM
        monkeypatch.setattr(runtime, "REPEAT_WINDOW", 0.0)  # as if seconds went by
        signal.raise_signal(signal.SIGTERM)  # a later SIGTERM: still the same stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a deliberate second Ctrl-C aborts
    assert runtime.stop_signal() == signal.SIGTERM


# ------------------------------------------------------------------------------ divergence


def test_a_diverging_run_stops_at_its_step_keeping_the_last_good_checkpoint(root, tmp_path):
    # The learning rate jumps by 1e30 halfway (at the start of epoch 2): epoch 1 is good.
    out = tmp_path / "run"
    argv = _argv(root, out, *TINY, "--schedule", "step", "--milestones", "0.5", "--gamma",
                 "1e30", "--lr", "0.05")  # fmt: skip
    with pytest.raises(DivergedError) as err:
        train.run(argv)
    line = str(err.value)
    assert "\n" not in line
    # Step 6, the first at the huge rate, still had a finite loss; its update did not.
    assert "the run diverged: the training loss is nan at step 7 (epoch 2, step 2/5)" in line
    assert "with learning rate 5e+28; the last finite loss: " in line and "at step 6." in line
    assert f"{out / CHECKPOINT} keeps the last good state" in line
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
    assert json.loads((out / RESULTS).read_text())["epochs_done"] == 1
    model = load_model(out / MODEL)  # epoch 1's, whole and finite
    assert all(p.isfinite().all() for p in model.parameters())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # A checkpoint holding non-finite weights is refused, named, before any data is read.
    name = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][name].view(-1)[0] = math.inf
    torch.save(state, out / CHECKPOINT)
    with pytest.raises(TrainError, match=f"holds non-finite weights \\({name}\\)"):
        train.run([*argv, "--resume"])


# ------------------------------------------------------------- two runs, one folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_runs_folder_is_taken_over_and_any_run_file_marks_a_run(root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_NAME).write_text(f"{dead} {socket.gethostname()}\n")
    left = [out / f".{CHECKPOINT}.{dead}.tmp", out / f".{MODEL}.{dead}.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 4096)  # what a kill -9 mid-write leaves
    argv = _argv(root, out, *TINY, "--epochs", "1")
    assert train.run(argv)["finished"]
    err = capsys.readouterr().err
    assert f"the run that used it (pid {dead} on {socket.gethostname()}) is gone" in err
    assert "removed what dead writers left" in err
    assert not any(p.exists() for p in left) and not (out / LOCK_NAME).exists()
    # Without checkpoint.pt the folder still holds a run: model.pt and results.json stay.
    (out / CHECKPOINT).unlink()
    before = {p: p.read_bytes() for p in (out / MODEL, out / RESULTS)}
    with pytest.raises(TrainError, match=r"already holds a run \(model.pt, results.json\)"):
        train.run(argv)
    with pytest.raises(TrainError, match="no checkpoint.pt to continue it from"):
        train.run([*argv, "--resume"])
    assert {p: p.read_bytes() for p in before} == before


# ---------------------------------------------------------------- distributed environment

ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
       "MASTER_PORT": "29555"}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"WORLD_SIZE": "two"}, "$WORLD_SIZE='two' is not allowed: use a whole number >= 1"),
        ({"RANK": "2"}, "$RANK='2' is not allowed: use a whole number >= 0 and below 2"),
        ({"RANK": None}, "$RANK is not set: launch with torchrun"),
        ({"LOCAL_RANK": "-1"}, "$LOCAL_RANK='-1' is not allowed"),
        ({"LOCAL_RANK": "1"}, "$LOCAL_RANK=1 is above $RANK=0"),
        ({"MASTER_ADDR": None}, "$MASTER_ADDR is not set"),
        ({"MASTER_PORT": "70000"}, "$MASTER_PORT='70000' is not allowed"),
        ({"KMNIST_TORCH_RENDEZVOUS_TIMEOUT": "1e300"}, "$KMNIST_TORCH_RENDEZVOUS_TIMEOUT="),
    ],
)
def test_a_broken_distributed_environment_is_one_line(root, tmp_path, monkeypatch, capsys,
                                                      change, message):  # fmt: skip
    for key, value in {**ENV, **change}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    if "RENDEZVOUS" in str(change):
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert train.main(_argv(root, tmp_path / "run", *TINY)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank, missing", [(0, "rank(s) 1 of WORLD_SIZE=2 did not join"),
                                           (1, "rank 0 is not there")])  # fmt: skip
def test_the_rendezvous_gives_up_naming_who_is_missing(
    root, tmp_path, monkeypatch, capsys, rank, missing
):
    env = {**ENV, "RANK": str(rank), "MASTER_PORT": str(_free_port()),
           "KMNIST_TORCH_RENDEZVOUS_TIMEOUT": "2"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert train.main(_argv(root, tmp_path / "run", *TINY)) == 1
    err = capsys.readouterr().err
    assert missing in err and "within 2 s ($KMNIST_TORCH_RENDEZVOUS_TIMEOUT)" in err, err
    assert "Traceback" not in err


def test_a_rank_claimed_twice_is_refused(root, tmp_path, monkeypatch, capsys):
    # Rank 0's store is up and another process has already joined as rank 1.
    import datetime

    import torch.distributed as dist

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=5))  # fmt: skip
    store.add("kmnist_torch/run/0/rank1", 1)
    for key, value in {**ENV, "RANK": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    assert train.main(_argv(root, tmp_path / "run", *TINY)) == 1
    assert "error: $RANK=1 is claimed by two processes" in capsys.readouterr().err


def test_checkpoint_every_takes_steps_or_a_time():
    parse = train.build_parser().parse_args
    assert parse(["--checkpoint-every", "200"]).checkpoint_every == (200, None)
    assert parse(["--checkpoint-every", "10min"]).checkpoint_every == (None, 600.0)
    assert parse(["--checkpoint-every", "90s"]).checkpoint_every == (None, 90.0)


def test_overwrite_removes_the_old_runs_files_before_the_new_run_writes(tmp_path, capsys):
    # A new run that dies before its first checkpoint must not leave the old run's files
    # beside nothing of its own: --overwrite removes them, under the folder's lock.
    from kmnist_torch.training.runtime import RunDir

    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "model.pt", "results.json", "curves.png"):
        (out / name).write_text("the old run's")
    (out / "notes.txt").write_text("the user's")
    run_dir = RunDir(out)
    try:
        assert run_dir.open({"lr": 0.1}, resume=False, overwrite=True, resumable=set()) is None
    finally:
        run_dir.close()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["notes.txt"]
    assert "--overwrite: removed checkpoint.pt, model.pt, results.json" in capsys.readouterr().err
