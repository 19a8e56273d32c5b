"""The command line (available, info, download, verify, montage), the dataset registry it
reads, the verifier in the data layer, and the one ``run_main`` every command ends with."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import mirror_env
from fakedata import kkanji_files, random_split, write_kkanji_tree
from PIL import Image

from kmnist_torch import catalog
from kmnist_torch._args import run_main
from kmnist_torch.cli import main
from kmnist_torch.data.resplit import write_split
from kmnist_torch.errors import INTERRUPTED, DataFilesError, UserError
from kmnist_torch.reporting.montage import montage_size


def test_available_lists_every_catalog_dataset(capsys):
    assert main(["available"]) == 0
    out = capsys.readouterr().out
    for info in catalog.DATASETS.values():
        assert info.name in out and info.title in out
    assert "270,912" in out


def test_info_k49_shows_classes_counts_files_licence(capsys):
    assert main(["info", "k49"]) == 0
    out = capsys.readouterr().out
    assert "U+309D    ゝ    iteration mark" in out
    assert "U+3090    ゐ    wi" in out
    assert "392" in out and "64" in out  # the rarest class, train and test
    assert "7ac088b20481cf51dcd01ceaab89d821" in out
    assert "CC BY-SA 4.0" in out and "doi:10.20676/00000341" in out


def test_unknown_dataset_is_a_clear_error(capsys):
    assert main(["info", "emnist"]) == 2
    assert "unknown dataset 'emnist'" in capsys.readouterr().err


def test_download_reports_failure_per_split(tmp_path, real_mirror, capsys):
    # Only the test split is served: train fails with the error naming its files.
    rc = main(["download", "kmnist", "--root", str(tmp_path), "--format", "npz"])
    captured = capsys.readouterr()
    assert rc == 1
    assert (
        "kmnist-train-imgs.npz" in captured.err
        and "a183fbc01ed9a345513b145673d3d0bb" in captured.err
    )


def test_verify_finds_good_and_bad_files(tmp_path, real_root, capsys):
    real_root()
    # The training images were never downloaded: named, and the exit code says so.
    assert main(["verify", "kmnist", "k49", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "kmnist t10k-images-idx3-ubyte.gz: OK" in out
    assert "kmnist test (mnist): decodes, 10,000 images" in out
    assert "kmnist train-images-idx3-ubyte.gz: MISSING: the train split needs it" in out
    assert "kmnist train-labels-idx1-ubyte.gz: MISSING" in out
    assert "k49: not downloaded" in out  # a dataset never downloaded at all is no error
    real_root("old_release_pre_2019-02-05/kmnist-test-imgs.npz")
    assert main(["verify", "kmnist", "--root", str(tmp_path)]) == 1
    assert "kmnist-test-imgs.npz: BAD: stale" in capsys.readouterr().out


def test_montage_draws_one_row_per_class(tmp_path, real_root, capsys):
    real_root()
    out = tmp_path / "m.png"
    assert main(["montage", "kmnist", "--root", str(tmp_path), "--out", str(out),
                 "--per-class", "5"]) == 0  # fmt: skip
    img = Image.open(out)
    assert img.size == montage_size(10, 5)
    # Tiles hold real strokes: the grid is not blank.
    assert img.crop((3 * 32, 40, img.size[0], img.size[1])).getextrema()[0] < 50
    assert "wrote" in capsys.readouterr().out


def test_download_carries_on_and_lists_every_missing_file(tmp_path, http_server, fast_net, capsys):
    # The mirror has only KMNIST's test split (fixture files, so --no-verify): the train split
    # and all of K49 fail, the test split still downloads, and the end lists what is missing.
    images, labels = random_split(13)
    for f in write_split(tmp_path / "src", "kmnist", "test", images, labels).iterdir():
        http_server.add(f"/kmnist/{f.name}", f.read_bytes())
    mirror_env(fast_net, http_server.url)
    root = tmp_path / "root"
    rc = main(["download", "kmnist", "k49", "--root", str(root), "--no-verify"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "kmnist test (mnist): 13 images, checksums not checked (--no-verify)" in out
    assert "verified" not in out and "verified" not in err.replace("--no-verify", "")
    summary = err.split("Files still missing", 1)[1]
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "k49-train-imgs.npz", "k49-test-labels.npz", "k49_classmap.csv"):  # fmt: skip
        assert "put it at: " in summary and name in summary
    assert f"{http_server.url}/k49/k49-test-imgs.npz" in summary
    assert str(root / "K49" / "raw" / "k49-test-imgs.npz") in summary
    assert "t10k-images-idx3-ubyte.gz" not in summary  # downloaded


def test_montage_says_why_the_data_is_missing_once_summary_first(tmp_path, fast_net, capsys):
    rc = main(["montage", "k49", "--root", str(tmp_path), "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    lines = err.splitlines()
    # One summary line (what is missing, the command that fixes it), then the details, once.
    assert rc == 1 and lines[0].startswith("error: K49: 5 file(s) missing in ")
    assert f"python -m kmnist_torch download k49 --root {tmp_path}" in lines[0]
    assert lines[1] == "Details:" and err.count("k49-train-imgs.npz: missing") == 1
    assert 10 < len(lines) < 60
    assert not (tmp_path / "m.png").exists()


def test_montage_says_why_each_split_failed_when_they_differ(tmp_path, capsys):
    raw = write_split(tmp_path, "kmnist", "test", *random_split(10))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"x")  # test: a damaged file of theirs
    rc = main(["montage", "kmnist", "--root", str(tmp_path), "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "train split: KMNIST" in err and "test split: KMNIST" in err


# ------------------------------------------------------- the dataset registry: one name table


def _fixture_root(root, name: str, n: int = 12) -> None:
    """A root holding both splits of ``name`` as fake files (KKanji: a small PNG tree)."""
    if catalog.get(name).archive is not None:
        write_kkanji_tree(root / catalog.get(name).folder, kkanji_files(3, 10, seed=1))
        return
    for split in ("train", "test"):
        images, labels = random_split(n, name, seed=len(split))
        write_split(root, name, split, images, labels)


def test_every_catalog_dataset_is_in_the_registry_and_nothing_else():
    from kmnist_torch.data import registry

    assert list(registry.DATASETS) == ["mnist", "kmnist", "k49", "kkanji"]  # the table's order
    assert set(registry.DATASETS) == set(catalog.DATASETS) == set(registry.list_datasets())
    for name, e in registry.DATASETS.items():
        assert e.split_keyword in ("train", "split"), name
        assert e.metric == ("balanced_accuracy" if e.balanced else "accuracy")


@pytest.mark.parametrize("name", ["mnist", "kmnist", "k49", "kkanji"])
def test_every_registry_entry_builds_from_a_fixture_root(tmp_path, name):
    import warnings

    from kmnist_torch.data import registry

    _fixture_root(tmp_path, name)
    e = registry.DATASETS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fake files: verify=False says so
        for split in e.splits:
            ds = registry.create_dataset(name, tmp_path, split=split, verify=False)
            assert type(ds) is e.cls and len(ds) > 0
            assert len(ds.classes) == (
                3 if e.split_keyword == "split" else catalog.get(name).num_classes
            )
        train = registry.create_dataset(name, tmp_path, train=True, verify=False)
        test = registry.create_dataset(name, tmp_path, train=False, verify=False)
    # Both splits of the arrays; KKanji's 30 images cut into train and test.
    sizes = (24, 6) if e.split_keyword == "split" else (12, 12)
    assert (len(train), len(test)) == sizes


def test_create_dataset_names_the_splits_a_dataset_has(tmp_path):
    from kmnist_torch.data.registry import create_dataset

    with pytest.raises(ValueError, match="kmnist has the splits train, test, not 'all'"):
        create_dataset("KMNIST", tmp_path, split="all")
    with pytest.raises(KeyError, match="unknown dataset 'emnist'"):
        create_dataset("emnist", tmp_path)


def test_dataset_options_come_from_the_registry_only():
    from kmnist_torch import train
    from kmnist_torch.data.registry import DATASETS, dataset_options

    given = {"test_fraction": 0.3, "min_per_class": None, "shots": 2, "split_seed": 5}
    assert dataset_options("kkanji", given) == {"test_fraction": 0.3, "shots": 2, "seed": 5}
    assert dataset_options("kmnist", given) == {}
    # The trainer offers one flag per registry option, and --dataset every registry name.
    parser = train.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for e in DATASETS.values():
        for flag, option in e.options.items():
            assert flags[flag].type is option.type and flags[flag].default is None
    assert set(flags["dataset"].choices) == set(DATASETS)


def test_results_table_reads_the_registry():
    from kmnist_torch.data.registry import DATASETS
    from kmnist_torch.reporting import table

    for name, e in DATASETS.items():
        assert table.metric_name(name) == e.metric
        assert table.dataset_title(name) == e.label
    cells = [table.new_cell("knn", d, comparable=False) for d in reversed(list(DATASETS))]
    header = table.render_table(cells).splitlines()[0]
    assert header == "| Model | " + " | ".join(e.label for e in DATASETS.values()) + " |"


def test_montage_split_all_is_refused_where_the_registry_has_no_such_split(tmp_path, capsys):
    rc = main(["montage", "k49", "--root", str(tmp_path), "--out", str(tmp_path / "m.png"),
               "--split", "all"])  # fmt: skip
    assert rc == 2
    assert "--split all is for kkanji; k49 has train and test" in capsys.readouterr().err


# ------------------------------------------------------------ the verifier, called directly


def test_verify_arrays_names_files_that_differ_from_the_published_ones(tmp_path):
    from kmnist_torch.data.verify import verify_arrays, verify_dataset

    images, labels = random_split(12)
    write_split(tmp_path, "kmnist", "test", images, labels)
    lines: list[str] = []
    assert verify_arrays(tmp_path, catalog.KMNIST, False, lines.append) == 1
    assert any("t10k-images-idx3-ubyte.gz: BAD" in line for line in lines), lines
    assert not any("decodes" in line for line in lines)  # bad files are not decoded
    lines.clear()
    assert verify_dataset(tmp_path, "K49", say=lines.append) == 0
    assert lines == [f"k49: not downloaded ({tmp_path / 'K49' / 'raw'})"]


def test_verify_arrays_decodes_a_good_split(tmp_path, real_dir):
    from kmnist_torch.data.verify import verify_arrays

    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(real_dir / "kmnist" / name, raw)
    lines: list[str] = []
    assert verify_arrays(tmp_path, catalog.KMNIST, False, lines.append) == 1  # no train split
    assert "kmnist t10k-labels-idx1-ubyte.gz: OK" in lines
    assert "kmnist test (mnist): decodes, 10,000 images" in lines
    assert [line.split(":")[0] for line in lines if "MISSING" in line] == [
        "kmnist train-images-idx3-ubyte.gz",
        "kmnist train-labels-idx1-ubyte.gz",
    ]


def test_copy_problem_compares_the_extracted_copy_with_its_gz(tmp_path):
    import gzip

    from kmnist_torch.data.verify import copy_problem

    gz, copy = tmp_path / "x-idx1-ubyte.gz", tmp_path / "x-idx1-ubyte"
    gz.write_bytes(gzip.compress(b"payload"))
    copy.write_bytes(b"payload")
    assert copy_problem(gz, copy) is None
    copy.write_bytes(b"payloaD")
    assert "differs from x-idx1-ubyte.gz" in copy_problem(gz, copy)
    gz.write_bytes(b"not gzip")
    assert "cannot compare it with x-idx1-ubyte.gz" in copy_problem(gz, copy)


def test_missing_files_lists_what_is_in_no_usable_form(tmp_path):
    from kmnist_torch.data.verify import missing_files

    every = {f.name for f in catalog.KMNIST.files(fmt="mnist")} | {"kmnist_classmap.csv"}
    assert {t.dest.name for t in missing_files(catalog.KMNIST, tmp_path, ["mnist"])} == every
    images, labels = random_split(12)
    write_split(tmp_path, "kmnist", "test", images, labels)
    left = {t.dest.name for t in missing_files(catalog.KMNIST, tmp_path, ["mnist"])}
    assert left == {f.name for f in catalog.KMNIST.files("train", "mnist")}
    (tar,) = missing_files(catalog.KKANJI, tmp_path, [])
    assert tar.dest == tmp_path / "KKanji" / "kkanji.tar"
    write_kkanji_tree(tmp_path / "KKanji", kkanji_files(1, 1))
    assert missing_files(catalog.KKANJI, tmp_path, []) == []


def test_check_archive_and_verify_archive_on_a_tree(tmp_path, monkeypatch):
    import dataclasses

    from kmnist_torch.data.kkanji.dataset import KKanji
    from kmnist_torch.data.verify import check_archive, verify_archive

    lines: list[str] = []
    assert verify_archive(tmp_path, catalog.KKANJI, False, lines.append) == 0
    assert lines == [f"kkanji: not downloaded ({tmp_path / 'KKanji'})"]
    tree = write_kkanji_tree(tmp_path / "KKanji", kkanji_files(3, 4, seed=1))
    found = check_archive(tmp_path / "KKanji")  # 12 images where the catalog has 140,424
    assert found.tree_bad and found.listing is None and "holds 3 c" in found.problems[0]
    small = dataclasses.replace(catalog.KKANJI, num_classes=3, split_sizes={"all": 12})
    monkeypatch.setattr(catalog, "KKANJI", small)
    lines.clear()
    assert verify_archive(tmp_path, small, False, lines.append) == 0
    assert lines == ["kkanji: OK, 12 images in 3 classes; no cache yet"]
    KKanji(tmp_path, split="all")  # builds the decoded cache
    lines.clear()
    assert verify_archive(tmp_path, small, False, lines.append) == 0
    assert lines == ["kkanji: OK, 12 images in 3 classes; decoded cache checked against the PNGs"]
    victim = sorted(tree.rglob("*.png"))[0]
    st = victim.stat()
    victim.write_bytes(b"not a png".ljust(st.st_size, b"\0"))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    found = check_archive(tmp_path / "KKanji")
    assert found.png_bad and not found.tar_bad and found.listing.total == 12
    lines.clear()
    assert verify_archive(tmp_path, small, False, lines.append) == 1
    assert lines and all(line.startswith("kkanji: BAD: ") for line in lines)
    assert any(victim.name in line for line in lines)


# ------------------------------------------------------------------- one run_main for all


class _Refused(UserError):
    exit_code = 3


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (_Refused("no way"), 3, "error: no way"),
        (DataFilesError("gone"), 1, "error: gone"),
        (ValueError("bad value"), 1, "error: bad value"),
        (FileNotFoundError("nowhere"), 1, "error: nowhere"),
        (KeyboardInterrupt(), INTERRUPTED, "stopped"),
    ],
)
def test_run_main_turns_user_errors_into_one_line_and_their_exit_code(raised, code, line, capsys):
    def run(argv):
        raise raised

    assert run_main(run, [], interrupted="stopped") == code
    assert capsys.readouterr().err.strip() == line


def test_run_main_gives_the_status_of_a_result_and_lets_bugs_through():
    assert run_main(lambda argv: argv, ["x"], status=len) == 1
    assert run_main(lambda argv: None) == 0
    with pytest.raises(ZeroDivisionError):
        run_main(lambda argv: 1 / 0)


@pytest.mark.parametrize("module", ["train", "reproduce", "evaluate", "predict", "export", "cli"])
def test_every_command_main_ends_through_run_main(module, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(f"kmnist_torch.{module}")

    def refuse(argv):
        raise _Refused("refused")

    monkeypatch.setattr(mod, "run", refuse)  # main wraps the module's run
    assert mod.main([]) == 3
    assert capsys.readouterr().err.strip() == "error: refused"
