"""What exists: one table describing every official Kuzushiji file and dataset.

Everything else (the dataset classes, the CLI's ``info``, the README table, the checks) reads
this module; nothing repeats it. Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OFFICIAL_BASE = "http://codh.rois.ac.jp/kmnist/dataset/"

LICENSE = "CC BY-SA 4.0"
ATTRIBUTION = (
    '"KMNIST Dataset" (created by CODH), adapted from "Kuzushiji Dataset" '
    "(created by NIJL and others), doi:10.20676/00000341"
)
CITATION = (
    "Tarin Clanuwat, Mikel Bober-Irizar, Asanobu Kitamoto, Alex Lamb, Kazuaki Yamamoto, "
    'David Ha, "Deep Learning for Classical Japanese Literature", arXiv:1812.01718, 2018.'
)

# The 2019-02-05 release removed black and duplicated images; files from before it still float
# around (old clones, old caches) under the same names and URLs.
STALE_RELEASE_DATE = "2019-02-05"


@dataclass(frozen=True)
class LocalFile:
    """A file made from an official one: the idx file inside an idx.gz, as torchvision
    extracts it. Its size always follows from the format; its checksums are known only where
    we could compute them from a real copy of the official file."""

    name: str
    size: int
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its path relative to a mirror base, size and published checksums."""

    path: str  # e.g. "kmnist/t10k-images-idx3-ubyte.gz"
    size: int | None  # None where nothing is published (kkanji.tar)
    md5: str | None
    sha256: str | None = None
    # md5 -> description of known stale versions of this file (same name, older release).
    stale_md5: dict[str, str] = field(default_factory=dict)
    extracted: LocalFile | None = None  # what gunzip makes of it (idx.gz files only)

    @property
    def name(self) -> str:
        """The file name, without the folder."""
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ClassInfo:
    """One class: its index, Unicode codepoint ("U+304A"), character and romaji reading."""

    index: int
    codepoint: str
    char: str
    romaji: str


@dataclass(frozen=True)
class DatasetInfo:
    """Everything known about one dataset, independent of any machine."""

    name: str  # CLI name: "kmnist", "k49", "kkanji"
    title: str
    folder: str  # folder under the root, as torchvision names it
    image_shape: tuple[int, int]
    num_classes: int
    # split -> format -> (images file, labels file); empty for datasets shipped as one archive.
    splits: dict[str, dict[str, tuple[RemoteFile, RemoteFile]]]
    split_sizes: dict[str, int]
    classmap: RemoteFile | None
    classes: tuple[ClassInfo, ...]
    description: str
    archive: RemoteFile | None = None  # KKanji: one tar, no published checksum
    # split -> images per class, as counted in the official label files.
    class_counts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Where the publisher serves the files (each base + RemoteFile.path is a URL).
    bases: tuple[str, ...] = (OFFICIAL_BASE,)
    # Terms of use and how to cite (the Kuzushiji datasets share theirs; MNIST has its own).
    license: str = LICENSE
    attribution: str = ATTRIBUTION
    citation: str = CITATION
    # Other sides the dataset's class can bring its images to (KKanji's ``image_size``: exact
    # 2x2 means), smaller than the published one; a model file of the dataset may take any of
    # :attr:`sizes`, no other.
    smaller_sizes: tuple[int, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        """The image sides a model of this dataset may take: the published one first."""
        return (self.image_shape[0], *self.smaller_sizes)

    def files(self, split: str | None = None, fmt: str | None = None) -> list[RemoteFile]:
        """The official files of this dataset, optionally only one split and/or one format."""
        out: list[RemoteFile] = []
        for s, formats in self.splits.items():
            if split is not None and s != split:
                continue
            for f, pair in formats.items():
                if fmt is not None and f != fmt:
                    continue
                out.extend(pair)
        if split is None and fmt is None:
            if self.classmap is not None:
                out.append(self.classmap)
            if self.archive is not None:
                out.append(self.archive)
        return out

    @property
    def formats(self) -> list[str]:
        """The file formats this dataset is published in ("mnist", "npz")."""
        seen: list[str] = []
        for formats in self.splits.values():
            for f in formats:
                if f not in seen:
                    seen.append(f)
        return seen


# Hepburn readings of the hiragana that occur in KMNIST and K49 (the official class maps give
# only codepoint and character). ゝ is the hiragana iteration mark.
ROMAJI = {
    "あ": "a", "い": "i", "う": "u", "え": "e", "お": "o",
    "か": "ka", "き": "ki", "く": "ku", "け": "ke", "こ": "ko",
    "さ": "sa", "し": "shi", "す": "su", "せ": "se", "そ": "so",
    "た": "ta", "ち": "chi", "つ": "tsu", "て": "te", "と": "to",
    "な": "na", "に": "ni", "ぬ": "nu", "ね": "ne", "の": "no",
    "は": "ha", "ひ": "hi", "ふ": "fu", "へ": "he", "ほ": "ho",
    "ま": "ma", "み": "mi", "む": "mu", "め": "me", "も": "mo",
    "や": "ya", "ゆ": "yu", "よ": "yo",
    "ら": "ra", "り": "ri", "る": "ru", "れ": "re", "ろ": "ro",
    "わ": "wa", "ゐ": "wi", "ゑ": "we", "を": "wo", "ん": "n",
    "ゝ": "iteration mark",
}  # fmt: skip


def _classes(chars: str) -> tuple[ClassInfo, ...]:
    return tuple(ClassInfo(i, f"U+{ord(c):04X}", c, ROMAJI[c]) for i, c in enumerate(chars))


def _f(path: str, size: int | None, md5: str | None, sha256: str | None = None, **kw) -> RemoteFile:
    return RemoteFile(path, size, md5, sha256, **kw)


KMNIST = DatasetInfo(
    name="kmnist",
    title="Kuzushiji-MNIST",
    folder="KMNIST",
    image_shape=(28, 28),
    num_classes=10,
    splits={
        "train": {
            "mnist": (
                _f("kmnist/train-images-idx3-ubyte.gz", 18165135,
                   "bdb82020997e1d708af4cf47b453dcf7",
                   "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                   extracted=LocalFile("train-images-idx3-ubyte", 47040016)),
                _f("kmnist/train-labels-idx1-ubyte.gz", 29497,
                   "e144d726b3acfaa3e44228e80efcd344",
                   "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
                   extracted=LocalFile(
                       "train-labels-idx1-ubyte", 60008, "949e75301f8813e0dc5800dcc320fc52",
                       "2a16eeae62da984b8bd24fa32e31d47291f01dac3fe84d5594f304f71e7d374b")),
            ),
            "npz": (
                _f("kmnist/kmnist-train-imgs.npz", 18384171,
                   "a183fbc01ed9a345513b145673d3d0bb"),
                _f("kmnist/kmnist-train-labels.npz", 29700,
                   "b0e1d240e8afec72b50437fc3bc5908a",
                   "a325c877035602cb9b9ba54f4194a2a1b5f718026a463db5b5e0cdc124c03720"),
            ),
        },
        "test": {
            "mnist": (
                _f("kmnist/t10k-images-idx3-ubyte.gz", 3041136,
                   "5c965bf0a639b31b8f53240b1b52f4d7",
                   "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
                   extracted=LocalFile(
                       "t10k-images-idx3-ubyte", 7840016, "bf305b8cd328700fbc17f5acbc2856d2",
                       "76fbd229ce87db80dd281af5e6670de4ad0e42fb30a7bd643972994c47c1f42e")),
                _f("kmnist/t10k-labels-idx1-ubyte.gz", 5120,
                   "7320c461ea6c1c855c0b718fb2a4b134",
                   "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
                   extracted=LocalFile(
                       "t10k-labels-idx1-ubyte", 10008, "9f55f451c0988b028eccdf7d5cc265ab",
                       "a11dc742be8e781a40a92f53d6a4957e7b7d36df2faa097659131ebfd8fd60c6")),
            ),
            "npz": (
                _f("kmnist/kmnist-test-imgs.npz", 3079479,
                   "dace6de62ca8b90843cc45366337d02e",
                   "692d824896bec8f3c357ebf7a0fe904ed67ac632ce953d0b58f7fbef7bb27d87",
                   stale_md5={"c8fe4d39f842711ac6cc8c1b4be5ee21":
                              "the test-images npz released before the "
                              f"{STALE_RELEASE_DATE} fix"}),
                _f("kmnist/kmnist-test-labels.npz", 5304,
                   "3ae489a79983d0fe386152684e3b5412",
                   "660f13a4705431ea2a6391c41ecbe384cd0d932c595a101ec4f3b8989e785046"),
            ),
        },
    },
    split_sizes={"train": 60000, "test": 10000},
    classmap=_f("kmnist/kmnist_classmap.csv", 151, "899202f6e8dc29a321ac210a03d0f2f1",
                "88ba4be4bd52d986ae100b425d5c28437c81829c87800c5832a2253edc758374"),
    classes=_classes("おきすつなはまやれを"),
    class_counts={"train": (6000,) * 10, "test": (1000,) * 10},
    description="10 hiragana, 7,000 images each (6,000 train / 1,000 test), 28x28 grayscale.",
)  # fmt: skip

K49 = DatasetInfo(
    name="k49",
    title="Kuzushiji-49",
    folder="K49",
    image_shape=(28, 28),
    num_classes=49,
    splits={
        "train": {
            "npz": (
                _f("k49/k49-train-imgs.npz", 66117696, "7ac088b20481cf51dcd01ceaab89d821"),
                _f("k49/k49-train-labels.npz", 164485, "44a8e1b893f81e63ff38d73cad420f7a",
                   "fbfef4750ce9aa70b6072f0bca7daa9e80e2d79b379d5ae923265a63396260e4"),
            ),
        },
        "test": {
            "npz": (
                _f("k49/k49-test-imgs.npz", 10971201, "d352e201d846ce6b94f42c990966f374"),
                _f("k49/k49-test-labels.npz", 27450, "4da6f7a62e67a832d5eb1bd85c5ee448",
                   "299be30ea32c2cc69318f5a5a579ffbffb0a6a1ccff134fb0ca834cd525ad6af"),
            ),
        },
    },
    split_sizes={"train": 232365, "test": 38547},
    classmap=_f("k49/k49_classmap.csv", 697, "f7d0d0391f68bdf0fe4cf160ceb85753",
                "95f5a2cfbfba1721f566059cf77c22808898b63044a5f9a08de9d8a2950eed84"),
    classes=_classes(
        "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわゐゑをんゝ"
    ),
    class_counts={
        "train": (6000, 6000, 6000, 777, 6000, 6000, 6000, 6000, 4714, 6000, 6000, 6000, 6000,
                  4165, 3867, 6000, 2565, 6000, 6000, 6000, 6000, 6000, 2063, 2451, 6000, 6000,
                  5132, 6000, 6000, 1993, 6000, 3060, 1718, 3394, 6000, 6000, 1598, 6000, 6000,
                  6000, 6000, 6000, 2139, 2397, 417, 392, 6000, 6000, 3523),
        "test": (1000, 1000, 1000, 126, 1000, 1000, 1000, 1000, 767, 1000, 1000, 1000, 1000,
                 678, 629, 1000, 418, 1000, 1000, 1000, 1000, 1000, 336, 399, 1000, 1000, 836,
                 1000, 1000, 324, 1000, 498, 280, 552, 1000, 1000, 260, 1000, 1000, 1000, 1000,
                 1000, 348, 390, 68, 64, 1000, 1000, 574),
    },
    description="48 hiragana and one iteration mark, 270,912 images, imbalanced, 28x28 grayscale.",
)  # fmt: skip

# What is and is not verified, shown by `python -m kmnist_torch info kkanji` and in the README.
MNIST = DatasetInfo(
    name="mnist",
    title="MNIST",
    folder="MNIST",
    image_shape=(28, 28),
    num_classes=10,
    splits={
        "train": {
            "mnist": (
                _f("mnist/train-images-idx3-ubyte.gz", 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                   extracted=LocalFile("train-images-idx3-ubyte", 47040016)),
                _f("mnist/train-labels-idx1-ubyte.gz", 28881, "d53e105ee54ea40749a09fcbcd1e9432",
                   extracted=LocalFile("train-labels-idx1-ubyte", 60008)),
            ),
        },
        "test": {
            "mnist": (
                _f("mnist/t10k-images-idx3-ubyte.gz", 1648877, "9fb629c4189551a2d022fa330f9573f3",
                   extracted=LocalFile("t10k-images-idx3-ubyte", 7840016)),
                _f("mnist/t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c",
                   extracted=LocalFile("t10k-labels-idx1-ubyte", 10008)),
            ),
        },
    },
    split_sizes={"train": 60000, "test": 10000},
    classmap=None,
    classes=tuple(
        ClassInfo(i, f"U+{0x30 + i:04X}", str(i), word)
        for i, word in enumerate(
            "zero one two three four five six seven eight nine".split()
        )
    ),
    class_counts={
        "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    },
    description="The handwritten digits, 60,000 train / 10,000 test, 28x28 grayscale: the "
    "baseline the Kuzushiji table compares with (md5s as torchvision publishes them).",
    # torchvision's two sources, in its order; the Kuzushiji host does not serve MNIST.
    bases=("https://ossci-datasets.s3.amazonaws.com/", "http://yann.lecun.com/exdb/"),
    license="CC BY-SA 3.0",
    attribution="THE MNIST DATABASE of handwritten digits, Yann LeCun, Corinna Cortes and "
    "Christopher J.C. Burges, http://yann.lecun.com/exdb/mnist/",
    citation='Yann LeCun, Leon Bottou, Yoshua Bengio, Patrick Haffner, "Gradient-Based '
    'Learning Applied to Document Recognition", Proceedings of the IEEE 86(11):2278-2324, 1998.',
)  # fmt: skip

KKANJI_VERIFICATION_NOTE = (
    "no checksum of kkanji.tar is published, so the tar itself cannot be checked against the "
    "release. Verified: at extraction every member is a regular file kkanji2/U+XXXX/<name>.png "
    "(links, devices, absolute paths and '..' refused), the archive is complete (end-of-archive "
    "marker), and the tree holds 3,832 classes and 140,424 images; at decoding every image is a "
    "64x64 8-bit grayscale PNG. Recorded: the tar's size and sha256 at first use "
    "(KKanji/kkanji.tar.record.json), checked whenever the tar changes and required of every "
    "later download. Not verified: that the first tar is the publisher's own bytes. "
    "verify=False accepts a subset of the tree (with a warning). "
    "A tree with the full counts is also checked image by image against the digest of the full "
    "tree shipped with the package (kkanji2.digest.gz), a mismatch named by its class; copies "
    "named like <name>(1).png holding their sibling's bytes are set aside. The default split "
    "keeps each group of identical images on one side and blank images out of the test part "
    "(python -m kmnist_torch audit kkanji)."
)

KKANJI = DatasetInfo(
    name="kkanji",
    title="Kuzushiji-Kanji",
    folder="KKanji",
    image_shape=(64, 64),
    num_classes=3832,
    splits={},  # one tar and no official split: kmnist_torch.data.kkanji makes a reproducible one
    split_sizes={"all": 140424},
    classmap=None,
    classes=(),  # 3,832 kanji named by the folders of the tar (kkanji2/U+XXXX/)
    description=(
        "3,832 kanji, 140,424 images, 1,768 to 1 per class (815 with one), 64x64 grayscale "
        "PNGs in one tar (about 310 MB) with no published checksum and no official split."
    ),
    archive=RemoteFile("kkanji/kkanji.tar", None, None),
    smaller_sizes=(32, 16),  # KKanji(image_size=...): each halving, by exact 2x2 means
)

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (KMNIST, K49, KKANJI, MNIST)}


def get(name: str) -> DatasetInfo:
    """The catalog entry of a dataset by its CLI name (case-insensitive)."""
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"kuzushijimnist": "kmnist", "kuzushiji49": "k49", "kuzushijikanji": "kkanji"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]
