"""A run's record of itself: the ``results.json`` document (:func:`summarize`), an epoch's
line in its history (:func:`epoch_record`), and :class:`Saver`, which writes the checkpoint and
the results at each point of :func:`kmnist_torch.training.engine.fit`.

It takes the engine's ``Job`` and ``RunState`` without importing them (the engine imports
this module)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from ..errors import DivergedError
from .optim import lr_factor
from .runtime import RunDir, device_name, first_nonfinite, git_commit


def summarize(
    info: dict[str, Any], job: Any, state: Any, finished: bool, interrupted: bool
) -> dict[str, Any]:
    """The results of a run as it stands (the ``results.json`` document).

    Args:
        info: what was run (config, dataset, sizes ...), copied in first.
        job: the model (for its parameter count) and device.
        state: the history and time spent.
        finished: every epoch is done.
        interrupted: the run stopped early (Ctrl-C or ``--stop-after``).

    Returns:
        ``info`` plus the per-epoch history, the last and best scores, images/s, wall and
        device seconds, device, torch version and git commit.
    """
    history, spent = state.history, state.spent
    last = history[-1] if history else {}
    best = max(history, key=lambda e: e["test_accuracy"], default={})
    best_bal = max(history, key=lambda e: e["test_balanced_accuracy"], default={})
    return {
        **info,
        "parameters": sum(p.numel() for p in job.model.parameters()),
        "epochs": history,
        "epochs_done": len(history),
        "test_accuracy": last.get("test_accuracy"),
        "test_balanced_accuracy": last.get("test_balanced_accuracy"),
        "test_loss": last.get("test_loss"),
        "best_test_accuracy": best.get("test_accuracy"),
        "best_test_accuracy_epoch": best.get("epoch"),
        "best_test_balanced_accuracy": best_bal.get("test_balanced_accuracy"),
        "best_test_balanced_accuracy_epoch": best_bal.get("epoch"),
        "images_per_second": spent["train_images"] / max(spent["train_seconds"], 1e-9),
        "wall_seconds": spent["wall_seconds"],
        "device_seconds": spent["device_seconds"],
        "device": device_name(job.device),
        "device_type": job.device.type,
        "world_size": job.dist.world_size,
        "torch_version": torch.__version__,
        **git_commit(),
        "finished": finished,
        "interrupted": interrupted,
    }


def epoch_record(job: Any, state: Any, metrics: dict[str, float], test_s: float) -> dict:
    r, steps, carry = job.recipe, job.steps_per_epoch, state.carry
    return {
        "epoch": state.epoch + 1,
        "lr": r.lr * lr_factor((state.epoch + 1) * steps - 1, steps, r),
        "train_loss": carry["loss_sum"] / max(carry["seen"], 1),
        "train_objective": r.objective(),
        **metrics,
        "images_per_second": carry["seen"] / max(carry["train_seconds"], 1e-9),
        "train_seconds": carry["train_seconds"],
        "test_seconds": test_s,
    }


class Cadence:
    """When a checkpoint is due inside an epoch (``--checkpoint-every``): every ``steps`` steps
    of the run, or once ``seconds`` have passed since the last checkpoint; never when neither
    is set. Every rank asks at every step and gets the same answer (the time is agreed on)."""

    def __init__(self, steps: int | None, seconds: float | None, dist: Any) -> None:
        self.steps, self.seconds, self.dist = steps, seconds, dist
        self.mark = time.monotonic()

    def due(self, done: int) -> bool:
        """Whether to checkpoint now, ``done`` steps into the run."""
        if self.steps:
            return done % self.steps == 0
        if self.seconds:
            return bool(self.dist.max_int(int(time.monotonic() - self.mark >= self.seconds)))
        return False


def kept(run_dir: RunDir) -> str:
    """What a diverged run leaves to fall back on, in words."""
    if run_dir.checkpoint.exists():
        return f"{run_dir.checkpoint} keeps the last good state"
    return f"no checkpoint was written in {run_dir.out} yet"


class FiniteGuard:
    """Stops a run whose training loss is no longer finite, at that step: :meth:`see` each
    step's loss; :meth:`check` (each step on a CPU, every 25 on a GPU, where reading the loss
    makes the host wait, and before every checkpoint) raises :class:`DivergedError` naming the
    step, its learning rate and the last finite loss. With several ranks they agree (a rank's
    own rows may be the only non-finite ones)."""

    def __init__(self, job: Any, state: Any, run_dir: RunDir) -> None:
        self.job, self.state, self.run_dir = job, state, run_dir
        self.every = 25 if job.on_cuda else 1
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.last: tuple[int, float] | None = None

    def see(self, loss: torch.Tensor) -> None:
        """The loss of the step just done (``state.step`` already counts it)."""
        done = self.state.epoch * self.job.steps_per_epoch + self.state.step
        self.pending.append((done, loss))
        if len(self.pending) >= self.every:
            self.check()

    def check(self) -> None:
        """Raise :class:`DivergedError` if a loss seen since the last check is not finite."""
        if not self.pending:
            return
        values = torch.stack([v.float() for _, v in self.pending]).cpu().tolist()
        steps, self.pending = [s for s, _ in self.pending], []
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        before = self.last if bad is None or bad == 0 else (steps[bad - 1], values[bad - 1])
        mine = None if bad is None else (steps[bad], values[bad], before)
        if self.job.dist.active and self.job.dist.max_int(int(mine is not None)):
            mine = min((m for m in self.job.dist.gather_object(mine) if m), key=lambda m: m[0])
        if mine is None:
            self.last = (steps[-1], values[-1])
            return
        raise DivergedError(self._message(*mine))

    def _message(self, step: int, value: float, last: tuple[int, float] | None) -> str:
        r, per = self.job.recipe, self.job.steps_per_epoch
        lr = r.lr * lr_factor(step - 1, per, r)
        epoch, at = (step - 1) // per + 1, (step - 1) % per + 1
        was = "none yet" if last is None else f"{last[1]:.4g} at step {last[0]}"
        return (
            f"the run diverged: the training loss is {value} at step {step} (epoch {epoch}, "
            f"step {at}/{per}) with learning rate {lr:.4g}; the last finite loss: {was}. "
            f"Nothing from this step on is saved ({kept(self.run_dir)}). Start again with a "
            "lower --lr (--overwrite)"
        )


class Saver:
    """Writes what a run has to show at each point: its checkpoint and its results, with the
    wall-clock time of this session added to ``spent`` first."""

    def __init__(
        self, job: Any, state: Any, run_dir: RunDir, config: dict, info: dict, start: float
    ) -> None:
        self.job, self.state, self.run_dir, self.config = job, state, run_dir, config
        self.info = {**info, "config": config, "checkpoint": str(run_dir.checkpoint)}
        self.mark = start
        self.guard = FiniteGuard(job, state, run_dir)
        self.cadence = Cadence(None, None, job.dist)

    def account(self) -> None:
        now = time.perf_counter()
        self.state.spent["wall_seconds"] += now - self.mark
        self.mark = now

    def checkpoint(self) -> None:
        """Write the checkpoint, unless the weights are no longer finite
        (:class:`DivergedError`: the last good checkpoint stays)."""
        self.account()
        self.guard.check()
        bad = first_nonfinite(self.job.model.state_dict())
        # Agreed by every rank (BatchNorm statistics are each rank's own within an epoch): a
        # rank that stopped alone would leave the others waiting at the next collective.
        if self.job.dist.max_int(int(bad is not None)):
            bad = bad or "another rank's weights"
            step = self.state.epoch * self.job.steps_per_epoch + self.state.step
            raise DivergedError(
                f"the run diverged: its weights ({bad}) are no longer finite after step "
                f"{step}, though the losses were; nothing from them is saved "
                f"({kept(self.run_dir)}). Start again with a lower --lr (--overwrite)"
            )
        self.run_dir.save_checkpoint(self.config, self.state.state_dict(), self.job.model_meta)
        self.cadence.mark = time.monotonic()

    def results(self, finished: bool, interrupted: bool, epoch_end: bool = True) -> dict:
        # model.pt only at the end of an epoch: its weights then match its test scores.
        job = self.job
        res = summarize(self.info, job, self.state, finished, interrupted)
        self.run_dir.write_results(res, job.model if epoch_end else None, job.model_meta)
        return res

    def stopped(self, where: str, epoch_end: bool) -> dict:
        """Say where the run stopped and how to go on; the results of the interrupted run."""
        if self.job.dist.is_main:
            print(
                f"stopped {where}; checkpoint in {self.run_dir.checkpoint}; the same command "
                "continues it",
                file=sys.stderr,
            )
        return self.results(finished=False, interrupted=True, epoch_end=epoch_end)
