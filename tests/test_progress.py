"""Progress a user sees without a terminal: plain lines on stderr (step/total, images/s, time
left), at least every $KMNIST_TORCH_PROGRESS_EVERY seconds, from the training epoch, the test
pass, the harness and the KKanji cache build; tqdm's bar on a terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from fakedata import kkanji_files, random_split, write_kkanji_tree

from kmnist_torch.data.resplit import write_split
from kmnist_torch.settings import Progress, progress_every

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMNIST_TORCH_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", KMNIST_TORCH_OFFICIAL="0", **extra)
    return env


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------- the helper itself


def test_a_line_each_time_the_interval_has_passed_never_in_between():
    clock, out = _Clock(), io.StringIO()
    shown = Progress("epoch 1/3", 10, "step", every=10, stream=out, clock=clock)
    for _ in range(3):  # 3 steps in 9 s: no line yet
        clock.now += 3
        shown.update(1, 100)
    assert out.getvalue() == ""
    clock.now += 3  # 12 s since the start: a line
    shown.update(1, 100, note="loss 0.5000")
    clock.now += 4
    shown.update(1, 100)  # 4 s since the line: none
    clock.now += 6
    shown.update(1, 100)  # 10 s since the line: the second
    lines = out.getvalue().splitlines()
    assert lines == [
        "kmnist_torch: epoch 1/3: 4/10 steps (40%), 33 images/s, about 0:18 left, loss 0.5000",
        "kmnist_torch: epoch 1/3: 6/10 steps (60%), 27 images/s, about 0:15 left, loss 0.5000",
    ]
    assert "\r" not in out.getvalue()


def test_a_resumed_epoch_counts_from_where_it_stands_and_off_means_nothing():
    clock, out = _Clock(), io.StringIO()
    shown = Progress("epoch 2/2", 8, "batch", initial=6, every=0, stream=out, clock=clock)
    clock.now += 2
    shown.update(1, 50)
    assert out.getvalue() == (
        "kmnist_torch: epoch 2/2: 7/8 batches (87%), 25 images/s, about 0:02 left\n"
    )
    silent = io.StringIO()
    off = Progress("epoch 1/1", 8, enabled=False, every=0, stream=silent, clock=clock)
    off.update(8)
    assert silent.getvalue() == ""


@pytest.mark.parametrize("value", ["-1", "3601", "inf", "nan", "ten"])
def test_the_interval_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv("KMNIST_TORCH_PROGRESS_EVERY", value)
    with pytest.raises(ValueError, match=r"KMNIST_TORCH_PROGRESS_EVERY.*>= 0 and <= 3600"):
        progress_every()


def test_the_interval_setting_is_read(monkeypatch):
    monkeypatch.delenv("KMNIST_TORCH_PROGRESS_EVERY", raising=False)
    assert progress_every() == 10
    monkeypatch.setenv("KMNIST_TORCH_PROGRESS_EVERY", "2.5")
    assert progress_every() == 2.5


# -------------------------------------------------------- real commands, stderr in a file


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "data"
    write_split(root, "kmnist", "train", *random_split(200, "kmnist", 0), fmt="mnist")
    write_split(root, "kmnist", "test", *random_split(60, "kmnist", 1), fmt="mnist")
    return root


def _train_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kmnist_torch.train", "--root", str(root), "--no-download",
            "--no-verify", "--device", "cpu", "--model", "simple_cnn", "--epochs", "2",
            "--batch-size", "40", "--eval-batch-size", "20", "--out", str(out), *extra]  # fmt: skip


def _steps(text: str, desc: str, unit: str) -> list[tuple[int, int]]:
    """(done, total) of each plain progress line of ``desc``."""
    count = r"([\d,]+)/([\d,]+)"
    pattern = (
        rf"^kmnist_torch: {desc}: {count} {unit} \(\d+%\), [\d,]+ images/s, about \d+:\d\d left"
    )
    found = re.findall(pattern, text, re.M)
    return [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in found]


def test_training_without_a_terminal_prints_plain_lines(root, tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as fh:
        env = _env(KMNIST_TORCH_PROGRESS_EVERY="0")
        subprocess.run(_train_argv(root, tmp_path / "run"), stderr=fh, check=True, timeout=120,
                       stdout=subprocess.DEVNULL, env=env)  # fmt: skip
    text = err.read_text()
    assert "\r" not in text
    for epoch in (1, 2):  # with an interval of 0, a line after every step
        assert _steps(text, f"epoch {epoch}/2", "steps") == [(k, 5) for k in range(1, 6)]
        assert _steps(text, f"testing epoch {epoch}/2", "batches") == [(k, 3) for k in (1, 2, 3)]


def test_no_progress_and_a_long_interval_print_no_lines(root, tmp_path):
    for extra, every in ((["--no-progress"], "0"), ([], "3600")):
        err = tmp_path / "stderr.txt"
        with open(err, "w") as fh:
            subprocess.run(_train_argv(root, tmp_path / "run", "--overwrite", *extra), stderr=fh,
                           stdout=subprocess.DEVNULL, env=_env(KMNIST_TORCH_PROGRESS_EVERY=every),
                           check=True, timeout=120)  # fmt: skip
        assert "kmnist_torch: epoch" not in err.read_text()


def test_a_bad_interval_is_an_error_naming_the_variable(root, tmp_path):
    proc = subprocess.run(_train_argv(root, tmp_path / "run"), capture_output=True, text=True,
                          env=_env(KMNIST_TORCH_PROGRESS_EVERY="soon"), timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "KMNIST_TORCH_PROGRESS_EVERY='soon' is not allowed" in proc.stderr


def test_on_a_terminal_tqdm_draws_the_bar(root, tmp_path):
    master, slave = pty.openpty()
    # A terminal 100 columns wide (a pty starts at 0 x 0, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(_train_argv(root, tmp_path / "run"), stderr=slave,
                          stdout=subprocess.DEVNULL, env=_env(KMNIST_TORCH_PROGRESS_EVERY="0"),
                          timeout=120)  # fmt: skip
    os.close(slave)
    reader.join(10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "\r" in text and re.search(r"epoch 1/2: +\d+%\|.*\| \d/5 \[", text)
    assert "kmnist_torch: epoch" not in text  # a bar, not the plain lines


def test_the_harness_without_a_terminal_prints_plain_lines(root, tmp_path):
    err = tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "kmnist_torch.reproduce", "--datasets", "kmnist", "--rows",
            "cnn", "--quick", "--no-download", "--no-verify", "--root", str(root), "--out",
            str(tmp_path / "out")]  # fmt: skip
    with open(err, "w") as fh:
        subprocess.run(argv, stderr=fh, stdout=subprocess.DEVNULL, check=True, timeout=300,
                       env=_env(KMNIST_TORCH_PROGRESS_EVERY="0"))  # fmt: skip
    text = err.read_text()
    steps = _steps(text, "epoch 1/1", "steps")
    assert steps and steps[-1][0] == steps[-1][1] and len(steps) == steps[-1][1]
    assert _steps(text, "testing epoch 1/1", "batches")


def test_the_kkanji_cache_build_without_a_terminal_prints_plain_lines(tmp_path):
    write_kkanji_tree(tmp_path / "KKanji", kkanji_files(3, 400, seed=5))  # 1,200 images
    err = tmp_path / "stderr.txt"
    code = (
        "import sys; from kmnist_torch import KKanji; "
        "KKanji(sys.argv[1], split='all', download=False, verify=False)"
    )
    with open(err, "w") as fh:
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], stderr=fh, check=True,
                       env=_env(KMNIST_TORCH_PROGRESS_EVERY="0"), timeout=120)  # fmt: skip
    text = err.read_text()
    # 512 images a chunk: a line after each.
    steps = _steps(text, "KKanji: decoding PNGs into the cache", "images")
    assert steps == [(512, 1200), (1024, 1200), (1200, 1200)]
    assert "\r" not in text
