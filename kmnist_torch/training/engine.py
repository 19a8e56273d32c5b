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
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..data.loader import TensorLoader
from ..settings import Progress
from . import cpu, mixup
from .augment import random_translate
from .checkpoint import Cadence, Saver, epoch_record
from .distributed import Dist
from .metrics import evaluate
from .optim import build_optimizer, lr_factor
from .recipes import Recipe
from .runtime import CpuEstimate, RunDir, StopRequest, sync

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
            # Row-major, as model.pt stores them: a channels_last model's weights (the CPU's
            # layout, and CUDA's where the recipe says so) are refused by the model file
            # reader's density check otherwise, and load into either layout.
            "model": _row_major(self.model.state_dict()),
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
    x = cpu.prepare_batch(x, job.device, r.channels_last)
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
    with cpu.autocast(job.device, r.amp):
        logits, soft = mixup.mixed_forward(job.forward, x, y, job.num_classes, plan)
    loss = mixup.loss_fn(logits, soft, r.loss)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return loss.detach()


def _row_major(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` (a state dict, its ``_metadata`` kept) with every tensor contiguous."""
    for k, v in weights.items():
        weights[k] = v.contiguous()
    return weights


def _batches_from(loader: Any, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches from ``start`` on: a ``TensorLoader`` skips without gathering
    (``--checkpoint-every`` restarts the epoch's pass after every checkpoint), any other loader
    by drawing and dropping."""
    if hasattr(loader, "batches"):
        return loader.batches(start)
    return itertools.islice(iter(loader), start, None)


def train_one_epoch(
    job: Job,
    state: RunState,
    stop: StopRequest | None = None,
    progress: bool | None = None,
    estimate: CpuEstimate | None = None,
    saver: Saver | None = None,
) -> None:
    """Train epoch ``state.epoch`` from batch ``state.step`` to its end, or until ``stop`` is
    requested, or until ``saver``'s checkpoint cadence says one is due; ``state.step``,
    ``state.carry`` (loss and time of the epoch so far) and ``state.spent`` follow along.

    Args:
        job: what is trained.
        state: where the run stands (advanced in place).
        stop: checked after each step.
        progress: False: nothing; else a bar on a terminal, plain lines elsewhere
            (:class:`~kmnist_torch.settings.Progress`).
        estimate: told the time of each step, to warn how long a CPU run will take.
        saver: its guard sees each step's loss (a non-finite one stops the run); its
            cadence may end the stretch early for a checkpoint.
    """
    skip = state.step
    job.model.train()
    t0 = sync(job.device)
    # With several ranks the sums start at 0 here and are summed over the ranks at the end,
    # then added to the carry (which holds whole-run figures).
    ddp = job.dist.active
    carried = 0.0 if ddp else state.carry["loss_sum"]
    loss_sum = torch.tensor(carried, dtype=torch.float64, device=job.device)
    seen = 0 if ddp else state.carry["seen"]
    shown = Progress(f"epoch {state.epoch + 1}/{job.recipe.epochs}", job.steps_per_epoch,
                     "step", state.step, progress)  # fmt: skip
    with shown:
        for x, y in _batches_from(job.train_loader, state.step):
            t_step = time.perf_counter()
            loss = train_step(job, state, x, y)
            loss_sum += loss.double() * len(y)
            seen += len(y)
            state.step += 1
            if estimate is not None:
                estimate.tick(
                    time.perf_counter() - t_step, state.epoch * job.steps_per_epoch + state.step
                )
            # .item() waits for the device: only now and then, and only when shown.
            note = f"loss {loss.item():.4f}" if shown.enabled and state.step % 25 == 0 else None
            shown.update(1, len(y) * job.dist.world_size, note)
            if _pause(job, state, loss, stop, saver):
                break
    if ddp:
        job.dist.all_sum(loss_sum)
        loss_sum += state.carry["loss_sum"]
        seen = state.carry["seen"] + seen * job.dist.world_size  # equal parts on every rank
        job.dist.broadcast_buffers(job.model)
    _account_epoch(job, state, loss_sum.item(), seen, sync(job.device) - t0, skip)


def _pause(
    job: Job, state: RunState, loss: torch.Tensor, stop: StopRequest | None, saver: Saver | None
) -> bool:
    """After a step: whether to end this stretch of the epoch, for a stop asked for or a
    checkpoint due (every rank asks at every step: both may be collectives)."""
    if saver is not None:
        saver.guard.see(loss)  # a non-finite loss raises here
    if stop is not None and stop.requested:
        return True
    return saver is not None and saver.cadence.due(state.epoch * job.steps_per_epoch + state.step)


TRAIN_SAMPLE = 1000  # training images scored like the test set after each epoch


class TrainSample:
    """Up to :data:`TRAIN_SAMPLE` training images, evenly spaced through the split (the same
    every epoch), as unaugmented, unmixed batches like the test loader's. Every rank of a
    data-parallel run holds the whole split, so each scores the whole sample."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
        n = min(TRAIN_SAMPLE, len(data))
        idx = torch.linspace(0, len(data) - 1, n).round().long().to(data.device)
        self.x, self.y, self.batch_size = data[idx], targets[idx], batch_size

    def __iter__(self):
        for lo in range(0, len(self.y), self.batch_size):
            hi = lo + self.batch_size
            yield self.x[lo:hi].float().div_(255.0), self.y[lo:hi]


def _account_epoch(
    job: Job, state: RunState, loss_sum: float, seen: int, seconds: float, skip: int
) -> None:
    """Add what this stretch of the epoch (from batch ``skip`` to ``state.step``) did to the
    carry and the time spent."""
    state.carry = {
        "loss_sum": loss_sum,
        "seen": seen,
        "train_seconds": state.carry["train_seconds"] + seconds,
    }
    state.spent["train_seconds"] += seconds
    state.spent["train_images"] += (state.step - skip) * job.recipe.batch_size
    state.spent["device_seconds"] += seconds


# ------------------------------------------------------------------------------- the loop


def fit(
    job: Job,
    state: RunState,
    run_dir: RunDir,
    config: dict[str, Any],
    info: dict[str, Any],
    stop_after: int | None = None,
    progress: bool | None = None,
    wall_start: float | None = None,
    every: tuple[int | None, float | None] = (None, None),
) -> dict[str, Any]:
    """Train from where ``state`` stands to the recipe's last epoch, testing after each epoch,
    with a checkpoint and ``results.json`` in ``run_dir`` after each.

    A first Ctrl-C stops after the current step with a checkpoint (``"interrupted": True``);
    so does the end of epoch ``stop_after``. A non-finite loss or weights stop the run with
    :class:`~kmnist_torch.errors.DivergedError`, writing nothing more.

    Args:
        job: what is trained.
        state: where the run stands (fresh, or loaded from a checkpoint).
        run_dir: where the checkpoint and results go.
        config: the run's settings, saved in the checkpoint (checked on resume).
        info: what was run, for the results (dataset, sizes, seed ...).
        stop_after: checkpoint and stop once this many epochs are done.
        progress: False: no progress shown; else a bar on a terminal, plain lines elsewhere.
        wall_start: when the session began (wall-clock time includes loading the data).
        every: ``(steps, seconds)``: a checkpoint inside an epoch every so many steps of the
            run, or once so many seconds passed since the last (``--checkpoint-every``).

    Returns:
        The results dict, as written to ``results.json``.
    """
    r = job.recipe
    start = time.perf_counter() if wall_start is None else wall_start
    saver = Saver(job, state, run_dir, config, info, start)
    saver.cadence = Cadence(*every, job.dist)
    if state.epoch >= r.epochs:
        print(f"{run_dir.out}: all {r.epochs} epochs are done already", file=sys.stderr)
        saver.account()
        return saver.results(finished=True, interrupted=False)
    estimate = None
    if not job.on_cuda and job.dist.is_main:
        estimate = CpuEstimate(r.epochs * job.steps_per_epoch, r.batch_size)
    with job.dist.stop_request() as stop:
        while state.epoch < r.epochs:
            metrics, test_s = _train_and_test(job, state, stop, progress, estimate, saver)
            if metrics is None:  # Ctrl-C: checkpoint mid-epoch, resume at the next step
                saver.checkpoint()
                where = f"in epoch {state.epoch + 1} at step {state.step}/{job.steps_per_epoch}"
                return saver.stopped(where, epoch_end=False)
            _close_epoch(job, state, metrics, test_s)
            saver.checkpoint()
            done = state.epoch == r.epochs
            if not done and (stop.requested or (stop_after or 0) == state.epoch):
                return saver.stopped(f"after epoch {state.epoch}", epoch_end=True)
            res = saver.results(finished=done, interrupted=False)
    return res


def _train_and_test(
    job: Job,
    state: RunState,
    stop: StopRequest,
    progress: bool | None,
    estimate: CpuEstimate | None,
    saver: Saver,
) -> tuple[dict[str, float] | None, float]:
    """Train the rest of the epoch, with the checkpoints its cadence asks for, and test it:
    (the test metrics, or None when a stop was requested first; the seconds testing took)."""
    state.loader_state = job.train_loader.state_dict()  # the epoch's order comes from it
    while True:
        train_one_epoch(job, state, stop, progress, estimate, saver)
        if stop.requested or state.step >= job.steps_per_epoch:
            break
        saver.checkpoint()  # due by the cadence; then on, as a resumed run would
        job.train_loader.load_state_dict(state.loader_state)
    saver.guard.check()
    t1 = sync(job.device)
    metrics = None if stop.requested else _test(job, state, stop, progress)
    test_s = sync(job.device) - t1
    state.spent["device_seconds"] += test_s
    return metrics, test_s


def _test(
    job: Job, state: RunState, stop: StopRequest, progress: bool | None
) -> dict[str, float] | None:
    """The test metrics, and the same measured on a fixed sample of the training images
    (``train_sample_loss``, ``train_sample_accuracy``): like with like, where the training
    loss is measured on augmented, mixed batches. None when a stop was requested."""
    r, ws = job.recipe, job.dist.world_size
    desc = f"testing epoch {state.epoch + 1}/{r.epochs}"
    with Progress(desc, len(job.test_loader), "batch", enabled=progress) as shown:
        test = shown.counted(job.test_loader, ws)
        metrics = evaluate(job.eval_forward, test, r, job.device, stop, job.dist)
    loader = job.train_loader
    if metrics is None or not hasattr(loader, "data"):  # a benchmark's torch DataLoader
        return metrics
    sample = TrainSample(loader.data, loader.targets, cpu.eval_batch(job.device, r.eval_batch_size))
    on_train = evaluate(job.eval_forward, sample, r, job.device, stop, job.dist)
    if on_train is None:
        return None
    return {
        **metrics,
        "train_sample_loss": on_train["test_loss"],
        "train_sample_accuracy": on_train["test_accuracy"],
    }


def _close_epoch(job: Job, state: RunState, metrics: dict[str, float], test_s: float) -> None:
    """Record the finished epoch in the history, move ``state`` to the next one, and print
    the epoch's line."""
    record = epoch_record(job, state, metrics, test_s)
    state.history.append(record)
    state.carry = {"loss_sum": 0.0, "seen": 0, "train_seconds": 0.0}
    state.epoch, state.step = state.epoch + 1, 0
    state.loader_state = job.train_loader.state_dict()
    sample = record.get("train_sample_loss")
    sample_text = "" if sample is None else f"train {sample:.4f} "
    steps, at = state.epoch * job.steps_per_epoch, record["test_balanced_accuracy"]
    note = job.recipe.slow_start(steps, job.num_classes, at) if state.epoch == 1 else None
    print(
        f"epoch {state.epoch}/{job.recipe.epochs}  objective {record['train_loss']:.4f}  "
        f"cross-entropy {sample_text}test {record['test_loss']:.4f}  "
        f"acc {100 * record['test_accuracy']:.2f}%  "
        f"bal acc {100 * record['test_balanced_accuracy']:.2f}%  "
        f"{record['images_per_second']:,.0f} img/s" + (f"\nnote: {note}" if note else ""),
        flush=True,
    )
