"""What evaluate, predict and export are given is untrusted input (issue 20, items 1 to 3): model
files whose metadata lies, images that are FIFOs, 16-bit or a pixel high, run folders whose
results.json turns checks off or whose eval-test/ is a link; and (issue 21) a full disk under
``evaluate --out`` and ``export --out``. Real files, FIFOs, symlinks and subprocesses; no
training (an untrained simple_cnn is a model like any other)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import random_split
from PIL import Image

import kmnist_torch
from kmnist_torch import catalog, evaluate, predict
from kmnist_torch.data.resplit import write_split
from kmnist_torch.errors import ImageError, ModelFileError, UncheckedContentWarning, WriteError
from kmnist_torch.models.metadata import meta_sha256
from kmnist_torch.models.modelfile import model_meta, save_model, weights_sha256
from kmnist_torch.models.registry import create_model

REPO = Path(__file__).resolve().parent.parent
KMNIST = [c.char for c in catalog.KMNIST.classes]
pytestmark = pytest.mark.usefixtures("one_thread")


def _model_file(path: Path, limit_test: int | None = None) -> Path:
    args = {"num_classes": 10, "in_chans": 1, "img_size": 28}
    torch.manual_seed(0)
    model = create_model("simple_cnn", **args)
    data = {"limit_train": None, "limit_test": limit_test, "options": {}}
    meta = model_meta("simple_cnn", args, "kmnist", KMNIST, recipe_name="cnn", data=data)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, meta)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder (model.pt, results.json) and its data root: 40 fake KMNIST test images."""
    base = tmp_path_factory.mktemp("inputs")
    write_split(base / "data", "kmnist", "test", *random_split(40, "kmnist", 1), fmt="mnist")
    folder = base / "run"
    _model_file(folder / "model.pt")
    config = {"dataset": "kmnist", "root": str(base / "data"), "verify": False, "limit_test": None}
    (folder / "results.json").write_text(json.dumps({"config": config, "test_accuracy": 0.1}))
    return folder


def _copy_run(run: Path, to: Path, results: str | None = None) -> Path:
    to.mkdir()
    (to / "model.pt").write_bytes((run / "model.pt").read_bytes())
    (to / "results.json").write_text(results or (run / "results.json").read_text())
    return to


def _one_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(w in lines[0] for w in words), err


# ---------------------------------------------------------------------- model-file metadata


def _edited(good: dict, tmp: Path, name: str, resign: bool = True, **meta) -> Path:
    doc = {**good, "meta": {**good["meta"], **meta}}
    if resign:  # as a hostile writer would: only the schema can catch it
        doc["meta_sha256"] = meta_sha256(doc["meta"])
    torch.save(doc, tmp / name)
    return tmp / name


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"model_args": {"num_classes": 10**7, "in_chans": 1, "img_size": 28}}, "num_classes"),
        ({"model_args": {"num_classes": 10, "in_chans": 1, "img_size": 1024}}, "img_size"),
        ({"image_size": 60000}, "image_size 60000 but model_args says 28"),
        ({"channels": 3}, "channels 3"),
        ({"codepoints": []}, "codepoints: 0 entries for 10 classes"),
        ({"romaji": []}, "romaji: 0 entries"),
        ({"classes": ["x" * 100] * 10}, "classes[0]"),
        ({"dataset": "imagenet"}, "dataset 'imagenet'"),
        ({"arch": "resnet1000"}, "arch 'resnet1000'"),
        ({"data": {"options": {"seed": "x" * 500}}}, "data['options']"),
        ({"recipe": {"eval_batch_size": "all"}}, "eval_batch_size"),
        ({"metrics": {"test_accuracy": "high"}}, "metrics['test_accuracy']"),
        ({"surprise": 1}, "unknown ['surprise']"),
        (
            {"model_args": {"num_classes": 10, "in_chans": 1, "img_size": 28, "depth": 99}},
            "exactly",
        ),
    ],
)
def test_model_metadata_is_checked_whole_before_anything_is_built(run, tmp_path, edit, words):
    good = torch.load(run / "model.pt", weights_only=True)
    file = _edited(good, tmp_path, "m.pt", **edit)
    with pytest.raises(ModelFileError, match="was not written by kmnist_torch") as info:
        kmnist_torch.load_model(file)
    assert str(info.value).startswith(str(file)) and words in str(info.value)


def test_metadata_sha256_old_files_and_weights_that_lie(run, tmp_path, capsys):
    good = torch.load(run / "model.pt", weights_only=True)
    edited = _edited(good, tmp_path, "edited.pt", resign=False, classes=list("abcdefghij"))
    with pytest.raises(ModelFileError, match="its metadata differs .*sha256 mismatch"):
        kmnist_torch.load_model(edited)
    old = {k: v for k, v in good.items() if k != "meta_sha256"}  # written before this check
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UncheckedContentWarning, match="checked against the schema only"):
        assert kmnist_torch.load_model(tmp_path / "old.pt").meta["classes"] == KMNIST
    # A weight of the right name and shape over four bytes (stride 0): refused unread.
    weights = dict(good["state_dict"])
    weights["fc1.weight"] = torch.zeros(1).expand(*weights["fc1.weight"].shape)
    lying = {**good, "state_dict": weights, "weights_sha256": "0" * 64}
    torch.save(lying, tmp_path / "lying.pt")
    with pytest.raises(ModelFileError, match="'fc1.weight' is not stored densely"):
        kmnist_torch.load_model(tmp_path / "lying.pt")
    weights["fc1.weight"] = torch.zeros(5)
    torch.save({**lying, "state_dict": weights}, tmp_path / "shape.pt")
    with pytest.raises(ModelFileError, match="'fc1.weight' is not a torch.float32 tensor"):
        kmnist_torch.load_model(tmp_path / "shape.pt")
    # The sha256 of the weights is still checked, after all that.
    assert good["weights_sha256"] == weights_sha256(good["state_dict"])


def test_a_model_file_is_a_bounded_zip_before_torch_reads_it(run, tmp_path):
    import zipfile

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(ModelFileError, match="a FIFO"):
        kmnist_torch.load_model(fifo)  # refused without being opened: no hang
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(run / "model.pt") as src, zipfile.ZipFile(deflated, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelFileError, match="is compressed"):
        kmnist_torch.load_model(deflated)
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFileError, match="is damaged or not a model file"):
        kmnist_torch.load_model(legacy)


def test_hostile_model_files_stay_within_a_memory_bound(run, tmp_path):
    """Every hostile model file is one ModelFileError, and none raises this process's peak
    memory by more than a few MB (the old loader built the 10**7-class model first: 5 GB).
    benchmarks/hostile_after.py measures each in a fresh process, for the docs' figures."""
    good = torch.load(run / "model.pt", weights_only=True)
    huge = {"num_classes": 10**7, "in_chans": 1, "img_size": 28}
    files = [
        _edited(good, tmp_path, "classes.pt", model_args=huge, classes=["a"] * 10**5),
        _edited(
            good, tmp_path, "size.pt", model_args={**huge, "num_classes": 10, "img_size": 4096}
        ),
        _edited(good, tmp_path, "image.pt", image_size=10**6),
    ]
    kmnist_torch.load_model(run / "model.pt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for file in files:
        with pytest.raises(ModelFileError):
            kmnist_torch.load_model(file)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew < 200 * 1024, grew  # KiB


# ------------------------------------------------------------------------- images for predict


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_every_mode_is_converted_by_its_value_range(tmp_path):
    a = random_split(1, "kmnist", 3)[0][0]
    want = predict.load_image(_png(tmp_path / "8.png", a), 28)
    same = {
        "16-bit PNG": _png(tmp_path / "16.png", a.astype(np.uint16) * 257),
        "float TIFF 0-1": _png(tmp_path / "f.tif", a.astype(np.float32) / 255, "F"),
        "float TIFF 0-255": _png(tmp_path / "f255.tif", a.astype(np.float32) * 1.0, "F"),
        "32-bit TIFF 0-65535": _png(tmp_path / "i.tif", a.astype(np.int32) * 257, "I"),
        "32-bit TIFF 0-255": _png(tmp_path / "i8.tif", a.astype(np.int32), "I"),
        "RGB": _png(tmp_path / "rgb.png", np.stack([a] * 3, -1)),
        "P": tmp_path / "p.png",
    }
    Image.fromarray(a).convert("P").save(same["P"])
    with Image.open(same["16-bit PNG"]) as im:
        assert im.mode.startswith("I;16")
    for what, path in same.items():
        assert torch.equal(predict.load_image(path, 28), want), what
    # Transparency over white paper: black ink on nothing reads as black ink on white.
    ink = np.full((28, 28), 255, np.uint8)
    ink[8:20, 12:16] = 0
    white = predict.load_image(_png(tmp_path / "ink.png", ink), 28)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = 255 - ink  # opaque black where the ink is, transparent elsewhere
    assert torch.equal(predict.load_image(_png(tmp_path / "a.png", rgba, "RGBA"), 28), white)
    la = np.stack([np.zeros_like(ink), 255 - ink], -1)
    assert torch.equal(predict.load_image(_png(tmp_path / "la.png", la, "LA"), 28), white)
    refused = {
        "negative": _png(tmp_path / "neg.tif", a.astype(np.float32) - 1000, "F"),
        "values up to 1020": _png(tmp_path / "big.tif", a.astype(np.float32) * 4, "F"),
        "not supported": tmp_path / "lab.tif",
    }
    Image.new("LAB", (28, 28)).save(refused["not supported"])
    for words, path in refused.items():
        with pytest.raises(ImageError, match=words):
            predict.load_image(path, 28)


def test_images_are_bounded_before_decoding_and_padding(tmp_path):
    strip = tmp_path / "strip.png"  # 1 x 100,000: would be padded to 10**10 pixels
    Image.new("L", (100_000, 1), 255).save(strip)
    with pytest.raises(ImageError, match=r"100000x1 pixels; each side must be 1 to 4,096"):
        predict.load_image(strip, 28)
    tall = tmp_path / "tall.png"  # the longest side accepted, padded to 4,096 x 4,096
    Image.new("L", (3, predict.MAX_SIDE), 255).save(tall)
    assert predict.load_image(tall, 28).shape == (1, 28, 28)
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:  # sparse: a huge file costs no disk
        fh.truncate(predict.MAX_FILE_BYTES + 1)
    with pytest.raises(ImageError, match="more than the 67,108,864 accepted"):
        predict.load_image(big, 28)
    with pytest.raises(ImageError, match="a character device, not a regular file"):
        predict.load_image("/dev/zero", 28)


def test_a_fifo_among_the_images_does_not_block_the_others(run, tmp_path):
    """A folder of images with a FIFO named like one among them, and a note: the command
    answers for every image, reports the FIFO without opening it, skips the note."""
    scans = tmp_path / "scans"
    scans.mkdir()
    good = _png(scans / "a.png", random_split(1, "kmnist", 4)[0][0])
    (scans / "c.PNG").write_bytes(good.read_bytes())
    (scans / "notes.txt").write_text("not an image")
    fifo = scans / "b.png"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it would block for ever
    argv = [sys.executable, "-m", "kmnist_torch.predict", str(run), str(scans), str(good), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    doc = json.loads(out.stdout)
    assert [r["image"] for r in doc] == [str(good), str(fifo), str(scans / "c.PNG"), str(good)]
    assert [bool(r["predictions"]) for r in doc] == [True, False, True, True]
    assert doc[1]["error"] == f"{fifo}: a FIFO (named pipe), not a regular file for an image"


def test_predict_batches_many_images_in_order(run, tmp_path, monkeypatch):
    images = random_split(7, "kmnist", 5)[0]
    paths = [_png(tmp_path / f"{i}.png", 255 - img) for i, img in enumerate(images)]
    model = kmnist_torch.load_model(run)
    whole = predict.predict(model, paths, 2)
    monkeypatch.setattr(predict, "BATCH", 3)  # three batches, decoded by threads
    monkeypatch.setenv("KMNIST_TORCH_DECODE_WORKERS", "2")
    got = predict.predict(model, [*paths[:4], tmp_path, *paths[4:]], 2)
    error = f"{tmp_path}: a folder, not an image file"
    assert got.pop(4) == {"image": str(tmp_path), "predictions": [], "error": error}
    assert len(got) == len(whole)
    for a, b in zip(got, whole):
        assert a["image"] == b["image"]
        assert [g["class"] for g in a["predictions"]] == [g["class"] for g in b["predictions"]]
        for g, h in zip(a["predictions"], b["predictions"]):  # other batch, other rounding
            assert g["probability"] == pytest.approx(h["probability"], abs=1e-6)


# ------------------------------------------------------------------------ run folders


def test_results_json_never_turns_verify_off(run, capsys):
    """The run trained with --no-verify; evaluate checks unless told on its command line."""
    assert evaluate.main([str(run), "--device", "cpu", "--out", str(run / "e1")]) == 1
    err = capsys.readouterr().err  # the files' problems, one per line, then the way out
    assert err.startswith("error: KMNIST: 2 file(s)") and "Traceback" not in err
    assert err.strip().endswith("results.json never turns a check off by itself)")
    assert not (run / "e1").exists()
    argv = [str(run), "--device", "cpu", "--no-verify", "--out", str(run / "e2")]
    assert evaluate.main(argv) == 0
    assert json.loads((run / "e2" / "metrics.json").read_text())["num_images"] == 40


def test_results_json_never_sends_a_download_elsewhere(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KMNIST_TORCH_ROOT", str(tmp_path / "mine"))
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "0")  # nothing reachable: no download can happen
    monkeypatch.delenv("KMNIST_TORCH_MIRRORS", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = {"dataset": "kmnist", "root": str(elsewhere), "limit_test": None}
    other = _copy_run(run, tmp_path / "run", json.dumps({"config": config}))
    argv = [str(other), "--device", "cpu", "--no-verify", "--download"]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(elsewhere) in err
    assert list(elsewhere.iterdir()) == []  # read only: nothing downloaded or made there


def test_a_linked_eval_folder_is_refused_and_nothing_is_written_outside(run, tmp_path, capsys):
    other = _copy_run(run, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (other / "eval-test").symlink_to(outside)
    assert evaluate.main([str(other), "--device", "cpu", "--no-verify"]) == 1
    _one_error(capsys.readouterr().err, "eval-test is a link to", "--out")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2, 3]", "a JSON list, not an object"),
        ('{"config": {"limit_test": "ten"}}', "config 'limit_test' is 'ten'"),
        ('{"config": {"verify": "no"}}', "config 'verify' is 'no'"),
        ('{"config": [], "test_accuracy": 0.5}', "'config' is a list"),
        ('{"test_accuracy": "99%"}', "'test_accuracy' is '99%'"),
        ('{"epochs": {"1": 2}}', "'epochs' is not a list"),
        ("[" * 100_000, "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
    ids=["list", "limit", "verify", "config", "accuracy", "epochs", "deep", "utf16"],
)
def test_malformed_results_json_is_one_clear_error(run, tmp_path, capsys, text, words):
    other = _copy_run(run, tmp_path / "run")
    path = other / "results.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert evaluate.main([str(other), "--device", "cpu", "--no-verify"]) == 1
    _one_error(capsys.readouterr().err, f"{path}: ", words)


def test_results_json_that_is_a_fifo_or_huge_is_refused_unread(run, tmp_path, capsys):
    other = _copy_run(run, tmp_path / "run")
    path = other / "results.json"
    path.unlink()
    os.mkfifo(path)
    assert evaluate.main([str(other), "--device", "cpu", "--no-verify"]) == 1
    _one_error(capsys.readouterr().err, "a FIFO (named pipe), not a regular file")
    path.unlink()
    with open(path, "wb") as fh:
        fh.truncate(1 << 30)  # sparse
    assert evaluate.main([str(other), "--device", "cpu", "--no-verify"]) == 1
    _one_error(capsys.readouterr().err, "more than the 8,388,608 accepted")


# ---------------------------------------------------------------- a full disk under --out


def _limited(argv: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    """A command with files limited to ``max_bytes`` (``ulimit -f``), SIGXFSZ ignored: a write
    past it fails with EFBIG, as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=300,
        preexec_fn=limit,
    )  # fmt: skip


def test_a_full_disk_under_export_and_evaluate_leaves_what_was_there(run, tmp_path):
    out = tmp_path / "m.ts"
    done = _limited(["kmnist_torch.export", str(run), "--format", "torchscript", "--out", str(out),
                     "--no-verify"], 100_000)  # fmt: skip
    assert done.returncode == WriteError.exit_code == 74, done.stderr
    _one_error(done.stderr.replace("note:", "warning:"), f"cannot write {out}: the file would")
    assert list(tmp_path.iterdir()) == []  # no file at --out, no temporary beside it
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text("the previous metrics")
    argv = ["kmnist_torch.evaluate", str(run), "--device", "cpu", "--no-verify", "--out",
            str(folder)]  # fmt: skip
    done = _limited(argv, 1000)
    assert done.returncode == WriteError.exit_code, done.stderr
    _one_error(done.stderr)
    assert (folder / "metrics.json").read_text() == "the previous metrics"
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"]
