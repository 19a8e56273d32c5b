"""After training: model.pt and load_model, curves.png, evaluate, predict, export, the plots
and the montage, end to end on one tiny CPU run over fixture data (one epoch of simple_cnn)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import random_split
from PIL import Image

import kmnist_torch
from kmnist_torch import catalog, evaluate, export, predict, train
from kmnist_torch.cli import main as cli_main
from kmnist_torch.data.resplit import write_split
from kmnist_torch.models import modelfile
from kmnist_torch.models.metadata import meta_sha256
from kmnist_torch.models.modelfile import INPUT_CONVENTION
from kmnist_torch.reporting import fonts, plots
from kmnist_torch.reporting.montage import montage_size

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fixtures: class k is a bright bar at its own place, over faint noise."""
    images, labels = random_split(n, "kmnist", seed)
    labels = labels.copy()
    np.random.default_rng(seed).shuffle(labels)
    images = images // 4
    for i, k in enumerate(labels):
        r, c = 3 + 12 * (k // 5), 2 + 5 * (k % 5)
        images[i, r : r + 8, c : c + 4] = 255
    return images, labels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run; a fifth of the test labels are wrong, so there are mistakes."""
    base = tmp_path_factory.mktemp("after")
    root, out = base / "data", base / "run"
    write_split(root, "kmnist", "train", *_images(300, 0), fmt="mnist")
    images, labels = _images(120, 1)
    labels[::5] = (labels[::5] + 3) % 10
    write_split(root, "kmnist", "test", images, labels, fmt="mnist")
    argv = ["--root", str(root), "--no-download", "--no-verify", "--out", str(out), "--device",
            "cpu", "--no-progress", "--model", "simple_cnn", "--epochs", "1", "--batch-size",
            "25", "--limit-test", "100", "--seed", "3"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            res = train.run(argv)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "out": out, "results": res, "stdout": stdout.getvalue(), "argv": argv}


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # decodes every pixel
        assert im.format == "PNG"
        return im.size


def _test_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from kmnist_torch.data.splits import load_split

    split = load_split("kmnist", root, train=False, limit=100, download=False, verify=False)
    return split.data, split.targets


# ------------------------------------------------------------------------ model.pt, the trainer


def test_model_file_holds_weights_and_metadata_loadable_weights_only(run):
    state = torch.load(run["out"] / "model.pt", map_location="cpu", weights_only=True)
    # No optimiser state; the metadata and the weights each with their sha256.
    assert set(state) == {"format", "meta", "meta_sha256", "state_dict", "weights_sha256"}
    meta = state["meta"]
    assert state["meta_sha256"] == meta_sha256(meta)
    assert meta["arch"] == "simple_cnn"
    assert meta["model_args"] == {"num_classes": 10, "in_chans": 1, "img_size": 28}
    assert meta["dataset"] == "kmnist"
    assert meta["classes"] == [c.char for c in catalog.KMNIST.classes]
    assert meta["codepoints"][0] == "U+304A" and meta["romaji"][0] == "o"
    assert (meta["image_size"], meta["channels"], meta["input"]) == (28, 1, INPUT_CONVENTION)
    assert meta["recipe_name"] == "cnn" and meta["recipe"]["optimizer"] == "adadelta"
    assert meta["data"]["limit_test"] == 100
    assert meta["metrics"]["test_accuracy"] == run["results"]["test_accuracy"]
    assert meta["versions"] == {"torch": torch.__version__, "kmnist_torch": "0.1.0"}


def test_load_model_reads_run_folder_model_file_and_checkpoint(run):
    x = torch.rand(4, 1, 28, 28)
    outputs = []
    for path in (run["out"], run["out"] / "model.pt", run["out"] / "checkpoint.pt"):
        model = kmnist_torch.load_model(path)
        assert isinstance(model, torch.nn.Module) and not model.training
        assert model.meta["classes"][1] == "き"
        with torch.no_grad():
            outputs.append(model(x))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    with pytest.raises(FileNotFoundError, match="run folder"):
        kmnist_torch.load_model(run["out"].parent)


def test_trainer_writes_curves_and_names_the_folder_last(run):
    assert _png(run["out"] / "curves.png") == plots.CURVES_SIZE
    last = run["stdout"].strip().splitlines()[-1]
    assert last.startswith(f"run folder {run['out']}:")
    for name in ("model.pt", "results.json", "curves.png", "checkpoint.pt"):
        assert name in last


def test_each_epoch_scores_training_images_like_the_test_set(run):
    """train_sample_loss is the test pass's cross-entropy on the training images (all 300
    here: fewer than TRAIN_SAMPLE), from the weights model.pt holds; train_loss is named."""
    from kmnist_torch.data.splits import load_split

    (epoch,) = run["results"]["epochs"]
    assert epoch["train_objective"] == "cross-entropy of the training batches"
    split = load_split("kmnist", run["root"], train=True, download=False, verify=False)
    model = kmnist_torch.load_model(run["out"])
    with torch.no_grad():
        logits = model(split.data.float().div(255).unsqueeze(1))
    y = torch.as_tensor(split.targets, dtype=torch.int64)
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    assert epoch["train_sample_loss"] == pytest.approx(ce, rel=1e-4)
    assert epoch["train_sample_accuracy"] == (logits.argmax(1) == y).double().mean().item()
    line = next(ln for ln in run["stdout"].splitlines() if ln.startswith("epoch 1/1"))
    assert f"cross-entropy train {ce:.4f} test {epoch['test_loss']:.4f}" in line


def _epochs(n: int, mixed: bool = True, sample: bool = True) -> list[dict]:
    out = []
    for k in range(1, n + 1):
        e = {"epoch": k, "train_loss": 0.3 / k, "test_loss": 2.0 / k, "test_accuracy": 0.5,
             "test_balanced_accuracy": 0.5}  # fmt: skip
        if mixed:
            e["train_objective"] = "BCE on softmax of the training batches, manifold mixup"
        if sample:
            e.update(train_sample_loss=1.9 / k, train_sample_accuracy=0.6)
        out.append(e)
    return out


@pytest.mark.parametrize("n", [1, 3, 40])
def test_curves_have_whole_epoch_ticks(n):
    fig = plots.curves_figure(_epochs(n))
    try:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            if n <= 3:
                assert ticks == list(range(1, n + 1))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_curves_put_like_with_like_and_name_the_training_objective():
    import matplotlib.pyplot as plt

    fig = plots.curves_figure(_epochs(3))
    try:
        loss_ax, acc_ax, objective_ax = fig.axes
        assert [ln.get_label() for ln in loss_ax.get_lines()] == ["train (sample)", "test"]
        assert loss_ax.get_ylabel() == "cross-entropy, eval mode, clean images"
        (objective,) = objective_ax.get_lines()
        assert "BCE on softmax of the training batches, manifold mixup" in objective.get_label()
        assert list(objective.get_ydata()) == pytest.approx([0.3, 0.15, 0.1])
        assert objective_ax.get_ylabel() == "training objective"
    finally:
        plt.close(fig)
    fig = plots.curves_figure(_epochs(2, mixed=False, sample=False))  # an older results.json
    try:
        assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["test"]
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------ evaluate


def test_evaluate_matches_results_and_writes_metrics_and_pictures(run, tmp_path, capsys):
    out = tmp_path / "eval"
    doc = evaluate.run([str(run["out"]), "--out", str(out), "--device", "cpu", "--no-verify"])
    assert doc["accuracy"] == run["results"]["test_accuracy"]
    assert doc["balanced_accuracy"] == run["results"]["test_balanced_accuracy"]
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["accuracy"] == doc["accuracy"] and saved["num_images"] == 100
    matrix = np.array(saved["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 100
    assert np.trace(matrix) / 100 == pytest.approx(doc["accuracy"])
    first = saved["per_class"][0]
    assert {"character", "codepoint", "precision", "recall", "f1", "support"} <= set(first)
    assert first["character"] == "お" and first["support"] == matrix[0].sum()
    assert first["recall"] == pytest.approx(matrix[0, 0] / matrix[0].sum())
    wrong = 100 - int(np.trace(matrix))
    assert wrong > 0  # the flipped labels
    assert _png(out / "confusion.png") == plots.confusion_size(10)
    assert _png(out / "errors.png") == plots.errors_size(wrong)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and f"wrote {out}" in printed
    # The default folder is RUN/eval-<split>.
    assert evaluate.main([str(run["out"]), "--device", "cpu", "--no-verify"]) == 0
    assert (run["out"] / "eval-test" / "metrics.json").is_file()


def test_evaluate_explains_a_missing_run(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "nowhere")]) == 1
    assert "no such model file or run folder" in capsys.readouterr().err


def test_plots_at_49_and_thousands_of_classes(tmp_path):
    rng = np.random.default_rng(0)
    k49 = catalog.K49.classes
    matrix = rng.integers(0, 5, (49, 49)) + np.diag(rng.integers(20, 40, 49))
    chars, cps = [c.char for c in k49], [c.codepoint for c in k49]
    plots.plot_confusion(matrix, chars, cps, tmp_path / "c49.png")
    assert _png(tmp_path / "c49.png") == plots.confusion_size(49)
    # KKanji-sized: the most-confused pairs instead of a 3,000 x 3,000 picture.
    big = np.zeros((3000, 3000), np.int64)
    np.fill_diagonal(big, 3)
    big[5, 7], big[9, 2] = 4, 2
    kanji = [chr(0x4E00 + i) for i in range(3000)]
    plots.plot_confusion(big, kanji, [f"U+{ord(c):04X}" for c in kanji], tmp_path / "pairs.png")
    assert _png(tmp_path / "pairs.png") == plots.confusion_size(3000)


# ------------------------------------------------------------------------------------- predict


def _save_black_on_white(images: torch.Tensor, folder: Path, scale: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        pil = Image.fromarray(255 - img.numpy(), mode="L")
        if scale > 1:  # a larger colour scan, as a user would have
            pil = pil.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST).convert("RGB")
        paths.append(folder / f"{i}.png")
        pil.save(paths[-1])
    return paths


def _check_predictions(model, images: torch.Tensor, got: list[dict], exact: bool) -> None:
    with torch.no_grad():
        probs = torch.softmax(model(images.unsqueeze(1).float() / 255), dim=1)
    agree = 0
    for row, entry in zip(probs, got):
        best = entry["predictions"][0]
        agree += best["class"] == int(row.argmax())
        if exact:
            assert best["probability"] == pytest.approx(float(row.max()), abs=1e-5)
    assert agree == len(got) if exact else agree >= 0.9 * len(got)


def test_predict_reads_black_on_white_pngs_of_any_size(run, tmp_path, capsys):
    images, _ = _test_images(run["root"])
    images = images[:12]
    paths = _save_black_on_white(images, tmp_path / "same")
    got = predict.run([str(run["out"]), *map(str, paths), "--json", "--top-k", "3"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == got and [g["image"] for g in got] == list(map(str, paths))
    first = got[0]["predictions"]
    assert len(first) == 3 and first[0]["probability"] >= first[1]["probability"]
    assert set(first[0]) == {"class", "character", "codepoint", "romaji", "probability"}
    assert first[0]["codepoint"].startswith("U+") and first[0]["romaji"]
    model = kmnist_torch.load_model(run["out"])
    _check_predictions(model, images, got, exact=True)
    # Twice the size, in RGB: resized and inverted all the same.
    big = _save_black_on_white(images, tmp_path / "big", scale=2)
    _check_predictions(model, images, predict.predict(model, big, 1), exact=False)
    # The automatic inversion, and its override.
    x = predict.load_image(paths[0], 28)
    assert torch.equal(x[0], images[0].float() / 255)
    assert torch.equal(predict.load_image(paths[0], 28, invert="no")[0], 1 - x[0])
    assert predict.run([str(run["out"]), str(paths[0])])  # the text form
    assert "%" in capsys.readouterr().out


def test_predict_on_real_kmnist_test_images(run, real_root, tmp_path):
    from kmnist_torch.data.mnist import KMNIST

    real_root()
    images = KMNIST(tmp_path, train=False).data[:16]
    paths = _save_black_on_white(images, tmp_path / "png")
    model = kmnist_torch.load_model(run["out"] / "model.pt")
    _check_predictions(model, images, predict.predict(model, paths, 5), exact=True)


def test_predict_explains_a_file_that_is_no_image(run, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert predict.main([str(run["out"]), str(bad)]) == 1
    assert "error:" in capsys.readouterr().err


def test_predict_reports_each_bad_image_and_still_answers_for_the_good(run, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("L", (40, 30), 255).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    huge = tmp_path / "huge.png"  # a tiny file whose header claims 50,000 x 50,000 pixels
    data = bytearray(good.read_bytes())
    data[16:24] = struct.pack(">II", 50000, 50000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    huge.write_bytes(bytes(data))
    empty = tmp_path / "empty"  # a folder with no image files in it
    empty.mkdir()
    paths = [good, empty, cut, huge, tmp_path / "missing.png"]
    assert predict.main([str(run["out"]), "--json", *map(str, paths)]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert [bool(r["predictions"]) for r in doc] == [True, False, False, False, False]
    assert "a folder" in doc[1]["error"] and "damaged or unreadable" in doc[2]["error"]
    assert "more than the" in doc[3]["error"] and "no such file" in doc[4]["error"]
    assert "Traceback" not in err


# -------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_export_matches_eager_with_a_dynamic_batch(run, tmp_path, fmt, capsys):
    if fmt == "onnx" and not all(importlib.util.find_spec(m) for m in export.ONNX_TOOLS):
        pytest.fail("the test extra installs the ONNX tools: pip install -e '.[test]'")
    out = tmp_path / ("model" + export.FORMATS[fmt].suffixes[0])
    diff = export.run([str(run["out"]), "--format", fmt, "--out", str(out), "--no-verify"])
    assert diff <= export.TOLERANCE
    assert "max abs difference" in capsys.readouterr().out
    model = kmnist_torch.load_model(run["out"])
    x = torch.rand(3, 1, 28, 28)  # a batch size the export never saw
    with torch.no_grad():
        want = model(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    elif fmt == "pt2":
        got = torch.export.load(str(out)).module()(x)
    else:
        with pytest.warns((FutureWarning, DeprecationWarning)):
            got = torch.jit.load(str(out))(x)
    assert (got - want).abs().max() <= export.TOLERANCE


def test_export_without_onnx_tools_says_what_to_install(run, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    argv = [str(run["out"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--no-verify"]
    assert export.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ONNX export needs onnxscript: pip install 'kmnist-torch[export]'")


# ------------------------------------------------------------------------------ montage, fonts


def test_bundled_font_draws_every_kana_class():
    path = fonts.cjk_font_path()
    assert path is not None and fonts.bundled_font() is not None
    for info in (catalog.KMNIST, catalog.K49):
        assert fonts.has_glyphs(path, "".join(c.char for c in info.classes))
    assert fonts.label("お", "U+304A", None) == "U+304A"  # no font: the codepoint


def test_montage_samples_by_seed_with_gaps_title_and_no_verify(run, tmp_path, capsys):
    root = ["--root", str(run["root"]), "--no-verify", "--per-class", "4"]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert cli_main(["montage", "kmnist", "--out", str(a), *root, "--seed", "1"]) == 0
    assert cli_main(["montage", "kmnist", "--out", str(b), *root, "--seed", "1"]) == 0
    assert cli_main(["montage", "kmnist", "--out", str(c), *root, "--seed", "2"]) == 0
    assert "no CJK font" not in capsys.readouterr().out
    assert _png(a) == montage_size(10, 4)
    pa, pb, pc = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    gap, cell = 4, 32
    x0 = gap + 3 * cell + cell  # the gap after the first tile of each row
    assert (pa[2 * gap + cell :, x0 : x0 + gap] == 255).all()
    assert pa[: gap + cell, :].min() < 128  # a title is drawn
    assert cli_main(["montage", "kmnist", "--out", str(a), *root, "--split", "all"]) == 2


def _ink(img: np.ndarray) -> np.ndarray:
    return img < 128


def test_montage_title_fits_two_per_class(run, tmp_path):
    """At --per-class 2 the montage is 176 px wide: the title wraps inside it, whole."""
    from kmnist_torch.reporting.montage import MONTAGE_GAP, find_cjk_font

    out = tmp_path / "m.png"
    argv = ["montage", "kmnist", "--out", str(out), "--root", str(run["root"]), "--no-verify",
            "--per-class", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    title = "Kuzushiji-MNIST (kmnist), train split\n2 random images per class (seed 0)"
    img = np.asarray(Image.open(out))
    width = img.shape[1]
    assert _png(out) == montage_size(10, 2, title=title) and width == montage_size(10, 2)[0]
    header = img[: img.shape[0] - 10 * (32 + MONTAGE_GAP) - MONTAGE_GAP]
    cols = np.flatnonzero(_ink(header).any(0))
    assert cols.max() < width - MONTAGE_GAP  # nothing runs into the right margin
    # Every line drawn whole: as much ink as the title drawn on a canvas wide enough for it.
    from PIL import ImageDraw

    font = find_cjk_font(int(32 * 0.4))
    whole = 0
    for line in title.splitlines():
        canvas = Image.new("L", (1000, 40), 255)
        ImageDraw.Draw(canvas).text((0, 0), line, fill=0, font=font)
        whole += int(_ink(np.asarray(canvas)).sum())
    assert _ink(header).sum() >= 0.97 * whole


def test_export_refuses_an_out_it_would_damage_before_any_work(run, tmp_path, capsys):
    picture = tmp_path / "keep.png"
    picture.write_bytes(b"not yours to overwrite")
    for out, fmt, why in (
        (picture, "onnx", "a onnx file ends in .onnx"),
        (tmp_path, "pt2", "a pt2 file ends in .pt2"),
        (tmp_path / "x.onnx", "pt2", "a pt2 file ends in .pt2"),
        (tmp_path / "missing" / "m.pt2", "pt2", "does not exist"),
    ):
        with pytest.raises(SystemExit):
            export.run([str(run["out"]), "--format", fmt, "--out", str(out), "--no-verify"])
        assert why in capsys.readouterr().err
    (tmp_path / "m.pt2").write_bytes(b"old")
    with pytest.raises(SystemExit):
        export.run([str(run["out"]), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert "nothing overwritten" in capsys.readouterr().err
    assert picture.read_bytes() == b"not yours to overwrite"


def test_export_formats_are_one_table(capsys):
    actions = {a.dest: a for a in export.build_parser()._actions}
    assert list(actions["format"].choices) == list(export.FORMATS)
    for name, form in export.FORMATS.items():
        assert form.suffixes and all(s.startswith(".") for s in form.suffixes), name
        assert f"{name} ({form.help})" in actions["format"].help
    from kmnist_torch.errors import ExportError

    with pytest.raises(ExportError, match="unknown format 'gif'; choose one of onnx"):
        export.export(torch.nn.Identity(), "gif", "m.gif", torch.zeros(3, 1, 28, 28))


def test_load_run_split_lives_in_the_data_layer(run, tmp_path):
    from kmnist_torch.data.splits import load_run_split

    model = kmnist_torch.load_model(run["out"])
    model_file = run["out"] / "model.pt"
    split, results = load_run_split(model_file, model.meta, "test", verify=False)
    assert results["config"]["dataset"] == model.meta["dataset"]
    assert list(split.classes) == list(model.meta["classes"]) and len(split.data) > 0
    other = {**model.meta, "classes": model.meta["classes"][:-1]}
    with pytest.raises(ValueError, match="other classes than the model"):
        load_run_split(model_file, other, "test", verify=False)


def test_damaged_or_edited_model_files_are_clear_errors(run, tmp_path, capsys):
    good = torch.load(run["out"] / "model.pt", weights_only=True)
    cases = {
        "truncated.pt": (run["out"] / "model.pt").read_bytes()[:1000],
        "empty.pt": b"",
        "html.pt": b"<!DOCTYPE html><html></html>",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    edited = {
        "huge.pt": {**good, "meta": {**good["meta"], "model_args": {
            **good["meta"]["model_args"], "img_size": 60000}}},
        "classes.pt": {**good, "meta": {**good["meta"], "classes": ["a"]}},
    }  # fmt: skip
    for name, doc in edited.items():
        torch.save(doc, tmp_path / name)
    for name in [*cases, *edited]:
        assert predict.main([str(tmp_path / name), str(tmp_path / "none.png")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}") and "Traceback" not in err, err
        assert "weights_only" not in err
    assert evaluate.main([str(tmp_path / "truncated.pt")]) == 1
    assert "is damaged" in capsys.readouterr().err


def test_train_resume_on_a_damaged_checkpoint_says_what_to_do(run, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x00" * 100)
    assert train.main([*run["argv"], "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pt is damaged" in err and "--overwrite" in err


def test_a_flipped_byte_in_the_weights_of_model_pt_is_caught(run, tmp_path, capsys):
    doc = torch.load(run["out"] / "model.pt", weights_only=True)
    assert doc["weights_sha256"] == modelfile.weights_sha256(doc["state_dict"])
    name = next(k for k, v in doc["state_dict"].items() if v.is_floating_point())
    bytes_ = doc["state_dict"][name].reshape(-1).view(torch.uint8)
    bytes_[3] ^= 0x10  # one bit of one weight, as bit rot would
    torch.save(doc, tmp_path / "rotten.pt")
    with pytest.raises(modelfile.ModelFileError, match="sha256 mismatch"):
        kmnist_torch.load_model(tmp_path / "rotten.pt")
    assert evaluate.main([str(tmp_path / "rotten.pt")]) == 1
    assert "differ from those the run wrote" in capsys.readouterr().err
