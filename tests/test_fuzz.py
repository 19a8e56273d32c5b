"""One boundary, fuzzed: for ANY input, each reader of outside bytes (idx, gzip, npz, the .npy
header, PNG headers and PNGs, the settings) returns what it promises or raises the package's
own error (a ``UserError``), never another exception, within a memory bound (tracemalloc's peak,
a small multiple of the reader's ``max_bytes``). Inputs are real valid files mutated (cut,
bytes flipped, bytes inserted, huge dimensions written into a header, then gzipped or zipped
again so the damage reaches the parser) and random bytes. Hypothesis with a fixed seed, a few
seconds per test; ``benchmarks/fuzz.py`` runs many more examples and measures time and peak
memory in subprocesses. The last tests take the command-line path: one line, no traceback."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fakedata import png_bytes, random_split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmnist_torch import settings as kt_settings
from kmnist_torch.data import formats
from kmnist_torch.data.resplit import write_split
from kmnist_torch.download.sources import mirrors
from kmnist_torch.errors import FormatError, SettingError, UserError

MAX = 64 << 10  # max_bytes given to the readers: hostile headers cannot cost more than this
FUZZ = settings(
    derandomize=True,
    max_examples=int(os.environ.get("KMNIST_FUZZ_EXAMPLES", "100")),  # benchmarks/fuzz.py: more
    deadline=5000,  # ms: generous on a shared 2-core machine; catches a hang, not a slow step
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ------------------------------------------------------------------------ valid seed files

_IMAGES = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
_IDX3 = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
_IDX3 += _IMAGES.tobytes()
_IDX1 = (0x801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])


def _npz(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, arr)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _zip(member: bytes, name: str = "arr_0.npy") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, member)
    return buf.getvalue()


_NPY = _npy(_IMAGES)
_NPZ = _npz(_IMAGES)
_PNG = png_bytes(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))


@st.composite
def mutated(draw, seed: bytes, header: int = 0) -> bytes:
    """``seed`` damaged the ways files are: cut, bytes flipped or inserted, a header field (the
    first ``header`` bytes) overwritten with any 32-bit value, or replaced by random bytes."""
    kind = draw(st.sampled_from(["cut", "flip", "insert", "header", "random", "same"]))
    data = bytearray(seed)
    if kind == "cut":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:])
    if kind == "header" and header >= 4:
        i = draw(st.integers(0, header // 4 - 1)) * 4
        value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        data[i : i + 4] = value.to_bytes(4, "big")
        return bytes(data)
    if kind == "random":
        return draw(st.binary(max_size=512))
    return bytes(data)


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A function writing bytes to a fresh file and returning its path."""
    folder = tmp_path_factory.mktemp("fuzz")
    count = iter(range(10**9))

    def write(data: bytes, suffix: str = "") -> Path:
        path = folder / f"f{next(count)}{suffix}"
        path.write_bytes(data)
        return path

    return write


def _bounded(call, *, most: int = 8 * MAX + (2 << 20)):
    """``call()``'s result, or None when it raised a FormatError; any other exception fails
    the test as it is. Its peak of traced memory is held under ``most`` bytes."""
    tracemalloc.start()
    try:
        try:
            out = call()
        except FormatError as exc:
            assert str(exc) and "\n" not in str(exc).strip()
            out = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < most, f"peak {peak} bytes"
    return out


def _check_idx(arr, ndim: int) -> None:
    if arr is not None:
        assert arr.dtype == np.uint8 and arr.ndim == ndim and arr.nbytes <= MAX


# ----------------------------------------------------------------------------- idx and gzip


@FUZZ
@given(
    data=mutated(_IDX3, header=16) | mutated(_IDX1, header=8),
    gz=st.booleans(),
    ndim=st.sampled_from([1, 3]),
)
def test_read_idx_of_any_bytes_returns_or_raises_a_format_error(place, data, gz, ndim):
    path = place(gzip.compress(data, mtime=0) if gz else data)
    arr = _bounded(lambda: formats.read_idx(path, ndim, None, max_bytes=MAX))
    _check_idx(arr, ndim)


@FUZZ
@given(data=mutated(gzip.compress(_IDX3, mtime=0), header=16))
def test_read_idx_of_a_damaged_gzip_stream(place, data):
    path = place(data)
    _check_idx(_bounded(lambda: formats.read_idx(path, 3, (-1, 28, 28), max_bytes=MAX)), 3)


@FUZZ
@given(
    data=mutated(_IDX3, header=16) | mutated(_IDX1, header=8), ndim=st.sampled_from([None, 1, 3])
)
def test_read_gzip_and_parse_idx_of_any_content(place, data, ndim):
    path = place(gzip.compress(data, mtime=0))
    raw = _bounded(lambda: formats.read_gzip(path, max_bytes=MAX, ndim=ndim))
    if raw is not None:
        assert len(raw) <= MAX + 4 + 4 * 4
        _check_idx(_bounded(lambda: formats.parse_idx(raw, path, ndim or 1)), ndim or 1)


# ------------------------------------------------------------------------------------- npz


@FUZZ
@given(
    data=mutated(_NPZ, header=0)
    | mutated(_NPY, header=12).map(_zip)
    | st.binary(max_size=200).map(lambda b: _zip(b"\x93NUMPY\x01\x00" + b))
    | mutated(_NPY, header=12).map(lambda b: _zip(b, "images.npy"))
)
def test_read_npz_of_any_bytes_returns_or_raises_a_format_error(place, data):
    path = place(data, ".npz")
    arr = _bounded(lambda: formats.read_npz(path, (-1, 28, 28), max_bytes=MAX))
    if arr is not None:
        assert arr.dtype == np.uint8 and arr.shape[1:] == (28, 28) and arr.nbytes <= MAX


_NPY_CHARS = "{}'(),: \n\t\\0123456789-_|<>u1OdescrfortanshapeTrueFalsL"


@FUZZ
@given(
    header=st.text(_NPY_CHARS, max_size=200)
    | st.text(max_size=60)
    | st.sampled_from(
        ["{'descr': '|u1', 'fortran_order': False, 'shape': (", "{'shape': ()}"]
    ).flatmap(lambda s: st.text(_NPY_CHARS, max_size=40).map(lambda t: s + t + "), }"))
)
def test_npy_header_of_any_text_is_parsed_or_refused(header):
    try:
        shape, fortran, descr = formats.parse_npy_header(
            "x.npy", header.encode("latin-1", "replace")
        )
    except FormatError:
        return
    assert all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(fortran, bool)
    assert isinstance(descr, str)


def test_npy_headers_numpy_writes_are_parsed():
    for arr in (np.zeros((0,), np.uint8), np.zeros((7, 28, 28), np.uint8), np.zeros(()), _IMAGES):
        raw = _npy(arr)
        n = int.from_bytes(raw[8:10], "little")
        assert formats.parse_npy_header("x", raw[10 : 10 + n])[0] == arr.shape


def test_a_zip_whose_directory_would_fill_memory_is_refused_before_zipfile_reads_it(place):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(3000):  # 3,000 entries: a directory of about 130 KB
            zf.writestr(f"{i}.npy", b"")
        zf.writestr("arr_0.npy", _NPY)
    path = place(buf.getvalue(), ".npz")
    with pytest.raises(FormatError, match="zip directory is at most 65536 bytes"):
        formats.read_npz(path)


# ------------------------------------------------------------------------------------- PNG


@FUZZ
@given(
    data=mutated(_PNG, header=0) | st.binary(max_size=64).map(lambda b: formats.PNG_SIGNATURE + b)
)
def test_png_header_and_decoding_of_any_bytes(place, data):
    problem = formats.png_problem(data, (64, 64))
    assert problem is None or isinstance(problem, str)
    path = place(data, ".png")
    img = _bounded(lambda: formats.read_gray_png(path, (64, 64)), most=(8 << 20))
    if img is not None:
        assert img.shape == (64, 64) and img.dtype == np.uint8 and problem is None


# ------------------------------------------------------------- not regular files, not read


@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink to a FIFO", "missing"])
def test_a_reader_refuses_what_is_not_a_regular_file_without_blocking(tmp_path, kind):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink to a FIFO":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    readers = [
        lambda: formats.read_idx(path, 3),
        lambda: formats.read_gzip(path),
        lambda: formats.read_npz(path),
        lambda: formats.read_gray_png(path, (64, 64)),
    ]
    for read in readers:
        done: list[BaseException] = []
        t = threading.Thread(target=_catch, args=(read, done), daemon=True)
        t.start()
        t.join(30)  # a reader that opened the FIFO would block here forever
        assert not t.is_alive() and len(done) == 1 and isinstance(done[0], FormatError)
        assert str(path) in str(done[0])
    if kind == "fifo":
        assert "not a regular file; it was not read" in str(done[0])


def _catch(read, out: list) -> None:
    try:
        read()
    except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
        out.append(exc)


def test_a_png_behind_a_symbolic_link_is_not_read(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(_PNG)
    link = tmp_path / "link.png"
    link.symlink_to(real)
    assert formats.read_gray_png(real, (64, 64)).shape == (64, 64)
    with pytest.raises(FormatError, match="symbolic link, never followed"):
        formats.read_gray_png(link, (64, 64))


def test_a_sparse_multi_gb_file_is_refused_by_its_size_unread(tmp_path):
    for name, read in [
        ("x.png", lambda p: formats.read_gray_png(p, (64, 64))),
        ("x.npz", formats.read_npz),
        ("x.gz", lambda p: formats.read_idx(p, 3)),
    ]:
        path = tmp_path / name
        with open(path, "wb") as fh:
            fh.write(_PNG if name.endswith("png") else b"PK")
            fh.truncate(3 << 30)  # 3 GiB, sparse: nothing of it is on disk
        tracemalloc.start()
        try:
            with pytest.raises(FormatError, match="refused unread"):
                read(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


# ----------------------------------------------------------------------------- settings

_SETTING_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
) | st.sampled_from(
    ["1e300", "-1e300", "1e-300", "inf", "nan", "10" * 30, "9" * 400, "1_000", " 7 ", "0x10"]
)


@FUZZ
@given(name=st.sampled_from(sorted(kt_settings.RANGES)), value=_SETTING_TEXT)
def test_every_setting_is_in_its_range_or_a_setting_error(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    low, closed, high = kt_settings.RANGES[name]
    try:
        out = kt_settings.setting(name, 5)
    except SettingError as exc:
        msg = str(exc)
        assert msg.startswith(f"${name}=") and "\n" not in msg and len(msg) < 200
        assert f"<= {kt_settings._num(high)}" in msg
        return
    assert low <= out <= high and (closed or out > low)


@FUZZ
@given(value=_SETTING_TEXT, mirror_list=_SETTING_TEXT)
def test_flags_mirrors_and_the_fetch_config_of_any_text(monkeypatch, value, mirror_list):
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", value)
    monkeypatch.setenv("KMNIST_TORCH_MIRRORS", mirror_list)
    try:
        found = mirrors()
    except UserError:
        return
    assert all(isinstance(b, str) and b.endswith("/") for b in found)


def test_the_extremes_of_every_range_together_stay_finite():
    # The most patient values allowed, all at once: every deadline still fits a timer, and no
    # back-off wait is longer than an hour, whatever the attempt.
    r = kt_settings.RANGES
    cfg = kt_settings.FetchConfig(
        timeout=r["KMNIST_TORCH_TIMEOUT"][2],
        retries=int(r["KMNIST_TORCH_RETRIES"][2]),
        backoff=r["KMNIST_TORCH_BACKOFF"][2],
        min_rate=r["KMNIST_TORCH_MIN_RATE"][0],
        grace=r["KMNIST_TORCH_GRACE"][2],
        max_bytes=int(r["KMNIST_TORCH_MAX_BYTES"][2]),
    )
    assert cfg.deadline_for(cfg.max_bytes) < threading.TIMEOUT_MAX
    timer = threading.Timer(cfg.deadline_for(cfg.max_bytes), lambda: None)
    timer.start()  # an overflow would surface in the timer's thread; cancel it at once
    timer.cancel()
    assert max(cfg.backoff_for(a) for a in range(cfg.retries + 1)) == 3600
    with pytest.raises(ValueError, match=r"FetchConfig.min_rate must be >= 1"):
        kt_settings.FetchConfig(min_rate=1e-300)
    with pytest.raises(ValueError, match=r"FetchConfig.retries must be >= 0 and <= 100"):
        kt_settings.FetchConfig(retries=10**18)


def test_decode_workers_are_capped_by_the_cores_and_the_work(monkeypatch):
    cores = kt_settings.usable_cores()
    monkeypatch.setenv("KMNIST_TORCH_DECODE_WORKERS", "1024")
    assert kt_settings.decode_workers() == cores
    assert kt_settings.decode_workers(1) == 1
    monkeypatch.setenv("KMNIST_TORCH_DECODE_WORKERS", "1025")
    with pytest.raises(SettingError, match=r"DECODE_WORKERS='1025'.*>= 1 and <= 1024"):
        kt_settings.decode_workers()


# ------------------------------------------------------------------ the command-line path


@pytest.mark.parametrize(
    "var,value",
    [("KMNIST_TORCH_TIMEOUT", "1e300"), ("KMNIST_TORCH_GRACE", "1e300"),
     ("KMNIST_TORCH_BACKOFF", "1e300"), ("KMNIST_TORCH_RETRIES", str(10**18)),
     ("KMNIST_TORCH_MIN_RATE", "1e-300"), ("KMNIST_TORCH_MAX_BYTES", str(2**34))],
)  # fmt: skip
def test_huge_settings_are_one_line_naming_the_range(var, value, tmp_path, monkeypatch, capsys):
    from kmnist_torch.cli import main

    monkeypatch.setenv("KMNIST_TORCH_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setenv("KMNIST_TORCH_OFFICIAL", "0")
    monkeypatch.setenv(var, value)
    assert main(["download", "kmnist", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    low, closed, high = kt_settings.RANGES[var]
    lines = [line for line in err.splitlines() if f"${var}={value!r} is not allowed" in line]
    assert lines and all(f"<= {kt_settings._num(high)}" in line for line in lines)
    assert "Traceback" not in err and not any(tmp_path.rglob("*.part"))


def _cli_cases(tmp_path: Path) -> list[tuple[list[str], dict, str]]:
    """(arguments, environment, what the one error line must say) for two hostile inputs."""
    images, labels = random_split(10)
    raw = write_split(tmp_path / "magic", "kmnist", "test", images, labels)
    gz = raw / "t10k-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(gz.read_bytes()))
    content[3] = 0x01  # the labels' magic where the images' belongs (verify=False reads it)
    gz.write_bytes(gzip.compress(bytes(content), mtime=0))
    montage = [sys.executable, "-m", "kmnist_torch", "montage", "--split", "test", "--no-verify"]
    return [
        (montage[:4] + ["kmnist"] + montage[4:] + ["--root", str(tmp_path / "magic"),
         "--out", str(tmp_path / "m.png")], {}, "expected idx magic 0x00000803, found 0x00000801"),
        ([sys.executable, "-m", "kmnist_torch", "info", "kmnist"],  # torch-free: no root read
         {"KMNIST_TORCH_OFFICIAL": "maybe\nnot"},
         "$KMNIST_TORCH_OFFICIAL='maybe\\nnot' is not allowed: use 1 or 0"),
    ]  # fmt: skip


def test_hostile_inputs_on_the_command_line_are_one_line_each(tmp_path):
    cases = _cli_cases(tmp_path)
    base = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = []
    for k, (argv, env, _) in enumerate(cases):  # all at once: each pays for its imports
        err = open(tmp_path / f"err{k}", "w+")
        procs.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                       env={**base, **env}), err))  # fmt: skip
    for (proc, err), (_, _, expected) in zip(procs, cases):
        rc = proc.wait(timeout=300)
        err.seek(0)
        text = err.read()
        err.close()
        assert rc == 1, text
        assert "Traceback" not in text
        lines = [line for line in text.splitlines() if expected in line]
        assert lines and all(line.startswith("error: ") for line in lines), text
    assert not (tmp_path / "m.png").exists()


def test_an_npz_header_that_is_not_a_literal_is_one_line_from_montage(tmp_path, capsys):
    from kmnist_torch.cli import main

    images, labels = random_split(10, "k49")
    raw = write_split(tmp_path / "npz", "k49", "test", images, labels)
    npz = raw / "k49-test-imgs.npz"
    npy = bytearray(_npy(np.zeros((10, 28, 28), np.uint8)))
    npy[npy.index(b"(10,") : npy.index(b"(10,") + 4] = b"(9**"  # not a literal: never evaluated
    npz.write_bytes(_zip(bytes(npy)))
    out = tmp_path / "n.png"
    argv = ["montage", "k49", "--split", "test", "--no-verify", "--root", str(tmp_path / "npz")]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "k49-test-imgs.npz: expected a .npy header" in lines[0]
    assert "Traceback" not in err and not out.exists()


# ------------------------------------------------- verify kkanji: an unrecorded tar is not OK


@pytest.mark.parametrize("kind", ["html", "subset"])
def test_verify_kkanji_never_says_ok_for_a_tar_it_never_checked(tmp_path, capsys, kind):
    from fakedata import kkanji_files, kkanji_tar

    from kmnist_torch.cli import main

    folder = tmp_path / "KKanji"
    folder.mkdir()
    tar = folder / "kkanji.tar"
    if kind == "html":
        tar.write_bytes(b"<!DOCTYPE html><html><body>Please log in</body></html>\n")
    else:  # 6 images where the full set has 140,424: no record says it was ever checked
        tar.write_bytes(kkanji_tar(kkanji_files(2, 3)))
    before = tar.read_bytes()
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "kkanji: BAD: " in out and "unrecorded and unchecked" in out and "OK" not in out
    # --repair checks it in full by extracting it: refused, and the user's file is left as is.
    assert main(["verify", "kkanji", "--root", str(tmp_path), "--repair"]) == 1
    out = capsys.readouterr().out
    why = "not a complete tar archive" if kind == "html" else "holds 2 classes and 6 images"
    assert "repair failed" in out and why in out
    assert tar.read_bytes() == before
    left = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))
    assert left == ["kkanji.tar"]  # no tree, no record: nothing a later run would trust


def test_verify_kkanji_repair_checks_and_records_an_unrecorded_full_tar(tmp_path, monkeypatch,
                                                                         capsys):  # fmt: skip
    import dataclasses

    from fakedata import kkanji_files, kkanji_tar

    from kmnist_torch import catalog
    from kmnist_torch.cli import main

    full = dataclasses.replace(catalog.KKANJI, num_classes=2, split_sizes={"all": 6})
    monkeypatch.setattr(catalog, "KKANJI", full)  # a catalog whose full set is these 6 images
    folder = tmp_path / "KKanji"
    folder.mkdir()
    (folder / "kkanji.tar").write_bytes(kkanji_tar(kkanji_files(2, 3)))
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 1
    assert "unrecorded and unchecked" in capsys.readouterr().out
    assert main(["verify", "kkanji", "--root", str(tmp_path), "--repair"]) == 0
    assert "repaired: 6 images" in capsys.readouterr().out
    assert (folder / "kkanji.tar.record.json").is_file()
    assert main(["verify", "kkanji", "--root", str(tmp_path)]) == 0
    assert "OK, 6 images in 2 classes" in capsys.readouterr().out
