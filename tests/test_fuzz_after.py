"""Property-based fuzzing (Hypothesis, fixed seed) of the readers of outside bytes that the
after-training commands own (issue 20, item 7): model files and their metadata, a run's
results.json, images given to predict. For any input each returns what it promises or raises
the package's own error; nothing else escapes, and nothing allocates beyond the bounds.

A few seconds each here; ``FUZZ_AFTER_EXAMPLES=2000 python -m pytest tests/test_fuzz_after.py``
(or ``benchmarks/hostile_after.py --fuzz``) runs them longer.
"""

from __future__ import annotations

import io
import json
import os
import resource
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kmnist_torch import catalog, predict
from kmnist_torch.data.runinfo import data_root, dataset_arguments, read_results, split_limit
from kmnist_torch.errors import ImageError, ModelFileError, RunFolderError
from kmnist_torch.models.metadata import KEYS, check_meta, expected_weights
from kmnist_torch.models.modelfile import load_model, model_meta, save_model
from kmnist_torch.models.registry import create_model

EXAMPLES = int(os.environ.get("FUZZ_AFTER_EXAMPLES", "40"))
FUZZ = settings(
    derandomize=True,  # the same examples on every run: a failure is reproducible
    max_examples=EXAMPLES,
    deadline=None,  # no wall-clock assertion; benchmarks/hostile_after.py times the worst
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The most parameters any metadata the schema accepts can make a model build: preact18 (or
# simple_cnn at 64 x 64) at KKanji's 3,832 classes. 14M float32 weights: 56 MB.
MAX_PARAMETERS = 14_000_000

# JSON-like values of every kind a pickle or a JSON file can hold, including the awkward ones.
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fuzz")
    args = {"num_classes": 10, "in_chans": 1, "img_size": 28}
    chars = [c.char for c in catalog.KMNIST.classes]
    meta = model_meta("simple_cnn", args, "kmnist", chars, recipe_name="cnn", data={})
    save_model(folder / "model.pt", create_model("simple_cnn", **args), meta)
    return {"folder": folder, "meta": meta, "bytes": (folder / "model.pt").read_bytes()}


# ------------------------------------------------------------------------------ model files


@FUZZ
@given(edits=st.dictionaries(st.sampled_from([*KEYS, "other"]), values, min_size=1, max_size=4))
def test_fuzz_metadata_is_accepted_bounded_or_refused(good, edits):
    meta = {**good["meta"], **edits}
    try:
        check_meta(meta, "model.pt")
    except ModelFileError as exc:
        assert str(exc).startswith("model.pt: ") and "\n" not in str(exc)
        return
    shapes = expected_weights(meta)  # built on the meta device: what loading would allocate
    assert sum(int(np.prod(shape)) for shape, _ in shapes.values()) <= MAX_PARAMETERS


@settings(FUZZ, max_examples=max(10, EXAMPLES // 2))  # the slowest to draw; half as many
@given(
    nested=st.dictionaries(
        st.sampled_from(["model_args", "data", "recipe", "metrics", "versions"]),
        st.dictionaries(st.text(max_size=20), values, max_size=5),
        min_size=1,
    )
)
def test_fuzz_nested_metadata_values(good, nested):
    meta = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good["meta"].items()}
    for key, inner in nested.items():
        meta[key] = {**(meta[key] or {}), **inner}
    try:
        check_meta(meta, "model.pt")
    except ModelFileError:
        return
    assert sum(int(np.prod(s)) for s, _ in expected_weights(meta).values()) <= MAX_PARAMETERS


def _positions(size: int) -> st.SearchStrategy[int]:
    # The zip's local header and the pickle at the start, its directory at the end, anywhere.
    return st.one_of(
        st.integers(0, 4000), st.integers(max(0, size - 8000), size - 1), st.integers(0, size - 1)
    )


@FUZZ
@given(data=st.data())
def test_fuzz_model_file_bytes(good, data):
    raw = bytearray(good["bytes"])
    flips = data.draw(st.lists(st.tuples(_positions(len(raw)), st.integers(0, 255)), max_size=6))
    for at, byte in flips:
        raw[at] = byte
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))))
    path = good["folder"] / "fuzzed.pt"
    path.write_bytes(bytes(raw[:cut]))
    try:
        model = load_model(path)
    except ModelFileError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert model.meta["classes"] == good["meta"]["classes"]  # only a harmless change loads


def test_model_fuzzing_stays_within_memory(good):
    """After the fuzzing above (and whatever ran before it), the peak memory of this process
    is far below what a single unchecked 10**7-class model would take (5 GB)."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 1024 * 1024  # KiB


# ------------------------------------------------------------------------------ results.json


def _read(folder: Path, payload: bytes) -> None:
    (folder / "results.json").write_bytes(payload)
    try:
        doc = read_results(folder)
    except RunFolderError as exc:
        assert str(exc).startswith(str(folder / "results.json"))
        return
    assert isinstance(doc, dict)
    config = doc.get("config", {})
    root, download = data_root(None, True, config)
    assert root is None or root == config["root"] and download is False
    for split in ("test", "train"):
        limit = split_limit({"data": {}}, config, split)
        assert limit is None or isinstance(limit, int) and limit >= 0
    try:
        dataset_arguments("kkanji", {k: v for k, v in config.items() if k == "seed"}, "m.pt")
    except RunFolderError:
        pass


@settings(FUZZ, max_examples=max(10, EXAMPLES // 2))
@given(doc=values, config=st.dictionaries(st.text(max_size=12), values, max_size=6))
def test_fuzz_results_json_documents(good, doc, config):
    _read(good["folder"], json.dumps(doc).encode())
    whole = {"config": config, "test_accuracy": doc} if not isinstance(doc, dict) else doc
    _read(good["folder"], json.dumps(whole).encode())


@FUZZ
@given(payload=st.binary(max_size=300))
def test_fuzz_results_json_bytes(good, payload):
    _read(good["folder"], payload)
    _read(good["folder"], b'{"config": {"root": ' + payload + b"}}")


# ------------------------------------------------------------------------------ images


def _samples() -> list[bytes]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    out = []
    for mode, fmt in (("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("L", "TIFF"),
                      ("RGB", "JPEG"), ("L", "BMP"), ("I;16", "PNG"), ("F", "TIFF")):  # fmt: skip
        buf = io.BytesIO()
        im = Image.fromarray(gray)
        if mode == "I;16":
            im = Image.fromarray(gray.astype(np.uint16) * 257)
        elif mode == "F":
            im = Image.fromarray(gray.astype(np.float32) / 255, "F")
        else:
            im = im.convert(mode)
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SAMPLES = _samples()


def _load(folder: Path, payload: bytes) -> None:
    path = folder / "image"
    path.write_bytes(payload)
    try:
        with warnings.catch_warnings():  # PIL's notes on the tags it skips, as the CLI hides
            warnings.simplefilter("ignore", UserWarning)
            x = predict.load_image(path, 28)
    except ImageError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1


@FUZZ
@given(data=st.data())
def test_fuzz_image_headers(good, data):
    raw = bytearray(data.draw(st.sampled_from(SAMPLES)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, min(len(raw), 200) - 1), st.integers(0, 255)), max_size=5)
    )
    for at, byte in flips:
        raw[at] = byte
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))))
    _load(good["folder"], bytes(raw[:cut]))


@FUZZ
@given(payload=st.binary(max_size=400))
def test_fuzz_image_bytes(good, payload):
    _load(good["folder"], payload)
