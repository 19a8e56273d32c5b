"""Prototypical Networks (Snell et al. 2017): a class's prototype is the mean of its support
features; a query's logits are minus its distances to the prototypes. The paper uses the
squared Euclidean distance (the default here); ``squared=False`` gives the plain Euclidean
distance, as easyfsl's ``PrototypicalNetworks`` (``-torch.cdist``).

With the identity embedding (:func:`flat`), the same function is the nearest-class-mean
baseline on pixels."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Embedding = Callable[[torch.Tensor], torch.Tensor]


def flat(x: torch.Tensor) -> torch.Tensor:
    """The identity embedding: each image's pixels as one vector."""
    return x.flatten(1)


def prototypes(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """The mean feature vector of each class ``0 .. n_way - 1`` (``n_way`` x D).

    Args:
        features: N x D support features.
        labels: N labels in ``0 .. n_way - 1``, each class present at least once.
        n_way: the number of classes.
    """
    labels = labels.to(features.device)
    counts = torch.bincount(labels, minlength=n_way)
    if len(counts) != n_way or not bool((counts > 0).all()):
        raise ValueError(f"support labels must cover 0..{n_way - 1}, got counts {counts.tolist()}")
    # A one-hot matrix product: the sums in one BLAS call (deterministic on every device).
    onehot = torch.nn.functional.one_hot(labels, n_way).to(features.dtype)
    return (onehot.T @ features) / counts.unsqueeze(1).to(features.dtype)


def distance_logits(
    queries: torch.Tensor, protos: torch.Tensor, squared: bool = True
) -> torch.Tensor:
    """Minus the (squared) Euclidean distance of each query (Q x D) to each prototype
    (C x D): Q x C logits. The squared distance is summed from the differences, as the
    paper's code computes it (no ``|a|^2 - 2ab + |b|^2`` cancellation)."""
    if squared:
        return -(queries.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)
    return -torch.cdist(queries, protos)


def squared_distances(queries: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """The squared Euclidean distances (Q x C, float64) of queries to prototypes, for
    evaluation: ``|q|^2 - 2 q.p + |p|^2`` in float64, one matrix product (its cancellation
    error, about 1e-16 of the norms, is far below float32's), ten times faster than summing
    the differences of 20-way 5-shot episodes of pixels; not for training (no float32
    gradients)."""
    q, p = queries.double(), protos.double()
    cross = q @ p.T
    return ((q * q).sum(1, keepdim=True) - 2 * cross + (p * p).sum(1)).clamp_min_(0)


def protonet_logits(
    embed: Embedding | nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    n_way: int,
    squared: bool = True,
) -> torch.Tensor:
    """The logits of ``query_x`` in an episode: support and queries embedded in one pass (as
    the paper's code does: batch norm in training mode sees the whole episode), prototypes
    from the support, minus the distances.

    Args:
        embed: the embedding (Conv-4, or :func:`flat` for nearest class mean on pixels).
        support_x: support images.
        support_y: their labels in ``0 .. n_way - 1``.
        query_x: query images.
        n_way: classes in the episode.
        squared: the paper's squared distance (default) or the plain one.

    Returns:
        len(query_x) x n_way logits.
    """
    features = embed(torch.cat([support_x, query_x]))
    features = features.flatten(1)
    support, query = features[: len(support_x)], features[len(support_x) :]
    return distance_logits(query, prototypes(support, support_y, n_way), squared)
