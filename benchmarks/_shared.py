"""Where the benchmarks find the real Kuzushiji files: ``../shared/data/real`` beside the
checkout, when it is there. The one place the benchmarks name that path (the package never does).
Imported as ``import _shared``: a script's own folder is on ``sys.path``."""

from __future__ import annotations

from pathlib import Path

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
KMNIST = REAL / "kmnist"
KKANJI = REAL / "kkanji"


def real_kmnist_test_npz() -> tuple[Path, Path] | None:
    """(images, labels) npz files of the real KMNIST test split, or None where absent."""
    images, labels = KMNIST / "kmnist-test-imgs.npz", KMNIST / "kmnist-test-labels.npz"
    return (images, labels) if images.is_file() and labels.is_file() else None
