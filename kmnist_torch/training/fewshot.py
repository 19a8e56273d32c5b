"""Few-shot evaluation: episodes drawn from a set of classes, each scored by nearest class
mean on features (Prototypical Networks' rule: a query goes to the closest support mean),
accuracy per episode, and the mean with its 95% confidence interval.

Features are computed once per image with the embedding in evaluation mode (batch norm on
its running statistics, so an image's features do not depend on the other images of its
episode), then every episode only indexes them: 600 episodes cost little more than one pass
over the classes' images."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.kkanji.fewshot import EpisodeSampler, split_episode
from ..errors import TrainError
from ..models.protonet import prototypes, squared_distances
from ..settings import Progress

EMBED_BATCH = 1024


@dataclass(frozen=True)
class Setting:
    """One evaluation cell's episodes: ``way`` classes, ``shot`` support and ``query`` query
    images per class, ``episodes`` of them."""

    way: int
    shot: int
    query: int
    episodes: int

    @property
    def name(self) -> str:
        """``5-way 1-shot``."""
        return f"{self.way}-way {self.shot}-shot"


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N x H x W) as the embeddings take them: float N x 1 x H x W in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def mean_ci(accuracies: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """The mean of per-episode accuracies and the half-width of its 95% confidence interval,
    ``1.96 * std / sqrt(n)`` with the population standard deviation (``np.std``), as few-shot
    papers report it (Chen et al. 2019's code)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.size == 0:
        raise ValueError("no episodes to average")
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(acc.size))


def class_members(
    targets: torch.Tensor, classes: Sequence[int], usable: torch.Tensor | None = None
) -> torch.Tensor:
    """The indices of the images of ``classes`` (those ``usable`` allows), in index order."""
    wanted = torch.zeros(int(targets.max()) + 1 if len(targets) else 1, dtype=torch.bool)
    wanted[torch.as_tensor(list(classes), dtype=torch.long)] = True
    keep = wanted[targets.cpu()]
    if usable is not None:
        keep &= usable.cpu()
    return torch.nonzero(keep).flatten()


def eligible(labels: torch.Tensor, classes: Sequence[int], need: int) -> list[int]:
    """The classes of ``classes`` with at least ``need`` images in ``labels``."""
    counts = torch.bincount(labels.cpu(), minlength=max(classes, default=0) + 1)
    return [c for c in classes if int(counts[c]) >= need]


def require_classes(
    labels: torch.Tensor, classes: Sequence[int], setting: Setting, part: str
) -> None:
    """A :class:`TrainError` unless every class of ``classes`` has ``shot + query`` images
    and there are at least ``way`` classes (the novel classes are the benchmark: none is left
    out quietly)."""
    need = setting.shot + setting.query
    ok = eligible(labels, classes, need)
    if len(ok) < len(classes):
        raise TrainError(
            f"{setting.name} with {setting.query} queries needs {need} images per class; "
            f"{len(classes) - len(ok)} of the {len(classes)} {part} classes have fewer: "
            "ask for fewer --shots or --queries"
        )
    if len(classes) < setting.way:
        raise TrainError(
            f"{setting.name} needs {setting.way} {part} classes, the partition has "
            f"{len(classes)}: ask for fewer --ways"
        )


def draw_episodes(
    labels: torch.Tensor,
    classes: Sequence[int],
    setting: Setting,
    seed: int,
    ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The seeded episodes of ``setting`` over ``classes``: for each, the indices (into
    ``labels``) of its images, class by class, each class's support then its queries.
    ``ids``: the dataset indices of ``labels`` (a part of the dataset), so the episodes are
    the dataset's own (:class:`EpisodeSampler`'s ``ids``)."""
    sampler = EpisodeSampler(
        labels.cpu(), list(classes), setting.way, setting.shot, setting.query,
        setting.episodes, seed=seed, ids=None if ids is None else ids.cpu(),
    )  # fmt: skip
    return [torch.as_tensor(idx, dtype=torch.long) for idx in sampler]


def used_rows(*episode_lists: list[torch.Tensor]) -> torch.Tensor:
    """The images (sorted indices) that any of the episodes use: the only ones whose
    features are needed."""
    every = [idx for episodes in episode_lists for idx in episodes]
    return torch.unique(torch.cat(every)) if every else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def embed_all(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
    progress: str | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features (float32, N x D, on ``device``) of uint8 ``images`` (N x H x W), computed in
    batches with a module ``embed`` in evaluation mode (put back as it was afterwards). With
    ``rows``, only those images' features are computed; the other rows are 0."""
    module = embed if isinstance(embed, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    rows = torch.arange(len(images)) if rows is None else rows.cpu()
    out = None
    bar = Progress(progress or "features", math.ceil(len(rows) / EMBED_BATCH), "batch",
                   enabled=progress is not None)  # fmt: skip
    try:
        for start in range(0, len(rows), EMBED_BATCH):
            part = rows[start : start + EMBED_BATCH]
            feats = embed(to_input(images[part].to(device))).flatten(1).float()
            if out is None:
                out = torch.zeros(len(images), feats.shape[1], device=device)
            out[part.to(device)] = feats
            bar.update(1, len(part))
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    return out if out is not None else torch.empty(len(images), 0, device=device)


@torch.no_grad()
def score(
    features: torch.Tensor,
    labels: torch.Tensor,
    episodes: list[torch.Tensor],
    setting: Setting,
) -> np.ndarray:
    """The accuracy of nearest class mean on each episode (``features`` and ``labels``
    indexed as the episodes' indices are)."""
    accs = np.empty(len(episodes), dtype=np.float64)
    labels = labels.to(features.device)
    for e, idx in enumerate(episodes):
        index = idx.to(features.device)
        sx, sy, qx, qy = split_episode(
            features[index], labels[index], setting.way, setting.shot, setting.query
        )
        dist = squared_distances(qx, prototypes(sx, sy.to(sx.device), setting.way))
        accs[e] = (dist.argmin(1) == qy.to(dist.device)).double().mean().item()
    return accs


def episode_accuracies(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    setting: Setting,
    seed: int,
) -> np.ndarray:
    """The accuracy of nearest class mean on each of ``setting.episodes`` seeded episodes.

    Args:
        features: N x D features of the images that may be drawn.
        labels: their N class labels (global class indices).
        classes: the classes episodes are drawn from.
        setting: way, shot, query and the number of episodes.
        seed: the episodes' seed (the same for every method: paired episodes).
    """
    return score(features, labels, draw_episodes(labels, classes, setting, seed), setting)


def evaluate_cell(
    features: torch.Tensor, labels: torch.Tensor, episodes: list[torch.Tensor], setting: Setting
) -> dict[str, Any]:
    """One table cell: mean accuracy and 95% CI over the setting's episodes, with the time
    the episodes took (features already computed)."""
    start = time.perf_counter()
    mean, ci = mean_ci(score(features, labels, episodes, setting))
    return {
        "way": setting.way,
        "shot": setting.shot,
        "query": setting.query,
        "episodes": setting.episodes,
        "mean": mean,
        "ci95": ci,
        "seconds": round(time.perf_counter() - start, 3),
    }
