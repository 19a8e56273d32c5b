"""kmnist_torch: the Kuzushiji datasets (KMNIST, K49, Kuzushiji-Kanji) for PyTorch, with
verified downloads, a device-resident fast path, a CLI and a benchmark trainer."""

from .datasets import K49, KMNIST, DataFilesError, default_root, mirrors
from .fetch import DownloadError, FetchConfig
from .formats import FormatError
from .kkanji import KKanji
from .loader import TensorLoader

__version__ = "0.1.0"

__all__ = [
    "K49",
    "KKanji",
    "KMNIST",
    "DataFilesError",
    "DownloadError",
    "FetchConfig",
    "FormatError",
    "TensorLoader",
    "default_root",
    "mirrors",
    "__version__",
]
