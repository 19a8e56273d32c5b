"""Training the few-shot embeddings on the base classes, and their model files.

- ``protonet``: Prototypical Networks (Snell et al. 2017) trained episodically: Adam, the
  learning rate halved every ``lr_halve_every`` episodes (the paper: 1e-3, every 2,000),
  ``train_way``-way ``train_shot``-shot episodes with ``train_query`` queries per class.
- ``baseline``: Conv-4 with a linear head over the base classes, trained with cross-entropy on
  their images (Chen et al. 2019's "Baseline", SimpleShot's nearest class mean without its
  feature normalisation); its Conv-4 features are then used with nearest class mean.

Both check the validation classes ``val_checks`` times, evenly spaced, and keep the weights
of the best check (the first one on a tie): the validation classes pick the checkpoint and
are never trained on. A model file (``OUT/<method>.pt``) records the settings it was trained
with; a rerun with the same settings loads it instead of training again."""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .._io import atomic_write, read_regular
from ..data.kkanji.fewshot import EpisodeSampler, split_episode
from ..errors import DivergedError, ModelFileError, TrainError
from ..models.conv4 import Classifier, Conv4
from ..models.protonet import protonet_logits
from ..settings import Progress
from .fewshot import (
    Setting,
    draw_episodes,
    eligible,
    embed_all,
    mean_ci,
    score,
    to_input,
    used_rows,
)

MODEL_FORMAT = "kmnist_torch-fewshot-model-v1"
MODEL_MAX_BYTES = 256 << 20
TRAINED = ("protonet", "baseline")


@dataclass
class Budget:
    """What training costs: every value has a flag of the same name (``--train-episodes``)."""

    train_way: int = 20
    train_shot: int = 5
    train_query: int = 5
    train_episodes: int = 2000
    lr: float = 1e-3
    lr_halve_every: int = 2000
    distance: str = "squared"
    base_steps: int = 2000
    base_batch: int = 128
    base_lr: float = 1e-3
    val_way: int = 5
    val_shot: int = 5
    val_query: int = 15
    val_episodes: int = 100
    val_checks: int = 5

    def of(self, method: str) -> dict[str, Any]:
        """The values ``method``'s training depends on."""
        keep = ("train_", "lr", "distance") if method == "protonet" else ("base_",)
        return {k: v for k, v in asdict(self).items() if k.startswith(keep + ("val_",))}

    @property
    def val_setting(self) -> Setting:
        """The validation episodes."""
        return Setting(self.val_way, self.val_shot, self.val_query, self.val_episodes)


class Part(NamedTuple):
    """Some classes' images: uint8 ``images`` (N x S x S), their global ``labels``, the
    ``classes`` (global indices) and the images' dataset ``index`` (increasing; None: the
    images are the dataset), which keys the episodes' image ranks."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[int]
    index: torch.Tensor | None = None


def val_classes(val: Part, setting: Setting) -> list[int]:
    """The validation classes with enough images for ``setting``; a :class:`TrainError`
    when fewer than its way."""
    classes = eligible(val.labels, val.classes, setting.shot + setting.query)
    if len(classes) < setting.way:
        raise TrainError(
            f"validation needs {setting.way} classes with {setting.shot + setting.query} "
            f"images, the partition's validation classes have {len(classes)}: ask for a "
            "smaller --val-way, --val-shot or --val-query"
        )
    return classes


def train_classes(base: Part, b: Budget) -> list[int]:
    """The base classes protonet's episodes can draw (those with ``train_shot +
    train_query`` images); a :class:`TrainError` when fewer than ``train_way``."""
    classes = eligible(base.labels, base.classes, b.train_shot + b.train_query)
    if len(classes) < b.train_way:
        raise TrainError(
            f"protonet: {b.train_way}-way training needs {b.train_way} base classes with "
            f"{b.train_shot + b.train_query} images, there are {len(classes)}: ask for a "
            "smaller --train-way, --train-shot or --train-query"
        )
    return classes


def preflight(base: Part, val: Part, b: Budget, methods: list[str]) -> None:
    """Every check the trainers of ``methods`` would make on the data, made before any
    training starts: a run that cannot finish says so at once."""
    if any(m in TRAINED for m in methods):
        val_classes(val, b.val_setting)
        if not len(base.labels):
            raise TrainError("the partition has no base-class images to train on")
    if "protonet" in methods:
        train_classes(base, b)


def check_points(total: int, checks: int) -> set[int]:
    """The steps (1-based) after which validation runs: ``checks`` evenly spaced, the last
    one at ``total``."""
    checks = max(1, min(checks, total))
    return {math.ceil(total * (i + 1) / checks) for i in range(checks)}


class Keeper:
    """Validation checks and the best weights so far (the first of equal scores)."""

    def __init__(self, val: Part, setting: Setting, seed: int, device: torch.device) -> None:
        self.val, self.setting, self.seed, self.device = val, setting, seed, device
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, torch.Tensor] | None = None
        self.best_score = -1.0
        # The same episodes at every check, so checks compare; features only of their images.
        self.episodes = draw_episodes(
            val.labels, val_classes(val, setting), setting, seed, val.index
        )
        self.rows = used_rows(self.episodes)

    def check(self, step: int, loss: float, embedding: torch.nn.Module) -> float:
        """Score ``embedding`` on the validation episodes; keep its weights if best."""
        features = embed_all(embedding, self.val.images, self.device, rows=self.rows)
        score_ = mean_ci(score(features, self.val.labels, self.episodes, self.setting))[0]
        self.history.append({"step": step, "loss": round(loss, 6), "val_accuracy": score_})
        if score_ > self.best_score:
            self.best_score = score_
            self.best = {k: v.detach().cpu().clone() for k, v in embedding.state_dict().items()}
        return score_

    def result(self, seconds: float, unit: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The model file's document (without settings)."""
        chosen = max(self.history, key=lambda h: (h["val_accuracy"], -h["step"]))
        return {
            "embedding": self.best,
            "history": self.history,
            "chosen_step": chosen["step"],
            "val_accuracy": chosen["val_accuracy"],
            "unit": unit,
            "train_seconds": round(seconds, 3),
            **extra,
        }


def _finite(loss: torch.Tensor, method: str, step: int, flag: str) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise DivergedError(f"{method}: the loss stopped being finite at step {step}: lower {flag}")
    return value


def train_protonet(
    base: Part, val: Part, b: Budget, seed: int, device: torch.device, img_size: int
) -> dict[str, Any]:
    """Episodic ProtoNet training on ``base``; the model file's document."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = Conv4(1, img_size).to(device)
    keeper = Keeper(val, b.val_setting, seed, device)
    classes = train_classes(base, b)
    opt = torch.optim.Adam(model.parameters(), lr=b.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, b.lr_halve_every, gamma=0.5)
    sampler = EpisodeSampler(base.labels, classes, b.train_way, b.train_shot, b.train_query,
                             b.train_episodes, seed=seed, ids=base.index)  # fmt: skip
    images, labels = base.images.to(device), base.labels.to(device)
    checks = check_points(b.train_episodes, b.val_checks)
    with Progress("protonet training", b.train_episodes, "episode") as bar:
        for step, idx in enumerate(sampler, 1):
            model.train()
            index = torch.as_tensor(idx, dtype=torch.long, device=device)
            sx, sy, qx, qy = split_episode(to_input(images[index]), labels[index],
                                           b.train_way, b.train_shot, b.train_query)  # fmt: skip
            logits = protonet_logits(model, sx, sy.to(device), qx, b.train_way,
                                     b.distance == "squared")  # fmt: skip
            loss = F.cross_entropy(logits, qy.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = _finite(loss, "protonet", step, "--lr")
            bar.update(1, len(idx), note=f"loss {value:.3f}")
            if step in checks:
                keeper.check(step, value, model)
    return keeper.result(time.perf_counter() - start, "episode", {})


def train_baseline(
    base: Part, val: Part, b: Budget, seed: int, device: torch.device, img_size: int
) -> dict[str, Any]:
    """Conv-4 + a linear head trained with cross-entropy on the base classes' images; the
    model file's document (the embedding, and the head apart)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    classes = sorted(set(base.labels.tolist()))
    remap = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    remap[torch.as_tensor(classes)] = torch.arange(len(classes))
    images, labels = base.images.to(device), remap[base.labels].to(device)
    embedding = Conv4(1, img_size)
    model = Classifier(embedding, embedding.out_features, len(classes)).to(device)
    keeper = Keeper(val, b.val_setting, seed, device)
    opt = torch.optim.Adam(model.parameters(), lr=b.base_lr)
    gen = torch.Generator().manual_seed(seed)
    batch = min(b.base_batch, len(images))
    order, pos = torch.randperm(len(images), generator=gen), 0
    checks = check_points(b.base_steps, b.val_checks)
    with Progress("baseline training", b.base_steps, "step") as bar:
        for step in range(1, b.base_steps + 1):
            if pos + batch > len(order):  # a new epoch, the last partial batch left out
                order, pos = torch.randperm(len(images), generator=gen), 0
            index = order[pos : pos + batch].to(device)
            pos += batch
            model.train()
            loss = F.cross_entropy(model(to_input(images[index])), labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = _finite(loss, "baseline", step, "--base-lr")
            bar.update(1, batch, note=f"loss {value:.3f}")
            if step in checks:
                keeper.check(step, value, model.embedding)
    head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
    epochs = b.base_steps * batch / len(images)
    extra = {"head": head, "base_classes": len(classes), "epochs": round(epochs, 4)}
    return keeper.result(time.perf_counter() - start, "step", extra)


def save_model(path: Path, method: str, settings: dict[str, Any], doc: dict[str, Any]) -> None:
    """Write a trained method's document atomically (a rerun finds it whole or not at all)."""
    full = {"format": MODEL_FORMAT, "method": method, "settings": settings, **doc}
    atomic_write(path, lambda fh: torch.save(full, fh))


def load_trained(path: Path, method: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The document of ``path`` if it exists, None if not. A file that cannot be read is a
    :class:`ModelFileError`, one trained with other settings a :class:`TrainError`: both say
    to delete it (or use another ``--out``), never train over it unasked."""
    if not os.path.lexists(path):
        return None
    again = f"delete it to train {method} again, or use another --out"
    data = read_regular(path, MODEL_MAX_BYTES, lambda m: ModelFileError(f"{m}: {again}"))
    try:
        doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: torch raises many kinds
        raise ModelFileError(
            f"{path}: not a model file this command wrote ({exc.__class__.__name__}): {again}"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != MODEL_FORMAT
        or doc.get("method") != method
    ):
        raise ModelFileError(f"{path}: not a {method} model file of {MODEL_FORMAT}: {again}")
    theirs = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    if theirs != settings:
        diff = sorted(k for k in set(settings) | set(theirs) if theirs.get(k) != settings.get(k))
        shown = ", ".join(f"{k} {theirs.get(k)!r} (now {settings.get(k)!r})" for k in diff[:3])
        raise TrainError(f"{path} was trained with other settings: {shown}; {again}")
    return doc


def embedding_from(doc: dict[str, Any], img_size: int, device: torch.device) -> Conv4:
    """The trained Conv-4 of a model file's document, in evaluation mode on ``device``."""
    model = Conv4(1, img_size)
    try:
        model.load_state_dict(doc["embedding"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ModelFileError(
            f"the {doc.get('method')} model file's weights do not fit Conv-4 at "
            f"{img_size}x{img_size} ({exc}): delete it to train again"
        ) from None
    return model.to(device).eval()
