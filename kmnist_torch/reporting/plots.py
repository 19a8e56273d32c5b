"""The pictures a user looks at after training, drawn with matplotlib (off-screen, Agg):
training curves, the confusion matrix (or the most-confused pairs for thousands of classes),
and a grid of misclassified images. Every figure has a fixed size in pixels (the ``*_SIZE``
constants) and is written atomically."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .._io import atomic_write
from . import fonts

DPI = 100
CURVES_SIZE = (1100, 420)
# Up to this many classes the confusion matrix is drawn whole; above, the most-confused pairs.
CONFUSION_MAX_CLASSES = 60
TOP_PAIRS = 30
ERRORS_MAX = 64  # mistakes shown, the most confident first
ERRORS_COLUMNS = 8


def confusion_size(num_classes: int) -> tuple[int, int]:
    """The confusion picture's width and height in pixels."""
    if num_classes > CONFUSION_MAX_CLASSES:
        return (900, 900)
    side = 700 if num_classes <= 12 else 1300
    return (side, side - 60)


def errors_size(n_errors: int) -> tuple[int, int]:
    """The errors grid's width and height in pixels for ``n_errors`` mistakes."""
    rows = max(1, -(-min(n_errors, ERRORS_MAX) // ERRORS_COLUMNS))
    return (ERRORS_COLUMNS * 130, rows * 150 + 60)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps a user's backend if set
    import matplotlib.pyplot as plt

    return plt


def _font_props(size: float | None = None):
    from matplotlib.font_manager import FontProperties

    path = fonts.cjk_font_path()
    return (FontProperties(fname=str(path), size=size) if path else FontProperties(size=size)), path


def _save(fig: Any, out: str | os.PathLike) -> None:
    atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=DPI))
    _pyplot().close(fig)


def _figure(size: tuple[int, int], **kw: Any) -> tuple[Any, Any]:
    return _pyplot().subplots(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, **kw)


def plot_curves(history: Sequence[dict[str, Any]], out: str | os.PathLike, title: str = "") -> None:
    """Write :func:`curves_figure` to ``out`` (a PNG of :data:`CURVES_SIZE` pixels)."""
    _save(curves_figure(history, title), out)


def curves_figure(history: Sequence[dict[str, Any]], title: str = "") -> Any:
    """The training curves against the epoch (whole-number ticks), like with like.

    Left: cross-entropy of the model in eval mode on the test set and on a fixed sample of
    training images, both unaugmented and unmixed (``train_sample_loss``, recorded since
    epoch records have it), and, on its own right-hand axis, the training objective as
    recorded (``train_loss``: BCE on the softmax of mixed batches for the mixup recipes,
    named by ``train_objective``), which is not comparable with the test loss. Right: top-1
    and balanced test accuracy, and the training sample's top-1.

    Args:
        history: ``results.json``'s ``epochs``.
        title: above both panels (the run's folder, say).

    Returns:
        The matplotlib figure.
    """
    epochs = [e["epoch"] for e in history]
    fig, (loss_ax, acc_ax) = _figure(CURVES_SIZE, ncols=2)
    kw = {"marker": "o" if len(epochs) < 30 else None}
    sampled = all(e.get("train_sample_loss") is not None for e in history)
    if sampled:
        loss_ax.plot(
            epochs, [e["train_sample_loss"] for e in history], label="train (sample)", **kw
        )
    loss_ax.plot(epochs, [e["test_loss"] for e in history], label="test", **kw)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy, eval mode, clean images",
                title="loss")  # fmt: skip
    objective = history[-1].get("train_objective", "the training batches' loss")
    obj_ax = loss_ax.twinx()
    obj_ax.plot(epochs, [e["train_loss"] for e in history], color="0.5", linestyle="--",
                label=f"training objective (right axis):\n{objective}", **kw)  # fmt: skip
    obj_ax.set_ylabel("training objective", color="0.4")
    lines = loss_ax.get_lines() + obj_ax.get_lines()
    loss_ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    for key, name in (("test_accuracy", "test top-1"), ("test_balanced_accuracy", "test balanced")):
        acc_ax.plot(epochs, [100 * e[key] for e in history], label=name, **kw)
    if all(e.get("train_sample_accuracy") is not None for e in history):
        acc_ax.plot(epochs, [100 * e["train_sample_accuracy"] for e in history],
                    label="train (sample) top-1", linestyle=":", **kw)  # fmt: skip
    last = history[-1]
    acc_ax.set(
        xlabel="epoch",
        ylabel="accuracy (%)",
        title=f"test accuracy (last: {100 * last['test_accuracy']:.2f}% top-1, "
        f"{100 * last['test_balanced_accuracy']:.2f}% balanced)",
    )
    acc_ax.legend(fontsize=8)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        _epoch_ticks(ax, epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _epoch_ticks(ax: Any, epochs: Sequence[int]) -> None:
    """Whole-number epoch ticks: each epoch while there are few, else whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    if len(epochs) <= 12:
        ax.set_xticks(list(epochs))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _labels(chars: Sequence[str], codepoints: Sequence[str], path: Any) -> list[str]:
    return [fonts.label(c, cp, path) for c, cp in zip(chars, codepoints)]


def plot_confusion(
    matrix: np.ndarray,
    chars: Sequence[str],
    codepoints: Sequence[str],
    out: str | os.PathLike,
    title: str = "",
) -> None:
    """The confusion matrix, rows normalised to recall (true class down, predicted across),
    labelled with the characters; for more than :data:`CONFUSION_MAX_CLASSES` classes, the
    :data:`TOP_PAIRS` most frequent (true, predicted) mistakes as bars instead.

    Args:
        matrix: K x K counts, ``matrix[true, predicted]``.
        chars: the characters, in class order.
        codepoints: ``"U+XXXX"`` per class (labels where the font lacks a glyph).
        out: the PNG to write (:func:`confusion_size` pixels).
        title: the figure's title.
    """
    matrix = np.asarray(matrix)
    k = len(matrix)
    size = confusion_size(k)
    if k > CONFUSION_MAX_CLASSES:
        _plot_pairs(matrix, chars, codepoints, out, size, title)
        return
    props, path = _font_props(12 if k <= 12 else 8)
    names = _labels(chars, codepoints, path)
    support = matrix.sum(1, keepdims=True)
    recall = matrix / np.maximum(support, 1)
    fig, ax = _figure(size)
    im = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, fontproperties=props)
    ax.set_yticklabels(names, fontproperties=props)
    ax.set(xlabel="predicted", ylabel="true")
    if k <= 12:  # room for the counts in the cells
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if recall[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    _save(fig, out)


def _plot_pairs(matrix, chars, codepoints, out, size, title) -> None:
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:TOP_PAIRS]
    pairs = [(int(i), int(j)) for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j]]
    props, path = _font_props(10)
    fig, ax = _figure(size)
    if pairs:
        support = matrix.sum(1)
        names = [
            f"{fonts.label(chars[i], codepoints[i], path)} → "
            f"{fonts.label(chars[j], codepoints[j], path)}"
            for i, j in pairs
        ]
        counts = [off[i, j] for i, j in pairs]
        y = np.arange(len(pairs))[::-1]
        ax.barh(y, counts, color="tab:red")
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontproperties=props)
        for yi, (i, _), c in zip(y, pairs, counts):
            ax.text(c, yi, f" {c} of {support[i]}", va="center", fontsize=8)
        ax.set_xlabel("test images of the true class predicted as the other")
    else:
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or f"most-confused pairs (true → predicted) of {len(matrix)} classes")
    fig.tight_layout()
    _save(fig, out)


def plot_errors(
    images: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int],
    prob: Sequence[float],
    chars: Sequence[str],
    codepoints: Sequence[str],
    out: str | os.PathLike,
    title: str = "",
) -> None:
    """A grid of misclassified images, each titled ``true → predicted probability``.

    Args:
        images: the mistakes, uint8 or float N x H x W (white ink on black), in the order to
            show; the first :data:`ERRORS_MAX` are drawn.
        true: their true classes.
        pred: their predicted classes.
        prob: the probability given to the prediction.
        chars: the characters, in class order.
        codepoints: ``"U+XXXX"`` per class.
        out: the PNG to write (:func:`errors_size` pixels).
        title: the figure's title.
    """
    n = min(len(images), ERRORS_MAX)
    size = errors_size(n)
    rows = max(1, -(-n // ERRORS_COLUMNS))
    props, path = _font_props(12)
    fig, axes = _figure(size, nrows=rows, ncols=ERRORS_COLUMNS, squeeze=False)
    for idx, ax in enumerate(axes.flat):
        ax.axis("off")
        if idx >= n:
            continue
        ax.imshow(np.asarray(images[idx]), cmap="gray", vmin=0, vmax=_peak(images))
        t, p = int(true[idx]), int(pred[idx])
        ax.set_title(
            f"{fonts.label(chars[t], codepoints[t], path)} → "
            f"{fonts.label(chars[p], codepoints[p], path)} {prob[idx]:.2f}",
            fontproperties=props,
        )
    if n == 0:
        axes[0, 0].text(0, 0.5, "no mistakes", transform=axes[0, 0].transAxes)
    fig.suptitle(title or "mistakes: true → predicted (probability)")
    fig.tight_layout()
    _save(fig, out)


def _peak(images: np.ndarray) -> float:
    return 255.0 if np.asarray(images).dtype == np.uint8 else 1.0
