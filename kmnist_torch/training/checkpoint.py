"""A run's record of itself: the ``results.json`` document (:func:`summarize`), an epoch's
line in its history (:func:`epoch_record`), and :class:`Saver`, which writes the checkpoint and
the results at each point of :func:`kmnist_torch.training.engine.fit`.

It takes the engine's ``Job`` and ``RunState`` without importing them (the engine imports
this module)."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from .optim import lr_factor
from .runtime import RunDir, device_name, git_commit


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


class Saver:
    """Writes what a run has to show at each point: its checkpoint and its results, with the
    wall-clock time of this session added to ``spent`` first."""

    def __init__(
        self, job: Any, state: Any, run_dir: RunDir, config: dict, info: dict, start: float
    ) -> None:
        self.job, self.state, self.run_dir, self.config = job, state, run_dir, config
        self.info = {**info, "config": config, "checkpoint": str(run_dir.checkpoint)}
        self.mark = start

    def account(self) -> None:
        now = time.perf_counter()
        self.state.spent["wall_seconds"] += now - self.mark
        self.mark = now

    def checkpoint(self) -> None:
        self.account()
        self.run_dir.save_checkpoint(self.config, self.state.state_dict(), self.job.model_meta)

    def results(self, finished: bool, interrupted: bool, epoch_end: bool = True) -> dict:
        # model.pt only at the end of an epoch: its weights then match its test scores.
        job = self.job
        res = summarize(self.info, job, self.state, finished, interrupted)
        self.run_dir.write_results(res, job.model if epoch_end else None, job.model_meta)
        return res

    def stopped(self, where: str, epoch_end: bool) -> dict:
        """Say where the run stopped and how to go on; the results of the interrupted run."""
        print(
            f"stopped {where}; checkpoint in {self.run_dir.checkpoint}; continue with --resume",
            file=sys.stderr,
        )
        return self.results(finished=False, interrupted=True, epoch_end=epoch_end)
