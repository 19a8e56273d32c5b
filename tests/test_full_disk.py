"""A full disk, a failed write and a stop signal where files are being written: the trainer's
checkpoint, model.pt and results.json, the harness's table, the KKanji cache. The disk is real:
a small tmpfs mounted for the test (root on Linux), else a file-size limit (``ulimit -f``, so a
write fails with EFBIG) on the command's process. Also: a signal while a command line is still
importing torch, and a ``--devices`` worker that dies under its item.

Light at import (no torch, not even through conftest): the fan-out test's worker processes
import this module."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_script_json

from kmnist_torch import _fanout
from kmnist_torch.errors import INTERRUPTED, WriteError

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="tmpfs, /proc, process groups"),
    pytest.mark.usefixtures("one_thread"),
]


# ------------------------------------------------------------------------- a disk that fills


class Disk:
    """A folder on a disk that can be filled: a tmpfs of ``size`` bytes mounted there when
    this process may mount, else (``limited``) the commands run here get a file-size limit."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        self.limited = subprocess.run(mount, capture_output=True).returncode != 0
        self.limit: int | None = None
        self.filler = path / "filler"

    def fill(self, leave: int) -> None:
        """Leave ``leave`` bytes free (tmpfs: a filler file takes the rest; a file-size limit:
        no file written from now on grows past ``leave``)."""
        if self.limited:
            self.limit = leave
            return
        self.free()
        st = os.statvfs(self.path)
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        self.limit = None

    def preexec(self):
        """For ``subprocess.Popen``: the file-size limit, if that is how this disk fills
        (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
        if self.limit is None:
            return None
        limit = self.limit
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def close(self) -> None:
        if not self.limited:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path / "disk", 40 << 20)
    yield d
    d.close()


def _command(tmp: Path, module: str, *args: str, disk: Disk | None = None):
    """``python -m module args`` as a user runs it: (exit status, stderr). Its stderr is a pipe,
    not a file: a file-size limit of 0 would hold a file too."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KMNIST_TORCH_OFFICIAL": "0",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=600,
                          preexec_fn=disk.preexec() if disk else None)  # fmt: skip
    return proc.returncode, proc.stderr


def _run_on(disk: Disk, tmp: Path, capfd, module: str, *args: str) -> tuple[int, str]:
    """A command line on a disk that was filled: in this process on a tmpfs (a full disk is a
    full disk to any process), as a subprocess under a file-size limit (which would hold this
    process's own files too)."""
    if disk.limited:
        return _command(tmp, module, *args, disk=disk)
    import importlib

    capfd.readouterr()
    rc = importlib.import_module(
        module.replace("kmnist_torch", "kmnist_torch.cli", module == "kmnist_torch")
    ).main(list(args))
    return rc, capfd.readouterr().err


def _one_error_line(err: str, *names: str) -> str:
    """The single ``error:`` line of ``err`` (no traceback), which names each of ``names``."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    assert "disk is full (ENOSPC" in lines[0] or "file-size limit (EFBIG" in lines[0], lines[0]
    return lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_reproduce import _write_root

    root = tmp_path_factory.mktemp("data")
    _write_root(root)  # 400 train / 120 test fixture images in KMNIST's official files
    return root


# ------------------------------------------------------------------------------ the trainer

# 5 steps an epoch, 2 epochs; the checkpoint is about 14 MB (simple_cnn and its optimiser).
TRAIN = ["--model", "simple_cnn", "--epochs", "2", "--batch-size", "20", "--limit-train", "100",
         "--limit-test", "40", "--no-download", "--no-verify", "--device", "cpu",
         "--no-progress"]  # fmt: skip


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_continues(
    root, disk, tmp_path, capfd
):
    import torch

    from kmnist_torch import train
    from kmnist_torch.models.modelfile import load_model, save_model
    from kmnist_torch.training.runtime import RunDir

    out = disk.path / "run"
    argv = [*TRAIN, "--root", str(root), "--out", str(out)]
    assert (
        train.main([*argv, "--stop-after", "1"]) == 0
    )  # epoch 1, checkpointed (asked for: exit 0)
    files = {n: _sha(out / n) for n in ("checkpoint.pt", "model.pt", "results.json")}
    # The disk fills: half a checkpoint's room left. Epoch 2 trains, its checkpoint fails.
    disk.fill((out / "checkpoint.pt").stat().st_size // 2)
    rc, err = _command(tmp_path, "kmnist_torch.train", *argv, "--resume", disk=disk)
    assert rc == WriteError.exit_code == 74, err[-3000:]
    line = _one_error_line(err, str(out / "checkpoint.pt"))
    assert "the previous checkpoint.pt is kept" in line
    assert {n: _sha(out / n) for n in files} == files  # every file as it was
    assert _temporaries(out) == []
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    model = load_model(out)
    if not disk.limited:  # model.pt and results.json themselves on a disk with no room left
        disk.fill(0)
        with pytest.raises(WriteError, match="model.pt: the disk is full"):
            save_model(out / "model.pt", model, model.meta)
        with pytest.raises(WriteError, match="results.json: the disk is full"):
            RunDir(out).write_results(json.loads((out / "results.json").read_text()))
        assert {n: _sha(out / n) for n in files} == files and _temporaries(out) == []
    # Space freed: the same command with --resume goes on from the checkpoint and finishes.
    disk.free()
    assert train.main([*argv, "--resume"]) == 0
    assert "resuming" in capfd.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["epochs_done"] == 2
    load_model(out)


# ------------------------------------------------------------------------------ the harness

HARNESS = ["--datasets", "kmnist", "--rows", "knn", "--no-download", "--no-verify", "--device",
           "cpu"]  # fmt: skip


def test_a_full_disk_stops_the_harness_with_its_table_kept(root, disk, tmp_path, capfd):
    from kmnist_torch import reproduce

    out = disk.path / "out"
    argv = [*HARNESS, "--root", str(root), "--out", str(out)]
    assert reproduce.main([*argv, "--limit-train", "300"]) == 0
    table, results = _sha(out / "table.md"), _sha(out / "results.json")
    disk.fill(0)
    # Other settings: the cell runs again, and its table cannot be written.
    rc, err = _run_on(
        disk, tmp_path, capfd, "kmnist_torch.reproduce", *argv, "--limit-train", "200"
    )
    assert rc == 74
    _one_error_line(err, str(out / "table.md"))
    assert (_sha(out / "table.md"), _sha(out / "results.json")) == (table, results)
    assert _temporaries(out) == []
    disk.free()
    assert reproduce.main([*argv, "--limit-train", "200"]) == 0
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    assert cell["error"] is None and cell["num_train"] == 200


# ------------------------------------------------------------------------------- a download


def test_a_full_disk_stops_a_download_at_once_and_the_next_one_resumes(disk, http_server):
    from conftest import make_target

    from kmnist_torch.download.fetch import download
    from kmnist_torch.settings import FetchConfig

    if disk.limited:
        pytest.skip("in this process: needs a tmpfs (mount is not allowed here)")
    data = os.urandom(3 << 20)
    http_server.add("/f", data)
    target = make_target(disk.path, [http_server.url + "/f"], data)
    disk.fill(1 << 20)
    with pytest.raises(WriteError, match=r"file\.bin\.part: the disk is full \(ENOSPC\)"):
        download(target, FetchConfig(retries=3, backoff=0))
    assert len(http_server.hits("/f")) == 1  # not retried, no mirror blamed: the disk is full
    assert not target.dest.exists()
    disk.free()
    download(target, FetchConfig(retries=0))  # resumes the partial
    assert target.dest.read_bytes() == data
    assert http_server.hits("/f")[-1].get("Range", "").startswith("bytes=")


# ------------------------------------------------------------------------- the KKanji cache

MONTAGE = ["montage", "kkanji", "--no-verify", "--max-classes", "2", "--per-class", "2"]


def _cache(root: Path) -> list[str]:
    folder = root / "KKanji" / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_full_disk_fails_the_kkanji_cache_at_once_and_leaves_nothing(disk, tmp_path, capfd):
    from fakedata import kkanji_files, write_kkanji_tree

    from kmnist_torch.data.kkanji.dataset import KKanji

    write_kkanji_tree(disk.path / "KKanji", kkanji_files(3, 20))  # 60 images: a 246 KB cache
    argv = [*MONTAGE, "--root", str(disk.path), "--out", str(tmp_path / "m.png")]
    disk.fill(100_000)
    rc, err = _run_on(disk, tmp_path, capfd, "kmnist_torch", *argv)
    assert rc == 74
    line = _one_error_line(err, str(disk.path / "KKanji" / "cache" / "images-"))
    assert "0.2 MB needed; nothing was written" in line  # before decoding: no SIGBUS
    assert not [n for n in _cache(disk.path) if n.endswith((".npy", ".json", ".tmp"))]
    if not disk.limited:  # room for the images but not their index: no images left either
        disk.fill(61 * 4096)  # the .npy's 61 pages
        rc, err = _run_on(disk, tmp_path, capfd, "kmnist_torch", *argv)
        assert rc == 74
        _one_error_line(err, str(disk.path / "KKanji" / "cache" / "index-"))
        assert not [n for n in _cache(disk.path) if n.endswith((".npy", ".json", ".tmp"))]
    disk.free()
    ds = KKanji(disk.path, split="all", verify=False)
    assert len(ds) == 60
    assert {n.split("-")[0] for n in _cache(disk.path)} >= {"images", "index"}


def test_ctrl_c_while_the_kkanji_cache_decodes_leaves_no_cache(tmp_path):
    from conftest import wait_for
    from fakedata import kkanji_files, write_kkanji_tree

    from kmnist_torch.data.kkanji.layout import POOL_MIN_IMAGES

    # Enough images for the decoding pool (its workers are what printed tracebacks).
    distinct = [data for _, _, data in kkanji_files(2, 4)]
    files = [(f"U+{0x4E00 + i % 8:04X}", f"{i:016x}.png", distinct[i % 8])
             for i in range(POOL_MIN_IMAGES + 512)]  # fmt: skip
    write_kkanji_tree(tmp_path / "KKanji", files)
    err = tmp_path / "montage.err"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KMNIST_TORCH_DECODE_WORKERS": "2",
           "KMNIST_TORCH_PROGRESS_EVERY": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
    with open(err, "w") as fh:  # a terminal's job: its own process group, Ctrl-C to all of it
        proc = subprocess.Popen([sys.executable, "-m", "kmnist_torch", *MONTAGE, "--root",
                                 str(tmp_path), "--out", str(tmp_path / "m.png")],
                                stderr=fh, stdout=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        workers = _hold_mid_decode(proc, tmp_path, err)  # as Ctrl-Z does, then Ctrl-C to the group
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(120) == INTERRUPTED
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().endswith("SIGINT: interrupted")
    assert _cache(tmp_path) == []  # nothing half-written to trust later: the next use builds
    assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 10)


def _hold_mid_decode(proc: subprocess.Popen, root: Path, err: Path) -> set[int]:
    """Stop the command's process group (SIGSTOP) while it decodes into the cache: both
    workers up, a chunk done, the temporary there and no index yet. The workers' pids."""
    end = time.monotonic() + 300
    while time.monotonic() < end:
        assert proc.poll() is None, "the command ended first"
        if "decoding PNGs" in err.read_text():
            os.killpg(proc.pid, signal.SIGSTOP)
            workers, names = _children(proc.pid), _cache(root)
            tmp = any(n.endswith(".tmp") for n in names)
            if len(workers) == 2 and tmp and ".json" not in str(names):
                return workers
            os.killpg(proc.pid, signal.SIGCONT)  # the pool is not up yet: a moment more
        time.sleep(0.002)
    raise AssertionError("the cache build was never seen under way")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


# ------------------------------------------------------------------- a command line starting


def _status_bit(pid: int, field: str, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith(field + ":"))
    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))


def _as_a_shell_starts_it() -> None:
    """A foreground command's signals as an interactive shell leaves them: Ctrl-C and SIGTERM
    at their defaults and not blocked, whatever the test process inherited or set."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def test_ctrl_c_while_a_command_imports_torch_is_one_line_and_130(tmp_path):
    from conftest import wait_for

    err = tmp_path / "err"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kmnist_torch.predict", "--help"],
                                stdout=subprocess.PIPE, stderr=fh, env=env,
                                start_new_session=True,
                                preexec_fn=_as_a_shell_starts_it)  # fmt: skip
    try:
        # Still starting: the package has held Ctrl-C back, the command has no handler yet.
        held = wait_for(lambda: _status_bit(proc.pid, "SigBlk", signal.SIGINT), 60)
        assert held, Path(f"/proc/{proc.pid}/status").read_text()
        assert not _status_bit(proc.pid, "SigCgt", signal.SIGTERM)  # run_main catches it
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == INTERRUPTED
    assert err.read_text() == "SIGINT: interrupted\n"  # one line, no traceback
    assert out == b""  # the command never ran


# ------------------------------------------------------------------ --devices: a dead worker


def _die_on_crash(item: str, device: str) -> tuple[str, int]:
    """A fan-out item: "crash" kills its worker process (as the out-of-memory killer would)."""
    if item == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return item, os.getpid()


_CRASH_SCRIPT = """
import json, os, signal, sys
from kmnist_torch import _fanout

def die_on_crash(item, device):
    if item == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return item, os.getpid()

if __name__ == "__main__":
    items, done = ["a", "crash", "b", "c"], {}
    _fanout.spread(items, ["cpu"], die_on_crash, lambda i, r, d: done.__setitem__(items[i], r))
    print(json.dumps({k: type(v).__name__ if isinstance(v, BaseException) else v
                      for k, v in done.items()}))
"""


def test_a_worker_that_dies_fails_only_its_own_item(tmp_path):
    # In a process of its own, as the harness is: a worker is SIGKILLed on purpose here, and
    # the test process (a pytest-xdist worker) must not share anything with it.
    done = run_script_json(tmp_path, "crash.py", _CRASH_SCRIPT)
    assert done.pop("crash") == "BrokenProcessPool"
    assert {k: v[0] for k, v in done.items()} == {"a": "a", "b": "b", "c": "c"}
    assert done["a"][1] != done["b"][1] == done["c"][1]  # a fresh worker after the crash


def test_a_failure_to_record_an_item_starts_no_other():
    seen: list[str] = []

    def done(i: int, result: object, device: str) -> None:
        seen.append(result[0])
        raise WriteError("cannot write table.md: the disk is full (ENOSPC)")

    with pytest.raises(WriteError, match="table.md"):
        _fanout.spread(["a", "b", "c"], ["cpu"], _die_on_crash, done)
    assert seen == ["a"]  # raised once the item under way was recorded; b and c never began
