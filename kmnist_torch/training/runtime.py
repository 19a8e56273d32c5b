"""What a run needs around its training loop: its output folder (checkpoint, results), the
determinism switches, the stop request (Ctrl-C, SIGTERM), device names and timing, the git
commit, and the CPU-time estimate."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .._io import atomic_write, sweep_temporaries, write_json
from ..errors import TrainError
from .runlock import RunLock

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
MODEL = "model.pt"  # kmnist_torch.models.modelfile.MODEL, named here without importing it
CURVES = "curves.png"


# ------------------------------------------------------------------------ run machinery


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels while training when ``enabled``; fast autotuned ones otherwise.
    Global switches are put back afterwards, for callers that train in-process."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if enabled and device.type == "cuda":
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


# What asks a run to stop after its step: Ctrl-C, and what a scheduler sends before it kills.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_last_stop: list[int | None] = [None]


def stop_signal() -> int | None:
    """The signal that asked this process's last training loop to stop (``signal.SIGINT`` or
    ``signal.SIGTERM``), or None when none did: what a command line exits with (128 + it)."""
    return _last_stop[0]


# A second signal this soon after the first is the same request delivered twice: Slurm's
# scancel and systemd signal every process of the job, so a worker gets the SIGTERM itself and
# again from its launcher (torchrun), and a terminal's Ctrl-C reaches torchrun's whole group.
REPEAT_WINDOW = 1.0  # seconds


class StopRequest:
    """The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) asks the loop to stop after
    the current step and checkpoint. A repeat within :data:`REPEAT_WINDOW` seconds, and any
    later SIGTERM, is the same request delivered again and changes nothing (a scheduler kills
    with SIGKILL when its grace period ends; aborting earlier would only lose the step). A
    Ctrl-C pressed again later aborts at once (the last checkpoint stays): it goes to the
    handler that was there before (a command line's exits 128 + the signal, with no
    traceback), or raises ``KeyboardInterrupt``.

    ``signum`` is the signal that asked (None: none yet); ``requested`` says whether one did."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._at = 0.0

    @property
    def requested(self) -> bool:
        """A stop was asked for."""
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        _last_stop[0] = None
        # Signal handlers can only be set from the main thread; elsewhere a signal reaches
        # the main thread anyway.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def ask(self, signum: int) -> None:
        """Record a stop asked for by ``signum`` (here, or on another rank)."""
        if self.signum is None:
            self.signum = _last_stop[0] = signum
            self._at = time.monotonic()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            repeat = time.monotonic() - self._at < REPEAT_WINDOW
            if repeat or signum == signal.SIGTERM:
                return  # the same stop, delivered again
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.ask(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        print(
            f"\n{name}: stopping after this step and writing a checkpoint{again}",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():  # None: set outside Python; default is closest
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def sync(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_name(device: str | torch.device) -> str:
    """A device as results, tables and benchmarks name it.

    Args:
        device: a torch device or its name.

    Returns:
        The GPU's model for CUDA, ``CPU (<arch>, <N> threads)`` for the CPU, else the device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def git_commit() -> dict[str, Any]:
    """The package's git commit and whether its tree was modified, for ``results.json``
    (None for both where the package is not in a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class CpuEstimate:
    """Times the first steps of a CPU run and warns once how long the rest will take."""

    def __init__(self, total_steps: int, batch_size: int, probe_steps: int = 3) -> None:
        self.total_steps, self.batch_size = total_steps, batch_size
        self.want = min(probe_steps, total_steps)
        self.steps, self.seconds, self.done = 0, 0.0, False

    def tick(self, seconds: float, steps_done: int) -> None:
        """One step took ``seconds``; ``steps_done`` steps of the run are done."""
        if self.done:
            return
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        if self.steps == self.want:
            per_step, left = self.seconds / self.steps, self.total_steps - steps_done
            self.done = True
            if left <= 0:  # a run shorter than the probe: nothing left to estimate
                return
            print(
                f"warning: training on the CPU: {per_step:.2f} s per step of {self.batch_size} "
                f"images, so the {left} steps left need about {_duration(per_step * left)} plus "
                "testing. Use a CUDA GPU, or --epochs/--limit-train for a quick look.",
                file=sys.stderr,
                flush=True,
            )
            self.done = True


def old_epochs(state: dict[str, Any]) -> int:
    """The number of epochs the checkpointed run was asked for."""
    epochs = state["config"].get("epochs")
    return epochs if isinstance(epochs, int) else 1 << 30


def first_nonfinite(weights: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor in ``weights`` holding a NaN or an
    infinity, or None when all are finite."""
    for name, t in weights.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all():
            return name
    return None


class RunDir:
    """A run's output folder, each file written atomically: ``checkpoint.pt`` (to resume),
    ``results.json``, ``model.pt`` (weights and metadata: :mod:`kmnist_torch.models.modelfile`) and
    ``curves.png`` (:func:`kmnist_torch.reporting.plots.plot_curves`).

    In a data-parallel run every rank holds one, and only the one with ``main`` (rank 0)
    writes: the writers are called on every rank (the checkpoint's state is gathered from
    every rank), and return without writing elsewhere."""

    def __init__(self, out: str | os.PathLike, main: bool = True) -> None:
        self.out = Path(out)
        self.main = main
        self.checkpoint = self.out / CHECKPOINT
        self.results = self.out / RESULTS
        self.model = self.out / MODEL
        self.curves = self.out / CURVES

    def open(
        self, config: dict[str, Any], resume: bool, overwrite: bool, resumable: set[str]
    ) -> dict[str, Any] | None:
        """Create the folder and take its lock (:class:`~.runlock.RunLock`: one trainer per
        folder); remove temporaries left by dead writers; return the checkpoint to continue
        from, or None to start afresh.

        The folder holds a run when any of ``checkpoint.pt``, ``model.pt`` and
        ``results.json`` is there. An unfinished run (its checkpoint short of the recipe's
        epochs) is continued without ``resume``: the same command line, run again after a
        preemption or by ``torchrun --max-restarts``, goes on where it stopped.

        Raises :class:`TrainError` when a live run holds the folder; when it holds a finished
        run and neither ``resume`` nor ``overwrite`` is set; when it holds run files but no
        checkpoint to continue from (unless ``overwrite``); when the checkpoint is damaged or
        holds non-finite weights; or when its ``config`` differs in a key not in
        ``resumable``."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out)
        self.lock.acquire()
        try:
            return self._open(config, resume, overwrite, resumable)
        except BaseException:
            self.close()
            raise

    def _open(
        self, config: dict[str, Any], resume: bool, overwrite: bool, resumable: set[str]
    ) -> dict[str, Any] | None:
        names = (CHECKPOINT, MODEL, RESULTS, CURVES)
        removed = sweep_temporaries(self.out, names)
        if removed:
            print(
                f"{self.out}: removed what dead writers left: {', '.join(removed)}", file=sys.stderr
            )
        held = [p.name for p in (self.checkpoint, self.model, self.results) if p.exists()]
        if overwrite and held:  # under the lock: no file of the old run is left to be mistaken
            for p in (self.checkpoint, self.model, self.results, self.out / CURVES):
                p.unlink(missing_ok=True)  # for the new run's (a link: the link itself)
            print(f"{self.out}: --overwrite: removed {', '.join(held)}", file=sys.stderr)
            return None
        if not held:
            if resume:
                print(f"no checkpoint in {self.out}; starting from scratch", file=sys.stderr)
            return None
        if not self.checkpoint.exists():
            raise TrainError(
                f"{self.out} already holds a run ({', '.join(held)}) with no {CHECKPOINT} to "
                "continue it from: pass --overwrite to start again (replacing them), or "
                "another --out"
            )
        state = self._load(config, resumable)
        if state["epoch"] >= old_epochs(state) and not resume:
            raise TrainError(
                f"{self.out} already holds a run that finished all its epochs; pass --resume "
                "to rewrite its results, --overwrite to start it again, or another --out"
            )
        if not resume:
            print(
                f"{self.out} holds an unfinished run: continuing it (--overwrite starts again)",
                file=sys.stderr,
            )
        return state

    def _load(self, config: dict[str, Any], resumable: set[str]) -> dict[str, Any]:
        """The checkpoint, checked: readable, finite, written with the same settings."""
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            state["config"], state["model"], state["epoch"]
        except Exception as exc:  # truncated, empty, foreign: it cannot resume anything
            raise TrainError(
                f"{self.checkpoint} is damaged ({type(exc).__name__}) and cannot be "
                "resumed: pass --overwrite to start the run again, or another --out"
            ) from exc
        bad = first_nonfinite(state["model"])
        if bad is not None:
            raise TrainError(
                f"{self.checkpoint} holds non-finite weights ({bad}): it cannot be resumed. "
                "Start again with --overwrite (and a lower --lr), or pick another --out"
            )
        old = state["config"]
        changed = sorted(
            k for k in set(config) | set(old) if k not in resumable and config.get(k) != old.get(k)
        )
        if changed:
            raise TrainError(
                f"{self.checkpoint} was written by a run with other settings: "
                + ", ".join(f"{k}={old.get(k)!r} (now {config.get(k)!r})" for k in changed)
                + ". Resume with the same settings, or pick another --out."
            )
        return state

    def close(self) -> None:
        """Let the folder's lock go (the end of the run, or a failed start)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    def save_checkpoint(
        self,
        config: dict[str, Any],
        state: dict[str, Any],
        model_meta: dict[str, Any] | None = None,
    ) -> None:
        """Write the run's config and state (a ``state_dict()``, taken on every rank since
        it gathers the ranks' random streams), to continue later with ``--resume``; with the
        model's metadata, so that ``load_model`` reads a checkpoint too."""
        payload = {"config": config, "model_meta": model_meta, **state}
        if not self.main:
            return
        atomic_write(self.checkpoint, lambda fh: torch.save(payload, fh))

    def write_results(
        self,
        results: dict[str, Any],
        model: torch.nn.Module | None = None,
        model_meta: dict[str, Any] | None = None,
    ) -> None:
        """Write ``results.json`` and ``curves.png``; with a model and its metadata (at the end
        of an epoch, so the weights match the scores), ``model.pt`` too."""
        if not self.main:
            return
        write_json(self.results, results, indent=2)
        history = results.get("epochs") or []
        if model is not None and model_meta is not None:
            from ..models.modelfile import save_model

            save_model(self.model, model, model_meta, history[-1] if history else None)
        if history:
            from ..reporting.plots import plot_curves

            plot_curves(history, self.curves, title=str(self.out))

    def contents(self) -> str:
        """What the folder holds, for the trainer's last line."""
        parts = [
            (self.model, "model.pt (weights + classes: kmnist_torch.load_model)"),
            (self.results, RESULTS),
            (self.curves, CURVES),
            (self.checkpoint, f"{CHECKPOINT} (to --resume)"),
        ]
        return ", ".join(text for path, text in parts if path.exists())
