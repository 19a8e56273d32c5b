"""kmnist_torch: the Kuzushiji datasets (KMNIST, K49, Kuzushiji-Kanji) for PyTorch, with
verified downloads, a device-resident fast path, a CLI and a benchmark trainer.

The names below are imported on first use, so that the torch-free parts (the catalog, the
download layer, ``python -m kmnist_torch available``) start without importing torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

if sys.argv[:1] == ["-m"]:  # `python -m kmnist_torch...` starting: Ctrl-C while torch loads
    from ._io import quiet_start

    quiet_start()

# public name -> module that defines it
_EXPORTS = {
    "K49": "data.mnist",
    "MNIST": "data.mnist",
    "KMNIST": "data.mnist",
    "create_dataset": "data.registry",
    "list_datasets": "data.registry",
    "KKanji": "data.kkanji.dataset",
    "TensorLoader": "data.loader",
    "create_model": "models.registry",
    "load_model": "models.modelfile",
    "list_models": "models.registry",
    "knn_predict": "models.knn",
    "DataFilesError": "errors",
    "default_root": "download.sources",
    "mirrors": "download.sources",
    "DownloadError": "errors",
    "FetchConfig": "settings",
    "FormatError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kmnist_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
