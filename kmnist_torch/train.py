"""Train and evaluate a classifier on MNIST, KMNIST, K49 or Kuzushiji-Kanji.

    python -m kmnist_torch.train --model preact18 --mixup manifold --dataset kmnist

Reads top to bottom: the recipe table, the command line, data, model and optimiser, the loop,
checkpoints and results. A recipe is data; every value in it can be overridden by the flag of
the same name (``--epochs``, ``--batch-size``, ``--lr`` ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import mixup
from ._io import atomic_write
from .augment import random_translate
from .datasets import create_dataset
from .formats import FormatError
from .loader import TensorLoader
from .metrics import accuracy, balanced_accuracy
from .models import create_model, list_models
from .sources import DataFilesError

# ------------------------------------------------------------------------------------ recipes


def _h(text: str) -> Any:
    return field(metadata={"help": text})


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of a run. Each field is also a command-line flag."""

    model: str = _h("model name (see kmnist_torch.models.list_models())")
    epochs: int = _h("passes over the training set")
    batch_size: int = _h("training batch size")
    optimizer: str = _h("sgd or adadelta")
    lr: float = _h("peak learning rate")
    momentum: float = _h("SGD momentum")
    nesterov: bool = _h("Nesterov momentum (SGD)")
    weight_decay: float = _h("L2 weight decay, on every parameter as in the reference")
    rho: float = _h("Adadelta rho")
    eps: float = _h("Adadelta epsilon")
    schedule: str = _h("learning-rate schedule: step, onecycle or constant")
    milestones: tuple[float, ...] = _h("step schedule: fractions of the run where lr *= gamma")
    gamma: float = _h("step schedule: factor at each milestone")
    warmup: float = _h("onecycle: fraction of the steps spent warming up linearly")
    translate: int = _h("random translation of up to this many pixels (0: none)")
    mixup: str = _h("none, input or manifold")
    alpha: float | None = _h("Beta(alpha, alpha) of mixup; default 1.0 input, 2.0 manifold")
    loss: str = _h("bce (BCE on softmax, as the reference) or ce (soft-target cross-entropy)")
    amp: bool = _h("bf16 autocast (CUDA only)")
    channels_last: bool = _h("channels_last memory format (CUDA only)")
    compile: bool = _h("torch.compile the model")
    eval_batch_size: int = _h("test batch size")


RECIPES: dict[str, Recipe] = {
    # The Kuzushiji table's PreActResNet-18 rows follow the manifold mixup reference code
    # (github.com/vikasverma1077/manifold_mixup); we found no epoch count published with the
    # table, so the reference's own is used. Its supervised README's command: SGD (Nesterov)
    # lr 0.1, momentum 0.9, weight decay 1e-4, batch 100, 200 epochs with lr x0.1 at epochs
    # 100 and 150 (main.py's default, 300 epochs stepping at 150 and 225, has the same
    # fractions), alpha 1.0 input / 2.0 manifold, BCE on the softmax. Translation of up to
    # 2 px: the choice.
    "paper": Recipe(
        model="preact18", epochs=200, batch_size=100, optimizer="sgd", lr=0.1, momentum=0.9,
        nesterov=True, weight_decay=1e-4, rho=0.95, eps=1e-7, schedule="step",
        milestones=(0.5, 0.75), gamma=0.1, warmup=0.0, translate=2, mixup="manifold",
        alpha=None, loss="bce", amp=False, channels_last=False, compile=False,
        eval_batch_size=1000,
    ),
    # Same model, mixup and loss for the fewest GPU-seconds: bf16 + channels_last, batches of
    # 512 with a linearly scaled peak lr and a one-cycle (linear up, linear down) schedule,
    # more weight decay for the shorter run. A starting point to be measured on a GPU.
    "fast": Recipe(
        model="preact18", epochs=30, batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9,
        nesterov=True, weight_decay=5e-4, rho=0.95, eps=1e-7, schedule="onecycle",
        milestones=(), gamma=0.1, warmup=0.2, translate=2, mixup="manifold", alpha=None,
        loss="bce", amp=True, channels_last=True, compile=False, eval_batch_size=2048,
    ),
    # The official Keras benchmark: Adadelta with Keras' defaults (lr 1.0, rho 0.95,
    # epsilon 1e-7), batch 128, 12 epochs, categorical cross-entropy, no augmentation.
    "cnn": Recipe(
        model="simple_cnn", epochs=12, batch_size=128, optimizer="adadelta", lr=1.0,
        momentum=0.0, nesterov=False, weight_decay=0.0, rho=0.95, eps=1e-7,
        schedule="constant", milestones=(), gamma=0.1, warmup=0.0, translate=0, mixup="none",
        alpha=None, loss="ce", amp=False, channels_last=False, compile=False,
        eval_batch_size=1000,
    ),
}  # fmt: skip

DATASETS = ("mnist", "kmnist", "k49", "kkanji")
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
# What a resumed run may change: where files go and how they are fetched, where it runs.
_RESUMABLE_CHANGES = {"out", "resume", "overwrite", "stop_after", "download", "verify", "root",
                      "progress", "device", "compile", "deterministic"}  # fmt: skip


class TrainError(RuntimeError):
    """A run cannot start or continue as asked (for example, its output folder is taken)."""


# ------------------------------------------------------------------------------- command line


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: run options, then one flag per :class:`Recipe` field."""
    p = argparse.ArgumentParser(
        prog="python -m kmnist_torch.train",
        description="Train and evaluate a classifier on a Kuzushiji dataset (or MNIST).",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="hyperparameter table to start from (default: cnn for simple_cnn, else paper)",
    )
    run.add_argument("--dataset", choices=DATASETS, default="kmnist")
    run.add_argument(
        "--root",
        default=None,
        help="data folder (default: $KMNIST_TORCH_ROOT or ~/.cache/kmnist_torch)",
    )
    run.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download missing files (default: yes)",
    )
    run.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not check the files' checksums (your own re-encodings)",
    )
    run.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: a resumed run ends with the same numbers",
    )
    run.add_argument(
        "--limit-train",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N training images",
    )
    run.add_argument(
        "--limit-test", type=int, default=None, metavar="N", help="use only the first N test images"
    )
    run.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where results.json and the "
        "checkpoint go (default: runs/<dataset>-<recipe>-<model>-<mixup>-seed<seed>)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR's checkpoint (start afresh if there is none)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="start afresh even if DIR holds a checkpoint"
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="checkpoint and stop once this many epochs are done (time-limited "
        "jobs); --resume continues",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal)",
    )
    kk = p.add_argument_group("kkanji split (--dataset kkanji)")
    kk.add_argument("--test-fraction", type=float, default=None, help="KKanji's test_fraction")
    kk.add_argument("--min-per-class", type=int, default=None, help="KKanji's min_per_class")
    kk.add_argument("--shots", type=int, default=None, help="KKanji's shots")
    kk.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the train/test split (independent of --seed)",
    )
    hp = p.add_argument_group("hyperparameters (override the recipe)")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            hp.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"]
            )
        elif kind.startswith("tuple"):
            hp.add_argument(
                flag, type=_parse_floats, default=None, metavar="F,F,...", help=f.metadata["help"]
            )
        else:
            cast = {"int": int, "str": str}.get(kind, float)
            choices = {
                "model": list_models(),
                "optimizer": ["sgd", "adadelta"],
                "schedule": ["step", "onecycle", "constant"],
                "mixup": list(mixup.MODES),
                "loss": list(mixup.LOSSES),
            }.get(f.name)
            hp.add_argument(flag, type=cast, default=None, choices=choices, help=f.metadata["help"])
    return p


def resolve_recipe(args: argparse.Namespace) -> tuple[str, Recipe]:
    """The recipe named by ``--recipe`` (or implied by ``--model``) with every flag given on
    the command line applied, and mixup's alpha filled in."""
    name = args.recipe or ("cnn" if args.model == "simple_cnn" else "paper")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Recipe)
        if getattr(args, f.name) is not None
    }
    r = dataclasses.replace(RECIPES[name], **overrides)
    if r.alpha is None and r.mixup != "none":
        r = dataclasses.replace(r, alpha=mixup.DEFAULT_ALPHA[r.mixup])
    problems = []
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(r, key) < 1:
            problems.append(f"--{key.replace('_', '-')} must be at least 1")
    if r.lr <= 0:
        problems.append("--lr must be positive")
    if r.weight_decay < 0 or r.momentum < 0:
        problems.append("--weight-decay and --momentum must be >= 0")
    if r.translate < 0:
        problems.append("--translate must be >= 0")
    if r.alpha is not None and r.alpha < 0:
        problems.append("--alpha must be >= 0")
    if not all(0 < m < 1 for m in r.milestones):
        problems.append("--milestones are fractions of the run, each between 0 and 1")
    if not 0 <= r.warmup < 1:
        problems.append("--warmup is a fraction of the run, from 0 to below 1")
    for key in ("limit_train", "limit_test", "stop_after"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            problems.append(f"--{key.replace('_', '-')} must be at least 1")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite exclude each other")
    if problems:
        build_parser().error("; ".join(problems))
    return name, r


# --------------------------------------------------------------------------------------- data


def load_split(args: argparse.Namespace, train: bool) -> Any:
    """One split of ``args.dataset`` as an object with uint8 ``data`` (N x H x W), int64
    ``targets`` and ``classes``, cut to ``--limit-train``/``--limit-test``."""
    options: dict[str, Any] = {"download": args.download}
    if args.dataset != "mnist":
        options["verify"] = args.verify
    if args.dataset == "kkanji":
        kk = {
            "test_fraction": args.test_fraction,
            "min_per_class": args.min_per_class,
            "shots": args.shots,
            "seed": args.split_seed,
        }
        options.update({k: v for k, v in kk.items() if v is not None})
    with warnings.catch_warnings():
        # --no-verify is the user's explicit choice: main() says it once, not per split.
        warnings.filterwarnings("ignore", message=".*verify=False")
        ds = create_dataset(args.dataset, args.root, train=train, **options)
    limit = args.limit_train if train else args.limit_test
    data, targets = torch.as_tensor(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)
    if limit is not None:
        data, targets = data[:limit], targets[:limit]
    return SimpleNamespace(data=data, targets=targets, classes=list(ds.classes))


# ---------------------------------------------------------------------- optimiser and schedule


def build_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """SGD or Adadelta over every parameter, as the recipe says."""
    if r.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=r.lr,
            momentum=r.momentum,
            nesterov=r.nesterov and r.momentum > 0,
            weight_decay=r.weight_decay,
        )
    if r.optimizer == "adadelta":
        return torch.optim.Adadelta(
            model.parameters(), lr=r.lr, rho=r.rho, eps=r.eps, weight_decay=r.weight_decay
        )
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, r: Recipe) -> float:
    """Multiplier of the peak lr before optimiser step ``step`` (0-based)."""
    if r.schedule == "constant":
        return 1.0
    if r.schedule == "step":
        # Per epoch, as the reference adjusts it; milestones are fractions of the run.
        epoch = step // steps_per_epoch
        return r.gamma ** sum(epoch >= round(m * r.epochs) for m in r.milestones)
    if r.schedule == "onecycle":
        total = r.epochs * steps_per_epoch
        warm = max(1, round(r.warmup * total))
        if step < warm:
            return (step + 1) / warm
        # Down to 1/(total - warm + 1) on the last step: no step is wasted at lr 0.
        return max(0.0, (total - step) / (total - warm + 1))
    raise ValueError(f"unknown schedule {r.schedule!r}")


# ------------------------------------------------------------------------------ run machinery


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
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


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step and checkpoint; a second
    one aborts at once (the last checkpoint stays)."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C reaches the
        # main thread anyway.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: Any) -> None:
        if self._installed:  # None: a handler set outside Python; the default is closest
            signal.signal(
                signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous
            )


def _sync(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _git_commit() -> dict[str, Any]:
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    r: Recipe,
    device: torch.device,
    stop: _StopRequest | None = None,
) -> dict[str, float] | None:
    """Test loss (cross-entropy), top-1 and balanced accuracy; None if a stop was requested."""
    model.eval()
    preds = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        if stop is not None and stop.requested:
            return None
        if r.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=r.amp and device.type == "cuda"):
            logits = model(x)
        # Written out rather than F.cross_entropy: nll_loss has no deterministic CUDA kernel.
        log_p = torch.log_softmax(logits.float(), dim=1)
        loss_sum -= log_p.gather(1, y[:, None]).sum().double()
        preds.append(logits.argmax(1))
    pred, target = torch.cat(preds).cpu(), loader.targets.cpu()
    return {
        "test_loss": loss_sum.item() / len(target),
        "test_accuracy": accuracy(pred, target),
        "test_balanced_accuracy": balanced_accuracy(pred, target),
    }


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train, evaluate after every epoch, write ``results.json`` and a
    checkpoint to the output folder each epoch, and return the results dict.

    A first Ctrl-C stops after the current step with a checkpoint (``"interrupted": True`` in
    the results); ``--resume`` continues from it.
    """
    wall_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe_name, r = resolve_recipe(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    on_cuda = device.type == "cuda"
    out = Path(args.out or f"runs/{args.dataset}-{recipe_name}-{r.model}-{r.mixup}-seed{args.seed}")
    config: dict[str, Any] = {"recipe": recipe_name, **dataclasses.asdict(r)}
    config["milestones"] = list(r.milestones)
    config.update({k: v for k, v in vars(args).items() if k not in config})
    config.update(
        out=str(out), amp_active=r.amp and on_cuda, channels_last_active=r.channels_last and on_cuda
    )

    ckpt_path = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if ckpt_path.exists():
        if args.resume:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            changed = {
                k
                for k in set(config) | set(state["config"])
                if k not in _RESUMABLE_CHANGES and config.get(k) != state["config"].get(k)
            }
            if changed:
                raise TrainError(
                    f"{ckpt_path} was written by a run with other settings: "
                    + ", ".join(
                        f"{k}={state['config'].get(k)!r} (now {config.get(k)!r})"
                        for k in sorted(changed)
                    )
                    + ". Resume with the same settings, or pick another --out."
                )
        elif not args.overwrite:
            raise TrainError(
                f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                "--overwrite to start again, or another --out"
            )
    elif args.resume:
        print(f"no checkpoint in {out}; starting from scratch", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)

    with _determinism(args.deterministic, device):
        # ---- data: the whole split on the device, batches cast and augmented there
        if not args.verify and args.dataset != "mnist":
            print("warning: --no-verify: checksums are not checked", file=sys.stderr)
        train_set, test_set = load_split(args, train=True), load_split(args, train=False)
        num_classes = len(train_set.classes)
        img_size = int(train_set.data.shape[-1])
        in_chans = 1 if train_set.data.dim() == 3 else int(train_set.data.shape[1])
        train_loader = TensorLoader(
            train_set, r.batch_size, shuffle=True, device=device, drop_last=True, seed=args.seed
        )
        test_loader = TensorLoader(test_set, r.eval_batch_size, shuffle=False, device=device)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise TrainError(
                f"{len(train_set.data)} training images make no full batch of {r.batch_size}; "
                "lower --batch-size or raise --limit-train"
            )

        # ---- model, optimiser, schedule, and the random streams of training
        torch.manual_seed(args.seed)  # initialisation and dropout
        model = create_model(r.model, num_classes, in_chans=in_chans, img_size=img_size)
        model = model.to(device)
        if r.channels_last and on_cuda:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, r)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps_per_epoch, r)
        )
        gen = torch.Generator(device=device)  # translations and mixup permutations
        gen.manual_seed(args.seed + 1)
        rng = np.random.default_rng(args.seed + 2)  # mixup lambda and layer
        forward = torch.compile(model) if r.compile else model
        layers = tuple(getattr(model, "mix_layers", (0,)))

        history: list[dict[str, Any]] = []
        start_epoch, skip = 0, 0
        carry = {"loss_sum": 0.0, "seen": 0, "train_seconds": 0.0}
        spent = {
            "wall_seconds": 0.0,
            "device_seconds": 0.0,
            "train_seconds": 0.0,
            "train_images": 0,
        }
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            train_loader.load_state_dict(state["loader"])
            gen.set_state(state["rng"]["train"])
            rng.bit_generator.state = state["rng"]["numpy"]
            torch.set_rng_state(state["rng"]["torch"])
            if on_cuda and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            history, spent, carry = state["history"], state["spent"], state["carry"]
            start_epoch, skip = state["epoch"], state["step"]
            print(f"resuming {out} at epoch {start_epoch + 1}, step {skip}", file=sys.stderr)

        def checkpoint(epoch: int, step: int, loader_state: dict) -> None:
            """Everything needed to continue exactly where the run stands."""
            payload = {
                "config": config,
                "epoch": epoch,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader": loader_state,
                "history": history,
                "spent": spent,
                "carry": carry,
                "rng": {
                    "train": gen.get_state(),
                    "numpy": rng.bit_generator.state,
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if on_cuda else [],
                },
            }
            atomic_write(ckpt_path, lambda fh: torch.save(payload, fh))

        def results(finished: bool, interrupted: bool) -> dict[str, Any]:
            """The results dict (and results.json) as the run stands."""
            last = history[-1] if history else {}
            best = max(history, key=lambda e: e["test_accuracy"], default={})
            best_bal = max(history, key=lambda e: e["test_balanced_accuracy"], default={})
            res = {
                "config": config,
                "dataset": args.dataset,
                "model": r.model,
                "num_classes": num_classes,
                "num_train": len(train_set.data),
                "num_test": len(test_set.data),
                "image_size": img_size,
                "parameters": sum(p.numel() for p in model.parameters()),
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
                "device": _device_name(device),
                "device_type": device.type,
                "torch_version": torch.__version__,
                "seed": args.seed,
                **_git_commit(),
                "finished": finished,
                "interrupted": interrupted,
                "checkpoint": str(ckpt_path),
            }
            text = json.dumps(res, indent=2).encode()
            atomic_write(out / RESULTS, text)
            return res

        session_start = wall_start

        def account_wall() -> None:
            nonlocal session_start
            now = time.perf_counter()
            spent["wall_seconds"] += now - session_start
            session_start = now

        if start_epoch >= r.epochs:
            print(f"{out}: all {r.epochs} epochs are done already", file=sys.stderr)
            account_wall()
            return results(finished=True, interrupted=False)

        cpu_probe = None if on_cuda else (0, 0.0)  # steps timed, seconds, for the estimate
        total_steps = r.epochs * steps_per_epoch

        # ---- the loop
        with _StopRequest() as stop:
            for epoch in range(start_epoch, r.epochs):
                loader_state = train_loader.state_dict()  # this epoch's order is drawn from it
                model.train()
                t0 = _sync(device)
                bar = tqdm(
                    itertools.islice(iter(train_loader), skip, None),
                    total=steps_per_epoch,
                    initial=skip,
                    desc=f"epoch {epoch + 1}/{r.epochs}",
                    leave=False,
                    disable=None if args.progress is None else not args.progress,  # None: a tty
                    unit="batch",
                )
                loss_sum = torch.tensor(carry["loss_sum"], dtype=torch.float64, device=device)
                seen = carry["seen"]
                step = skip
                for x, y in bar:
                    t_step = time.perf_counter()
                    x = random_translate(x, r.translate, gen)
                    if r.channels_last and on_cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    plan = mixup.draw(r.mixup, r.alpha or 0.0, len(y), layers, rng, gen, device)
                    with torch.autocast(device.type, torch.bfloat16, enabled=r.amp and on_cuda):
                        logits, soft = mixup.mixed_forward(forward, x, y, num_classes, plan)
                    loss = mixup.loss_fn(logits, soft, r.loss)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum += loss.detach().double() * len(y)
                    seen += len(y)
                    step += 1
                    if cpu_probe is not None:
                        cpu_probe = (cpu_probe[0] + 1, cpu_probe[1] + time.perf_counter() - t_step)
                        if cpu_probe[0] == min(3, total_steps):
                            per_step = cpu_probe[1] / cpu_probe[0]
                            left = total_steps - (epoch * steps_per_epoch + step)
                            print(
                                "warning: training on the CPU: "
                                f"{per_step:.2f} s per step of {r.batch_size} images, so the "
                                f"{left} steps left need about {_duration(per_step * left)} "
                                "plus testing. Use a CUDA GPU, or --epochs/--limit-train for "
                                "a quick look.",
                                file=sys.stderr,
                                flush=True,
                            )
                            cpu_probe = None
                    if not bar.disable and step % 25 == 0:
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                    if stop.requested:
                        break
                bar.close()
                t1 = _sync(device)
                carry = {
                    "loss_sum": loss_sum.item(),
                    "seen": seen,
                    "train_seconds": carry["train_seconds"] + t1 - t0,
                }
                spent["train_seconds"] += t1 - t0
                spent["train_images"] += (step - skip) * r.batch_size
                spent["device_seconds"] += t1 - t0
                skip = 0
                metrics = (
                    None if stop.requested else evaluate(forward, test_loader, r, device, stop)
                )
                t2 = _sync(device)
                spent["device_seconds"] += t2 - t1
                if metrics is None:  # Ctrl-C: checkpoint mid-epoch, resume at the next step
                    account_wall()
                    checkpoint(epoch, step, loader_state)
                    print(
                        f"stopped in epoch {epoch + 1} at step {step}/{steps_per_epoch}; "
                        f"checkpoint in {ckpt_path}; continue with --resume",
                        file=sys.stderr,
                    )
                    return results(finished=False, interrupted=True)
                record = {
                    "epoch": epoch + 1,
                    "lr": r.lr * lr_factor((epoch + 1) * steps_per_epoch - 1, steps_per_epoch, r),
                    "train_loss": carry["loss_sum"] / max(carry["seen"], 1),
                    **metrics,
                    "images_per_second": carry["seen"] / max(carry["train_seconds"], 1e-9),
                    "train_seconds": carry["train_seconds"],
                    "test_seconds": t2 - t1,
                }
                history.append(record)
                carry = {"loss_sum": 0.0, "seen": 0, "train_seconds": 0.0}
                print(
                    f"epoch {epoch + 1}/{r.epochs}  train loss {record['train_loss']:.4f}  "
                    f"test loss {record['test_loss']:.4f}  "
                    f"acc {100 * record['test_accuracy']:.2f}%  "
                    f"bal acc {100 * record['test_balanced_accuracy']:.2f}%  "
                    f"{record['images_per_second']:,.0f} img/s",
                    flush=True,
                )
                account_wall()
                checkpoint(epoch + 1, 0, train_loader.state_dict())
                done = epoch + 1 == r.epochs
                if not done and (stop.requested or (args.stop_after or 0) == epoch + 1):
                    print(
                        f"stopped after epoch {epoch + 1}; checkpoint in {ckpt_path}; "
                        "continue with --resume",
                        file=sys.stderr,
                    )
                    return results(finished=False, interrupted=True)
                res = results(finished=done, interrupted=False)
        return res


def run_cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: errors as one line, exit 130 after Ctrl-C."""
    try:
        res = main(argv)
    except (TrainError, DataFilesError, FormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 130 if res["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_cli())
