"""Maintainers: write the digest of a Kuzushiji-Kanji tree, the file the package ships as
``kmnist_torch/data/kkanji/kkanji2.digest.gz`` (see :mod:`kmnist_torch.data.kkanji.digest`).
The shipped one was made from the public copy of the full tree (github
tuanloc782004/Kanji-Handwritten-Recognition, commit 1ee19ee, folder ``kkanji2/``), its 31 copy
artefacts set aside:

    python benchmarks/kkanji_digest.py /path/to/KKanji/kkanji2 \
        kmnist_torch/data/kkanji/kkanji2.digest.gz
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from kmnist_torch.data.kkanji import digest
from kmnist_torch.data.kkanji.tree import scan_tree


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree", help="an extracted kkanji2/ folder")
    p.add_argument("out", help="the digest file to write")
    args = p.parse_args()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its counts are not checked: it is what we describe
        listing = scan_tree(Path(args.tree), verify=False)
    d = digest.compute(listing)
    digest.write(d, Path(args.out))
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {len(d.classes)} classes, {d.total} images, {size} bytes, "
          f"sha256 {d.sha256} ({time.perf_counter() - start:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
