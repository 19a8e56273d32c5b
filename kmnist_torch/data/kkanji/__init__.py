"""Kuzushiji-Kanji: 3,832 kanji classes, 140,424 images of 64x64, shipped as one tar of PNGs
with no published checksum and no official train/test split.

- :mod:`.archive`: the tar is downloaded from the mirrors, its size and sha256 recorded at
  first use and checked on every later use, and it is extracted safely (only
  ``kkanji2/U+<hex>/<name>.png`` regular files that are 64x64 8-bit grayscale PNGs, into a
  temporary folder renamed into place);
- :mod:`.cache`: the extracted tree is checked (3,832 classes, 140,424 images) and decoded once
  into a uint8 ``.npy`` cache keyed on a fingerprint of the tree, so later constructions touch
  no PNG;
- :mod:`.split`: splits are stratified and deterministic: they depend only on the arguments
  and the file names, never on the order the filesystem lists them or on the NumPy version;
- :mod:`.dataset`: the :class:`KKanji` class.
"""
