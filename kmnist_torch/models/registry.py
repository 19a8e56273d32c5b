"""Models by name, as timm builds them: ``create_model(name, num_classes, in_chans)``.

One file per family; this table is the only place a name is bound to a builder.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .preact_resnet import preact18
from .simple_cnn import simple_cnn

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact18": preact18,
    "simple_cnn": simple_cnn,
}


def list_models() -> list[str]:
    """The names :func:`create_model` accepts, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str, num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs
) -> nn.Module:
    """Build a model by name, as ``timm.create_model`` does.

    Args:
        name: a name of :func:`list_models` (``"preact18"``, ``"simple_cnn"``).
        num_classes: size of the output layer (at least 1).
        in_chans: channels of the input images.
        img_size: height and width of the input images.
        **kwargs (Any): passed on to the model's builder.

    Returns:
        The model. Its ``forward(x, mix_layer, lam, perm)`` supports (manifold) mixup at the
        layers listed in its ``mix_layers``.
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
