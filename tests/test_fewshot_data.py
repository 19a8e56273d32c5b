"""The few-shot data side of Kuzushiji-Kanji (issue 19, item 4): the base / val / novel
partition (disjoint, covering, seeded, only classes with enough images drawn, published as
JSON with its sha256), the usable images (the audit's blank images and second copies out) and
the episode sampler (class-major layout, no repeats, the same episodes on every machine and in
any order, a DataLoader batch sampler, easyfsl 1.5.0's collate output for the same indices)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import kkanji_files, png_bytes, write_kkanji_tree
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from kmnist_torch.cli import main
from kmnist_torch.data.kkanji.dataset import KKanji
from kmnist_torch.data.kkanji.fewshot import (
    EPISODE_VERSION,
    MIN_IMAGES,
    N_NOVEL,
    N_VAL,
    PARTITION_VERSION,
    EpisodeSampler,
    Partition,
    load_fewshot,
    make_partition,
    split_episode,
    write_partition,
)
from kmnist_torch.data.kkanji.resize import downsample

REPO = Path(__file__).resolve().parent.parent
CPS = [0x4E00 + k for k in range(10)]


# ------------------------------------------------------------------------------ the partition


def test_partition_is_disjoint_covering_and_fixed_by_its_seed():
    counts = [20] * 10
    p0 = make_partition(counts, CPS, seed=0, n_val=2, n_novel=3)
    # Hard-coded: a change of the algorithm (or of its key) must be a new PARTITION_VERSION.
    assert p0 == Partition(base=(0, 1, 3, 7, 9), val=(2, 8), novel=(4, 5, 6))
    assert make_partition(counts, [f"U+{cp:04X}" for cp in CPS], 0, 2, 3) == p0
    p1 = make_partition(counts, CPS, seed=1, n_val=2, n_novel=3)
    assert p1 != p0
    for p in (p0, p1):
        parts = [set(p.base), set(p.val), set(p.novel)]
        assert sum(map(len, parts)) == 10 and set.union(*parts) == set(range(10))
        assert (len(p.val), len(p.novel)) == (2, 3)


def test_partition_follows_the_documented_rank():
    counts = [20] * 10
    key = [hashlib.sha256(f"{PARTITION_VERSION}|7|U+{cp:04X}".encode()).digest() for cp in CPS]
    ranked = sorted(range(10), key=key.__getitem__)
    p = make_partition(counts, CPS, seed=7, n_val=3, n_novel=4)
    assert p.novel == tuple(sorted(ranked[:4])) and p.val == tuple(sorted(ranked[4:7]))


def test_partition_draws_only_classes_with_enough_images_and_ignores_class_order():
    counts = [25, 3, 30, 19, 20, 0, 40, 22, 5, 26]
    eligible = {c for c, n in enumerate(counts) if n >= 20}
    for seed in range(20):
        p = make_partition(counts, CPS, seed, n_val=2, n_novel=3)
        assert set(p.val) | set(p.novel) <= eligible
        assert {1, 3, 5, 8} <= set(p.base)
        # The same classes given in another order: the same codepoints in each part.
        order = np.random.default_rng(seed).permutation(10)
        q = make_partition([counts[i] for i in order], [CPS[i] for i in order], seed, 2, 3)
        assert {CPS[order[c]] for c in q.novel} == {CPS[c] for c in p.novel}
        assert {CPS[order[c]] for c in q.val} == {CPS[c] for c in p.val}
    lower = make_partition(counts, CPS, 0, n_val=2, n_novel=3, min_images=19)
    assert set(lower.val) | set(lower.novel) <= eligible | {3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_val": 3, "n_novel": 4}, "only 6 of the 10 classes have at least min_images=20"),
        ({"n_val": 1, "n_novel": 1, "min_images": 41}, "ask for at most 0 classes"),
        ({"n_val": -1}, "n_val must be at least 0, got -1"),
        ({"n_novel": 0}, "n_novel must be at least 1, got 0"),
        ({"seed": 1.5}, "seed must be a whole number, got 1.5"),
        ({"n_val": True}, "n_val must be a whole number"),
        ({"min_images": 0}, "min_images must be at least 1"),
    ],
)
def test_partition_refuses_what_cannot_be_done_saying_what_can(kwargs, message):
    counts = [25, 3, 30, 19, 20, 0, 40, 22, 5, 26]
    with pytest.raises(ValueError, match=message):
        make_partition(counts, CPS, **kwargs)


def test_partition_refuses_inconsistent_classes_and_an_empty_base():
    with pytest.raises(ValueError, match="9 counts for 10 codepoints"):
        make_partition([20] * 9, CPS, n_val=1, n_novel=1)
    with pytest.raises(ValueError, match="codepoints repeat"):
        make_partition([20] * 10, CPS[:9] + CPS[:1], n_val=1, n_novel=1)
    with pytest.raises(ValueError, match="leaves no base class of the 3: ask for at most 2"):
        make_partition([20] * 3, CPS[:3], n_val=1, n_novel=2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=15), st.integers(-1, 5),
       st.integers(-1, 5), st.integers(-1, 25), st.integers(0, 2**40))  # fmt: skip
def test_partition_invariants_hold_or_a_value_error_says_why(counts, n_val, n_novel, low, seed):
    eligible = {c for c, n in enumerate(counts) if n >= low}
    valid = (n_val >= 0 and n_novel >= 1 and low >= 1 and n_val + n_novel <= len(eligible)
             and n_val + n_novel < len(counts))  # fmt: skip
    try:
        p = make_partition(counts, [0x4E00 + k for k in range(len(counts))], seed,
                           n_val, n_novel, low)  # fmt: skip
    except ValueError:
        assert not valid
        return
    assert valid and (len(p.val), len(p.novel)) == (n_val, n_novel)
    assert sorted(p.base + p.val + p.novel) == list(range(len(counts)))
    assert set(p.val) | set(p.novel) <= eligible
    assert all(list(part) == sorted(part) for part in (p.base, p.val, p.novel))


# ------------------------------------------------------------------------------ the sampler

TINY = [k % 4 for k in range(24)]  # 4 classes of 6 images, interleaved


def test_first_episodes_are_fixed():
    s = EpisodeSampler(TINY, [0, 1, 2, 3], n_way=3, k_shot=2, q_query=1, episodes=3)
    # Hard-coded: a change of the algorithm or its key changes these (and must be announced).
    assert list(s) == [
        [22, 2, 14, 23, 3, 19, 20, 16, 8],
        [7, 15, 23, 8, 20, 16, 22, 14, 2],
        [7, 19, 15, 17, 9, 5, 14, 18, 6],
    ]
    assert s.episode_classes(0) == [2, 3, 0]


def test_episode_follows_the_documented_ranks():
    s = EpisodeSampler(TINY, [0, 1, 2, 3], n_way=2, k_shot=1, q_query=2, episodes=1, seed=5)

    def h(text: str) -> bytes:
        return hashlib.sha256(f"{EPISODE_VERSION}|5|9|{text}".encode()).digest()

    classes = sorted([0, 1, 2, 3], key=lambda c: h(f"class|{c}"))[:2]
    want = []
    for c in classes:
        want += sorted([i for i in range(24) if TINY[i] == c], key=lambda i: h(f"{c}|{i}"))[:3]
    assert s.episode(9) == want


def _check_episode(ep, labels, classes, n, k, q, banned=()):
    assert len(ep) == n * (k + q) and len(set(ep)) == len(ep)  # no image twice
    blocks = np.asarray(labels)[np.asarray(ep)].reshape(n, k + q)
    assert (blocks == blocks[:, :1]).all()  # class-major: one class per block
    assert len(set(blocks[:, 0].tolist())) == n and set(blocks[:, 0].tolist()) <= set(classes)
    assert not set(ep) & set(banned)


def test_episodes_do_not_depend_on_what_was_drawn_before():
    labels = torch.arange(300) % 12
    a = EpisodeSampler(labels, range(1, 12), 5, 3, 4, episodes=30, seed=3)
    drawn = list(a)
    b = EpisodeSampler(labels.numpy(), list(range(11, 0, -1)), 5, 3, 4, episodes=30, seed=3)
    assert b.episode(17) == drawn[17] and b.episode(29) == drawn[29]
    for ep in drawn:
        _check_episode(ep, labels, range(1, 12), 5, 3, 4)
    assert len({tuple(ep) for ep in drawn}) == 30
    # 5-way is the first five classes of the 20-way episode of the same seed and number.
    wide = EpisodeSampler(labels, range(12), 12, 1, 1, episodes=1, seed=3)
    narrow = EpisodeSampler(labels, range(12), 5, 1, 1, episodes=1, seed=3)
    assert wide.episode_classes(4)[:5] == narrow.episode_classes(4)
    assert EpisodeSampler(labels, range(12), 5, 3, 4, 1, seed=4).episode(17) != b.episode(17)


def test_excluded_images_are_never_drawn():
    labels = torch.arange(120) % 6
    banned = set(range(0, 120, 7))
    mask = torch.zeros(120, dtype=torch.bool)
    mask[sorted(banned)] = True
    forms = (sorted(banned), banned, torch.tensor(sorted(banned)), mask, mask.numpy(),
             (i for i in sorted(banned)))  # fmt: skip
    for exclude in forms:
        s = EpisodeSampler(labels, range(6), 4, 5, 10, episodes=40, exclude=exclude)
        for ep in s:
            _check_episode(ep, labels, range(6), 4, 5, 10, banned)
    # 20 images a class, 2 or 3 of them excluded: 17 usable is too few for 5 + 15.
    with pytest.raises(ValueError, match=r"k_shot \+ q_query = 20, but 6 of the classes have "
                       r"fewer usable images: 0 \(17\), 1 \(17\)"):  # fmt: skip
        EpisodeSampler(labels, range(6), 4, 5, 15, episodes=1, exclude=banned)


def test_sampler_is_a_dataloader_batch_sampler():
    labels = torch.arange(60) % 5
    images = torch.arange(60, dtype=torch.float32)[:, None, None].expand(60, 2, 2).clone()
    s = EpisodeSampler(labels, range(5), 3, 2, 3, episodes=4, seed=1)
    loader = DataLoader(TensorDataset(images, labels), batch_sampler=s)
    assert len(loader) == 4
    for e, ((x, y), ep) in enumerate(zip(loader, s)):
        assert x[:, 0, 0].long().tolist() == ep and y.tolist() == labels[ep].tolist()
        assert y.reshape(3, 5)[:, 0].tolist() == s.episode_classes(e)
        sx, sy, qx, qy = split_episode(x, y, 3, 2, 3)
        blocks = x.reshape(3, 5, 2, 2)
        assert torch.equal(sx, blocks[:, :2].reshape(6, 2, 2))
        assert torch.equal(qx, blocks[:, 2:].reshape(9, 2, 2))
        assert sy.tolist() == [0, 0, 1, 1, 2, 2] and qy.tolist() == [0] * 3 + [1] * 3 + [2] * 3


class _Labelled(torch.utils.data.Dataset):
    """Images with int labels and easyfsl's ``get_labels``."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def get_labels(self):
        return [int(v) for v in self.labels]


def _easyfsl_sampler(n_way: int, n_shot: int, n_query: int):
    """An easyfsl 1.5.0 ``TaskSampler`` for its ``episodic_collate_fn``, which reads only these
    three attributes. Its ``__init__`` cannot run under torch >= 2.2 (it passes
    ``data_source=None`` to ``Sampler.__init__``, which no longer takes it)."""
    from easyfsl.samplers import TaskSampler

    sampler = TaskSampler.__new__(TaskSampler)
    sampler.n_way, sampler.n_shot, sampler.n_query = n_way, n_shot, n_query
    return sampler


def test_split_episode_gives_easyfsl_collate_output_for_the_same_indices():

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(800) % 40 * 97  # class ids far apart: a set does not keep their order
    images = torch.rand(800, 1, 8, 8, generator=g)
    data = _Labelled(images, labels)
    for n, k, q in ((5, 1, 15), (5, 5, 2), (20, 1, 3)):
        ours = EpisodeSampler(labels, sorted(set(labels.tolist())), n, k, q, episodes=6, seed=2)
        theirs = _easyfsl_sampler(n, k, q)
        for ep in ours:
            batch = [data[i] for i in ep]
            sx, sy, qx, qy, class_ids = theirs.episodic_collate_fn(batch)
            x = torch.stack([b[0] for b in batch])
            y = torch.tensor([b[1] for b in batch])
            our = split_episode(x, y, n, k, q)
            assert torch.equal(our[0], sx) and torch.equal(our[2], qx)  # the same images
            # easyfsl numbers the classes in a set's order, we in episode order: the same
            # classes behind the labels.
            episode = y.reshape(n, k + q)[:, 0]
            ids = torch.tensor(class_ids)
            assert torch.equal(episode[our[1]], ids[sy]) and torch.equal(episode[our[3]], ids[qy])
            if class_ids == episode.tolist():
                assert torch.equal(our[1], sy) and torch.equal(our[3], qy)
    # Where a set keeps the episode's order (small ids, ascending), the tensors are identical.
    small = torch.arange(30) % 3
    data = _Labelled(torch.rand(30, 1, 4, 4, generator=g), small)
    ep = [i for c in (0, 1, 2) for i in range(c, 30, 3)][:30]
    batch = [data[i] for i in ep]
    theirs = _easyfsl_sampler(3, 4, 6)
    got = theirs.episodic_collate_fn(batch)[:4]
    ours = split_episode(torch.stack([b[0] for b in batch]), small[ep], 3, 4, 6)
    assert all(torch.equal(a, b) for a, b in zip(ours, got))


def test_split_episode_refuses_a_batch_that_is_not_an_episode():
    x = torch.zeros(6, 1, 2, 2)
    with pytest.raises(ValueError, match="needs 8 images and labels, got 6"):
        split_episode(x, torch.zeros(6, dtype=torch.long), 2, 1, 3)
    with pytest.raises(ValueError, match="class-major"):
        split_episode(x, torch.tensor([0, 1, 0, 1, 0, 1]), 2, 1, 2)
    with pytest.raises(ValueError, match="class-major"):
        split_episode(x, torch.tensor([0, 0, 0, 0, 0, 0]), 2, 1, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((TINY, [0, 1], 3, 1, 1, 1), "n_way=3 but only 2 classes given"),
        ((TINY, [0, 1, 9], 2, 1, 1, 1), r"1 of the classes have fewer usable images: 9 \(0\)"),
        ((TINY, [0, 0, 1], 2, 1, 1, 1), "classes repeat"),
        ((TINY, [0, 1], 2, 0, 1, 1), "k_shot must be at least 1, got 0"),
        ((TINY, [0, 1], 2, 1, 1, -1), "episodes must be at least 0"),
        ((TINY, [0, 1], 2.0, 1, 1, 1), "n_way must be a whole number"),
        ((np.array(TINY, float), [0, 1], 2, 1, 1, 1), "labels must be a 1-d sequence"),
        ((TINY, [0, 1], 2, 1, 1, 1, -3), "seed must be at least 0"),
    ],
)
def test_sampler_refuses_bad_arguments_saying_why(args, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(*args)
    s = EpisodeSampler(TINY, [0, 1], 2, 1, 1, 1)
    with pytest.raises(ValueError, match="episode must be at least 0"):
        s.episode(-1)
    with pytest.raises(ValueError, match=r"exclude holds indices outside 0\.\.23"):
        EpisodeSampler(TINY, [0, 1], 2, 1, 1, 1, exclude=[24])
    with pytest.raises(ValueError, match=r"one bool per image \(24\)"):
        EpisodeSampler(TINY, [0, 1], 2, 1, 1, 1, exclude=np.zeros(5, bool))


@st.composite
def _sampler_args(draw):
    n_classes = draw(st.integers(1, 8))
    labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=80))
    classes = draw(st.lists(st.integers(0, n_classes + 1), min_size=0, max_size=6, unique=True))
    exclude = draw(st.lists(st.integers(0, len(labels) - 1), max_size=10))
    return labels, classes, exclude


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _sampler_args(),
    st.integers(-1, 5),
    st.integers(-1, 4),
    st.integers(-1, 4),
    st.integers(-1, 3),
    st.integers(0, 2**40),
)
def test_sampler_invariants_hold_or_a_value_error_says_why(case, n, k, q, episodes, seed):
    labels, classes, exclude = case
    usable = [i for i in range(len(labels)) if i not in set(exclude)]
    count = {c: sum(1 for i in usable if labels[i] == c) for c in classes}
    valid = (n >= 1 and k >= 1 and q >= 0 and episodes >= 0 and n <= len(classes)
             and all(v >= k + q for v in count.values()))  # fmt: skip
    try:
        s = EpisodeSampler(labels, classes, n, k, q, episodes, seed=seed, exclude=exclude)
    except ValueError:
        assert not valid
        return
    assert valid and len(s) == episodes
    eps = list(s)
    assert len(eps) == episodes
    for e, ep in enumerate(eps):
        _check_episode(ep, labels, classes, n, k, q, set(exclude))
        assert s.episode(e) == ep


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.none(), st.floats(), st.text(max_size=3), st.lists(st.floats(), max_size=3),
                 st.booleans(), st.lists(st.lists(st.integers(), max_size=2), max_size=3)),
       st.sampled_from(["labels", "classes", "n_way", "k_shot", "q_query", "episodes", "seed",
                        "exclude"]))  # fmt: skip
@example(0.0, "exclude")  # once a TypeError: list() of a float
def test_sampler_bad_values_are_value_errors_never_anything_else(value, which):
    args = {"labels": TINY, "classes": [0, 1], "n_way": 2, "k_shot": 1, "q_query": 1,
            "episodes": 2, "seed": 0, "exclude": None}  # fmt: skip
    args[which] = value
    try:
        s = EpisodeSampler(**args)
    except ValueError:
        return
    list(s)  # accepted (None exclude, an empty exclude list): it must work


# ------------------------------------------------------------------------------ the tree


def _tree(tmp_path: Path) -> Path:
    """Six classes: 25, 3, 30, 21, 24 and 22 images; U+4E00 also holds a black image, U+4E03 an
    identical pair, and one picture is filed under both U+4E04 and U+4E05."""
    files = kkanji_files(6, [25, 3, 30, 21, 24, 22], seed=5)
    stroke = np.zeros((64, 64), np.uint8)
    stroke[10:50, 30:34] = 200
    other = np.zeros((64, 64), np.uint8)
    other[20:24, 5:60] = 170
    files += [
        ("U+4E00", "ffff000000000001.png", png_bytes(np.zeros((64, 64), np.uint8))),
        ("U+4E03", "eeee000000000001.png", png_bytes(stroke)),
        ("U+4E03", "eeee000000000002.png", png_bytes(stroke)),
        ("U+4E04", "dddd000000000001.png", png_bytes(other)),
        ("U+4E05", "dddd000000000002.png", png_bytes(other)),
    ]
    write_kkanji_tree(tmp_path / "KKanji", files)
    return tmp_path


def test_load_fewshot_uses_the_audit_and_publishes_the_partition(tmp_path):
    root = _tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # verify=False on a generated subset: said once
        fs = load_fewshot(root, image_size=32, verify=False, n_val=1, n_novel=2)
        ds = KKanji(root, split="all", verify=False)
        full = load_fewshot(root, image_size=64, verify=False, n_val=1, n_novel=2)
    assert fs.classes == ds.classes and fs.codepoints == ds.codepoints
    assert torch.equal(fs.targets, ds.targets) and torch.equal(full.data, ds.data)
    assert fs.data.shape == (len(ds), 32, 32) and fs.data.dtype == torch.uint8
    assert np.array_equal(fs.data.numpy(), downsample(ds.data, 32))
    # Out: the black image, the second of the identical pair, both copies of the cross-class one.
    paths = sorted(p for part in ds.split_indices().values() for p in part)  # cache order
    out = [paths[i].split("/", 1)[1] for i in np.flatnonzero(~fs.usable.numpy())]
    assert out == ["U+4E00/ffff000000000001.png", "U+4E03/eeee000000000002.png",
                   "U+4E04/dddd000000000001.png", "U+4E05/dddd000000000002.png"]  # fmt: skip
    counts = torch.bincount(fs.targets[fs.usable], minlength=6).tolist()
    assert counts == [25, 3, 30, 22, 24, 22]
    assert fs.partition == make_partition(counts, fs.codepoints, 0, n_val=1, n_novel=2)
    assert 1 in fs.partition.base  # 3 images: never drawn
    path, sha = write_partition(tmp_path / "out" / "p.json", fs)
    assert sha == fs.partition_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["partition_version"] == PARTITION_VERSION
    assert doc["novel"] == [fs.codepoints[c] for c in fs.partition.novel]
    assert doc["usable_per_class"]["U+4E03"] == 22 and doc["source"]["blank_images"] == 1
    assert full.partition_sha256 == sha  # the image size is not part of the partition
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = write_partition(tmp_path / "ds.json", ds, n_val=1, n_novel=2)  # verify=False
    assert again[1] == sha


def test_cli_writes_the_partition_and_prints_its_sha256(tmp_path, capsys):
    root = _tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "fewshot.json"
    args = ["kkanji-fewshot-split", "--root", str(root), "--no-verify", "--n-val", "1",
            "--n-novel", "2", "--seed", "3"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "kmnist_torch", *args, "--out", str(out)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert r.stdout.splitlines() == [
        f"wrote {out}: 3 base / 1 val / 2 novel classes ({PARTITION_VERSION}, seed 3)",
        f"sha256 {sha}",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert write_partition(tmp_path / "again.json", root, seed=3, n_val=1, n_novel=2,
                               verify=False)[1] == sha  # fmt: skip
    # Asking for more classes than can give 20 images: one line, exit 1, nothing written.
    bad = tmp_path / "bad.json"
    assert main([*args, "--n-novel", "5", "--out", str(bad)]) == 1 and not bad.exists()
    assert capsys.readouterr().err.splitlines() == [
        "error: n_val + n_novel = 6, but only 5 of the 6 classes have at least min_images=20 "
        "usable images: ask for at most 5 classes, or lower min_images"
    ]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "is a folder; name a file in it" in capsys.readouterr().err
    assert main([*args, "--out", str(out / "p.json")]) == 2
    said = f"error: --out {out / 'p.json'}: {out} is a file, not a folder"
    assert capsys.readouterr().err.splitlines() == [said]
    with pytest.raises(SystemExit):
        main(["kkanji-fewshot-split", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # its defaults are the real ones
    for said in (f"validation classes (default {N_VAL})", f"novel classes (default {N_NOVEL})",
                 f"(default {MIN_IMAGES}: 5 shots + 15 queries)"):  # fmt: skip
        assert said in help_text
