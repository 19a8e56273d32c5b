"""The training engine: one step, one epoch, evaluation, the run's state and its files.

Nothing here parses a command line or builds a dataset or model: :func:`fit` takes a
:class:`Job` (the model and the forward to call, the loaders, the recipe, the device), a
:class:`RunState` (everything that changes while training) and a :class:`RunDir` (where the
checkpoint, ``results.json``, ``model.pt`` and ``curves.png`` go). A data-parallel run passes
a ``DistributedDataParallel`` ``forward``, sharded loaders and its
:class:`~kmnist_torch.training.distributed.Dist`.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.loader import TensorLoader
from ..errors import TrainError
from . import mixup
from .augment import random_translate
from .distributed import Dist
from .metrics import accuracy, balanced_accuracy
from .optim import build_optimizer, lr_factor
from .recipes import Recipe
from .runtime import (
    CHECKPOINT,
    CURVES,
    MODEL,
    RESULTS,
    CpuEstimate,
    RunDir,
    StopRequest,
    determinism,
    device_name,
    git_commit,
    sync,
)

__all__ = [
    "CHECKPOINT",
    "CURVES",
    "MODEL",
    "RESULTS",
    "CpuEstimate",
    "Job",
    "RunDir",
    "RunState",
    "StopRequest",
    "TrainError",
    "build_optimizer",
    "determinism",
    "device_name",
    "evaluate",
    "fit",
    "lr_factor",
    "summarize",
    "sync",
    "train_one_epoch",
    "train_step",
]


# --------------------------------------------------------------------- what a run is made of


@dataclass
class Job:
    """What one run trains: the recipe, the model, the function called for a forward pass
    (the model itself, ``torch.compile(model)`` when the recipe says so, or a wrapper such as
    ``DistributedDataParallel``) and the one evaluation calls (default: the same), the
    loaders, the device and the process's place in a data-parallel run (``dist``; default:
    alone). Fixed for the whole run."""

    recipe: Recipe
    model: nn.Module
    train_loader: TensorLoader | Any
    test_loader: TensorLoader | None
    device: torch.device
    num_classes: int
    forward: Callable[..., torch.Tensor] | None = None
    # What model.pt says about the model (kmnist_torch.models.modelfile.model_meta);
    # None: no model.pt.
    model_meta: dict[str, Any] | None = None
    eval_forward: Callable[..., torch.Tensor] | None = None
    dist: Dist = field(default_factory=Dist)
    layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = torch.compile(self.model) if self.recipe.compile else self.model
        if self.eval_forward is None:
            self.eval_forward = self.forward
        self.layers = tuple(getattr(self.model, "mix_layers", (0,)))

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


class RunState:
    """Everything that changes while training: optimiser, schedule, the loader's shuffle and
    the random streams, history, time spent, and the position (``epoch``, ``step``)."""

    def __init__(self, job: Job, seed: int) -> None:
        r, steps = job.recipe, job.steps_per_epoch
        self.model, self.loader = job.model, job.train_loader
        self.optimizer = build_optimizer(job.model, r)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, steps, r)
        )
        self.gen = torch.Generator(device=job.device)  # translations and mixup permutations
        self.gen.manual_seed(seed + 1)
        self.rng = np.random.default_rng(seed + 2)  # mixup lambda and layer
        self.on_cuda, self.device, self.dist = job.on_cuda, job.device, job.dist
        self.history: list[dict[str, Any]] = []
        self.spent = {
            "wall_seconds": 0.0,
            "device_seconds": 0.0,
            "train_seconds": 0.0,
            "train_images": 0,
        }
        self.carry = {"loss_sum": 0.0, "seen": 0, "train_seconds": 0.0}  # a part-done epoch
        self.epoch, self.step = 0, 0
        # The loader's state when the current epoch's order was drawn: a checkpoint taken
        # mid-epoch resumes by drawing the same order and skipping ``step`` batches. (A loader
        # without one, e.g. a torch DataLoader timed by a benchmark, cannot be checkpointed.)
        self.loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}

    def _own_rng(self) -> dict[str, Any]:
        # This rank's global torch streams (dropout), its own device's only.
        cuda = [torch.cuda.get_rng_state(self.device)] if self.on_cuda else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run stands. With several ranks,
        a collective (every rank's dropout streams are gathered): call it on every rank."""
        rng: dict[str, Any] = {"train": self.gen.get_state(), "numpy": self.rng.bit_generator.state}
        if self.dist.active:
            ranks = self.dist.gather_object(self._own_rng())
            rng.update(torch=ranks[0]["torch"], cuda=[], ranks=ranks)
        else:
            rng.update(
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if self.on_cuda else [],
            )
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader_state,
            "history": self.history,
            "spent": self.spent,
            "carry": self.carry,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the global torch RNG included)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.loader_state = state["loader"]
        self.gen.set_state(state["rng"]["train"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        ranks = state["rng"].get("ranks")
        if self.dist.active and ranks and len(ranks) == self.dist.world_size:
            own = ranks[self.dist.rank]
            torch.set_rng_state(own["torch"])
            if self.on_cuda and own["cuda"]:
                torch.cuda.set_rng_state(own["cuda"][0], self.device)
        else:
            torch.set_rng_state(state["rng"]["torch"])
            if self.on_cuda and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.history, self.spent, self.carry = state["history"], state["spent"], state["carry"]
        self.epoch, self.step = state["epoch"], state["step"]


# -------------------------------------------------------------------------- train, evaluate


def train_step(job: Job, state: RunState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimiser step: translate, mix, forward (bf16 autocast on CUDA when the recipe
    says so), loss, backward, step the optimiser and the schedule.

    Args:
        job: the model, forward, recipe and device.
        state: the optimiser, schedule and random streams (advanced in place).
        x: float32 B x C x H x W images on ``job.device``.
        y: int64 B labels.

    Returns:
        The batch loss, detached.
    """
    r = job.recipe
    x = random_translate(x, r.translate, state.gen, shard=job.dist.shard)
    if r.channels_last and job.on_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    plan = mixup.draw(
        r.mixup,
        r.alpha or 0.0,
        len(y),
        job.layers,
        state.rng,
        state.gen,
        job.device,
        job.dist.shard,
    )
    with torch.autocast(job.device.type, torch.bfloat16, enabled=r.amp and job.on_cuda):
        logits, soft = mixup.mixed_forward(job.forward, x, y, job.num_classes, plan)
    loss = mixup.loss_fn(logits, soft, r.loss)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return loss.detach()


def train_one_epoch(
    job: Job,
    state: RunState,
    stop: StopRequest | None = None,
    progress: bool | None = None,
    estimate: CpuEstimate | None = None,
) -> None:
    """Train epoch ``state.epoch`` from batch ``state.step`` to its end, or until ``stop`` is
    requested; ``state.step``, ``state.carry`` (loss and time of the epoch so far) and
    ``state.spent`` follow along.

    Args:
        job: what is trained.
        state: where the run stands (advanced in place).
        stop: checked after each step.
        progress: show a progress bar (None: on a terminal).
        estimate: told the time of each step, to warn how long a CPU run will take.
    """
    r, steps_per_epoch, skip = job.recipe, job.steps_per_epoch, state.step
    job.model.train()
    t0 = sync(job.device)
    bar = tqdm(
        itertools.islice(iter(job.train_loader), skip, None),
        total=steps_per_epoch,
        initial=skip,
        desc=f"epoch {state.epoch + 1}/{r.epochs}",
        leave=False,
        disable=None if progress is None else not progress,  # None: on a terminal
        unit="batch",
    )
    # With several ranks the sums start at 0 here and are summed over the ranks at the end,
    # then added to the carry (which holds whole-run figures).
    ddp = job.dist.active
    carried = 0.0 if ddp else state.carry["loss_sum"]
    loss_sum = torch.tensor(carried, dtype=torch.float64, device=job.device)
    seen = 0 if ddp else state.carry["seen"]
    for x, y in bar:
        t_step = time.perf_counter()
        loss = train_step(job, state, x, y)
        loss_sum += loss.double() * len(y)
        seen += len(y)
        state.step += 1
        if estimate is not None:
            estimate.tick(time.perf_counter() - t_step, state.epoch * steps_per_epoch + state.step)
        if not bar.disable and state.step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if stop is not None and stop.requested:
            break
    bar.close()
    if ddp:
        job.dist.all_sum(loss_sum)
        loss_sum += state.carry["loss_sum"]
        seen = state.carry["seen"] + seen * job.dist.world_size  # equal parts on every rank
        job.dist.broadcast_buffers(job.model)
    seconds = sync(job.device) - t0
    state.carry = {
        "loss_sum": loss_sum.item(),
        "seen": seen,
        "train_seconds": state.carry["train_seconds"] + seconds,
    }
    state.spent["train_seconds"] += seconds
    state.spent["train_images"] += (state.step - skip) * r.batch_size
    state.spent["device_seconds"] += seconds


@torch.no_grad()
def evaluate(
    forward: Callable[..., torch.Tensor],
    loader: TensorLoader,
    r: Recipe,
    device: torch.device,
    stop: StopRequest | None = None,
    dist: Dist | None = None,
) -> dict[str, float] | None:
    """Test loss (cross-entropy), top-1 and balanced accuracy of ``forward`` on ``loader``.

    With several ranks (``dist``), each rank's loader yields its part of every test batch;
    predictions, targets and loss sums are gathered, so every image counts exactly once.

    Args:
        forward: the model (or its compiled form); put in eval mode if it is a module.
        loader: the test batches.
        r: the recipe (for bf16 autocast and channels_last on CUDA).
        device: where the batches are.
        stop: checked before each batch.
        dist: this process's place in a data-parallel run (default: alone).

    Returns:
        ``test_loss``, ``test_accuracy`` and ``test_balanced_accuracy``; None if a stop was
        requested.
    """
    if isinstance(forward, nn.Module):
        forward.eval()
    dist = dist or Dist()
    preds, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        if stop is not None and stop.requested:
            return None
        if len(y) == 0:  # a rank's part of a last batch smaller than the world
            continue
        if r.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=r.amp and device.type == "cuda"):
            logits = forward(x)
        # Written out rather than F.cross_entropy: nll_loss has no deterministic CUDA kernel.
        log_p = torch.log_softmax(logits.float(), dim=1)
        loss_sum -= log_p.gather(1, y[:, None]).sum().double()
        preds.append(logits.argmax(1))
        targets.append(y)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    pred = dist.gather_cat(torch.cat(preds) if preds else empty).cpu()
    target = dist.gather_cat(torch.cat(targets) if targets else empty).cpu()
    dist.all_sum(loss_sum)
    return {
        "test_loss": loss_sum.item() / len(target),
        "test_accuracy": accuracy(pred, target),
        "test_balanced_accuracy": balanced_accuracy(pred, target),
    }


# ------------------------------------------------------------------------------- the loop


def summarize(
    info: dict[str, Any], job: Job, state: RunState, finished: bool, interrupted: bool
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


def _epoch_record(job: Job, state: RunState, metrics: dict[str, float], test_s: float) -> dict:
    r, steps, carry = job.recipe, job.steps_per_epoch, state.carry
    return {
        "epoch": state.epoch + 1,
        "lr": r.lr * lr_factor((state.epoch + 1) * steps - 1, steps, r),
        "train_loss": carry["loss_sum"] / max(carry["seen"], 1),
        **metrics,
        "images_per_second": carry["seen"] / max(carry["train_seconds"], 1e-9),
        "train_seconds": carry["train_seconds"],
        "test_seconds": test_s,
    }


class _Session:
    """Adds the wall-clock time of this session to ``spent`` whenever the run is saved."""

    def __init__(self, spent: dict[str, Any], start: float) -> None:
        self.spent, self.mark = spent, start

    def account(self) -> None:
        now = time.perf_counter()
        self.spent["wall_seconds"] += now - self.mark
        self.mark = now


def fit(
    job: Job,
    state: RunState,
    run_dir: RunDir,
    config: dict[str, Any],
    info: dict[str, Any],
    stop_after: int | None = None,
    progress: bool | None = None,
    wall_start: float | None = None,
) -> dict[str, Any]:
    """Train from where ``state`` stands to the recipe's last epoch, testing after each epoch,
    with a checkpoint and ``results.json`` in ``run_dir`` after each.

    A first Ctrl-C stops after the current step with a checkpoint (``"interrupted": True``);
    so does the end of epoch ``stop_after``.

    Args:
        job: what is trained.
        state: where the run stands (fresh, or loaded from a checkpoint).
        run_dir: where the checkpoint and results go.
        config: the run's settings, saved in the checkpoint (checked on resume).
        info: what was run, for the results (dataset, sizes, seed ...).
        stop_after: checkpoint and stop once this many epochs are done.
        progress: progress bar (None: on a terminal).
        wall_start: when the session began (wall-clock time includes loading the data).

    Returns:
        The results dict, as written to ``results.json``.
    """
    r, steps = job.recipe, job.steps_per_epoch
    session = _Session(state.spent, time.perf_counter() if wall_start is None else wall_start)
    info = {**info, "config": config, "checkpoint": str(run_dir.checkpoint)}

    def results(finished: bool, interrupted: bool, epoch_end: bool = True) -> dict[str, Any]:
        # model.pt only at the end of an epoch: its weights then match its test scores.
        res = summarize(info, job, state, finished, interrupted)
        run_dir.write_results(res, job.model if epoch_end else None, job.model_meta)
        return res

    if state.epoch >= r.epochs:
        print(f"{run_dir.out}: all {r.epochs} epochs are done already", file=sys.stderr)
        session.account()
        return results(finished=True, interrupted=False)
    estimate = (
        None if job.on_cuda or not job.dist.is_main else CpuEstimate(r.epochs * steps, r.batch_size)
    )
    with job.dist.stop_request() as stop:
        while state.epoch < r.epochs:
            state.loader_state = job.train_loader.state_dict()  # the epoch's order comes from it
            train_one_epoch(job, state, stop, progress, estimate)
            t1 = sync(job.device)
            metrics = (
                None
                if stop.requested
                else evaluate(job.eval_forward, job.test_loader, r, job.device, stop, job.dist)
            )
            test_s = sync(job.device) - t1
            state.spent["device_seconds"] += test_s
            if metrics is None:  # Ctrl-C: checkpoint mid-epoch, resume at the next step
                session.account()
                run_dir.save_checkpoint(config, state.state_dict(), job.model_meta)
                print(
                    f"stopped in epoch {state.epoch + 1} at step {state.step}/{steps}; "
                    f"checkpoint in {run_dir.checkpoint}; continue with --resume",
                    file=sys.stderr,
                )
                return results(finished=False, interrupted=True, epoch_end=False)
            record = _epoch_record(job, state, metrics, test_s)
            state.history.append(record)
            state.carry = {"loss_sum": 0.0, "seen": 0, "train_seconds": 0.0}
            state.epoch, state.step = state.epoch + 1, 0
            state.loader_state = job.train_loader.state_dict()
            print(
                f"epoch {state.epoch}/{r.epochs}  train loss {record['train_loss']:.4f}  "
                f"test loss {record['test_loss']:.4f}  "
                f"acc {100 * record['test_accuracy']:.2f}%  "
                f"bal acc {100 * record['test_balanced_accuracy']:.2f}%  "
                f"{record['images_per_second']:,.0f} img/s",
                flush=True,
            )
            session.account()
            run_dir.save_checkpoint(config, state.state_dict(), job.model_meta)
            done = state.epoch == r.epochs
            if not done and (stop.requested or (stop_after or 0) == state.epoch):
                print(
                    f"stopped after epoch {state.epoch}; checkpoint in {run_dir.checkpoint}; "
                    "continue with --resume",
                    file=sys.stderr,
                )
                return results(finished=False, interrupted=True)
            res = results(finished=done, interrupted=False)
    return res
