"""Where the benchmarks find the real Kuzushiji files: ``../shared/data/real`` beside the
checkout, when it is there. The one place the benchmarks name that path (the package never does).
Imported as ``import _shared``: a script's own folder is on ``sys.path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
KMNIST = REAL / "kmnist"
KKANJI = REAL / "kkanji"


def real_kmnist_test_npz() -> tuple[Path, Path] | None:
    """(images, labels) npz files of the real KMNIST test split, or None where absent."""
    images, labels = KMNIST / "kmnist-test-imgs.npz", KMNIST / "kmnist-test-labels.npz"
    return (images, labels) if images.is_file() and labels.is_file() else None


def fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new Python process (multiprocessing's spawn), its result returned.
    Each side of a training comparison then starts as a user's own script would: torch's
    default threads, and the C library's malloc as the process finds it
    (kmnist_torch.training.cpu tunes it, process-wide, for the side that trains with the
    package), with nothing left over from the other side."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
