"""The download path against a real HTTP server on 127.0.0.1: mirrors, HTTP errors, dropped
connections and resume, stalls, checksums, locking; and the decoders' errors on bad files."""

from __future__ import annotations

import gzip
import multiprocessing as mp
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
from conftest import make_target, mirror_env
from fakedata import random_split

from kmnist_torch import KMNIST, DataFilesError, FormatError
from kmnist_torch.data.formats import read_idx, read_npz, write_idx
from kmnist_torch.data.resplit import write_split
from kmnist_torch.download.connection import NoDowngradeRedirect
from kmnist_torch.download.fetch import download
from kmnist_torch.errors import DownloadError
from kmnist_torch.settings import FetchConfig

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def _target(tmp_path, urls, data=PAYLOAD, **kw):
    return make_target(tmp_path, urls, data, **kw)


def _no_leftovers(folder, keep=("file.bin",)):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep) == []


def test_404_and_500_on_first_mirror_then_second(tmp_path, http_server, fast_net):
    http_server.add("/m2/f", PAYLOAD)
    http_server.script("/m1/f", 500, 500, 500)  # a 5xx is retried, then given up
    cfg = FetchConfig(retries=2, backoff=0)
    t = _target(tmp_path, [f"{http_server.url}/m0/f", f"{http_server.url}/m1/f",
                           f"{http_server.url}/m2/f"])  # fmt: skip
    md5, _ = download(t, cfg)
    assert md5 == t.md5 and t.dest.read_bytes() == PAYLOAD
    assert len(http_server.hits("/m0/f")) == 1  # 404 is final for that mirror
    assert len(http_server.hits("/m1/f")) == 3
    assert _no_leftovers(tmp_path)


def test_connection_dropped_mid_file_is_resumed_with_range(tmp_path, http_server, fast_net):
    http_server.add("/f", PAYLOAD)
    http_server.script("/f", "drop:300000")
    t = _target(tmp_path, [f"{http_server.url}/f"])
    download(t, FetchConfig(retries=2, backoff=0))
    assert t.dest.read_bytes() == PAYLOAD
    hits = http_server.hits("/f")
    assert len(hits) == 2 and hits[1].get("Range") == "bytes=300000-"
    assert _no_leftovers(tmp_path)


def test_server_ignoring_range_restarts_cleanly(tmp_path, http_server, fast_net):
    http_server.add("/f", PAYLOAD)
    http_server.script("/f", "drop:1000", "norange")
    t = _target(tmp_path, [f"{http_server.url}/f"])
    download(t, FetchConfig(retries=2, backoff=0))
    assert t.dest.read_bytes() == PAYLOAD


def test_partial_file_from_earlier_run_is_resumed(tmp_path, http_server, fast_net):
    # A first run is cut off after 5000 bytes and gives up; the partial and the record of the
    # URL that wrote it stay, and the next run resumes from that URL.
    http_server.add("/f", PAYLOAD)
    http_server.script("/f", "drop:5000")
    t = _target(tmp_path, [f"{http_server.url}/f"])
    with pytest.raises(DownloadError):
        download(t, FetchConfig(retries=0, backoff=0))
    assert (tmp_path / "file.bin.part").stat().st_size == 5000
    assert (tmp_path / "file.bin.part.json").is_file()
    download(t, FetchConfig(retries=0, backoff=0))
    assert t.dest.read_bytes() == PAYLOAD
    assert http_server.hits("/f")[1]["Range"] == "bytes=5000-"
    assert _no_leftovers(tmp_path)


def test_stalled_server_times_out_and_next_mirror_serves(tmp_path, http_server, fast_net):
    http_server.add("/good/f", PAYLOAD)
    http_server.script("/slow/f", "stall", "stall")
    t = _target(tmp_path, [f"{http_server.url}/slow/f", f"{http_server.url}/good/f"])
    start = time.monotonic()
    download(t, FetchConfig(timeout=0.5, retries=1, backoff=0))
    assert time.monotonic() - start < 10
    assert t.dest.read_bytes() == PAYLOAD


def test_all_mirrors_failing_names_each_url_and_leaves_nothing(tmp_path, http_server, fast_net):
    http_server.add("/bad/f", b"x" * len(PAYLOAD))  # right size, wrong content
    http_server.script("/slow/f", "stall")
    t = _target(tmp_path, [f"{http_server.url}/bad/f", f"{http_server.url}/slow/f",
                           f"{http_server.url}/none/f"])  # fmt: skip
    with pytest.raises(DownloadError) as err:
        download(t, FetchConfig(timeout=0.3, retries=0, backoff=0))
    msg = str(err.value)
    assert "/bad/f: downloaded file has md5" in msg
    assert "/slow/f: " in msg and "timed out" in msg
    assert "/none/f: HTTP 404" in msg
    assert f"put it at: {t.dest}" in msg and t.md5 in msg
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_on_first_mirror_moves_on(tmp_path, http_server, fast_net):
    http_server.add("/bad/f", PAYLOAD[::-1])
    http_server.add("/good/f", PAYLOAD)
    t = _target(tmp_path, [f"{http_server.url}/bad/f", f"{http_server.url}/good/f"])
    download(t, FetchConfig(retries=0, backoff=0))
    assert t.dest.read_bytes() == PAYLOAD


def test_https_to_http_redirect_is_refused():

    handler = NoDowngradeRedirect()
    req = urllib.request.Request("https://mirror.example/kmnist/f")
    with pytest.raises(urllib.error.HTTPError, match="insecure"):
        handler.redirect_request(req, None, 302, "Found", {}, "http://evil.example/f")
    ok = handler.redirect_request(req, None, 302, "Found", {}, "https://other.example/f")
    assert ok.full_url == "https://other.example/f"


def _serve_fixture_split(server, prefix: str, tmp_path, n: int = 40) -> np.ndarray:
    """Serve a KMNIST test split written by the package's own writer (npz), at ``prefix``."""
    images, labels = random_split(n)
    folder = write_split(tmp_path / "src", "kmnist", "test", images, labels, fmt="npz")
    for f in folder.iterdir():
        server.add(f"{prefix}/kmnist/{f.name}", f.read_bytes())
    return labels


def test_dataset_download_uses_mirror_after_a_broken_one(tmp_path, http_server, fast_net):
    labels = _serve_fixture_split(http_server, "/good", tmp_path)
    http_server.script("/bad/kmnist/kmnist-test-imgs.npz", 500, 500, 500)
    mirror_env(fast_net, f"{http_server.url}/bad", f"{http_server.url}/good")
    with pytest.warns(UserWarning, match="verify=False"):
        ds = KMNIST(tmp_path / "root", train=False, download=True, format="npz", verify=False)
    assert ds.targets.tolist() == labels.tolist()
    assert len(http_server.hits("/bad/kmnist/kmnist-test-imgs.npz")) == 3


def test_dataset_all_mirrors_fail_lists_files(tmp_path, http_server, fast_net):
    mirror_env(fast_net, f"{http_server.url}/nowhere")
    with pytest.raises(DataFilesError) as err:
        KMNIST(tmp_path, train=False, download=True)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "5c965bf0a639b31b8f53240b1b52f4d7" in msg and "HTTP 404" in msg
    raw = tmp_path / "KMNIST" / "raw"
    assert not any(p.suffix in (".gz", ".part") for p in raw.iterdir())


def _download_in_process(root, url, q):
    import os

    os.environ.update(KMNIST_TORCH_MIRRORS=url, KMNIST_TORCH_OFFICIAL="0",
                      KMNIST_TORCH_TIMEOUT="5", no_proxy="127.0.0.1")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # verify=False says so once per process
            ds = KMNIST(root, train=False, download=True, format="npz", verify=False)
        q.put(int(ds.targets.sum()))
    except Exception as exc:  # report, don't hang the parent
        q.put(repr(exc))


def test_two_processes_download_into_one_root(tmp_path, http_server, fast_net):
    labels = _serve_fixture_split(http_server, "", tmp_path)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_download_in_process, args=(str(tmp_path), http_server.url, q))
             for _ in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [int(labels.sum())] * 2
    # The lock makes the second process wait and reuse: each file fetched exactly once.
    assert len(http_server.hits("/kmnist/kmnist-test-imgs.npz")) == 1
    raw = tmp_path / "KMNIST" / "raw"
    assert not list(raw.glob("*.part")) and not list(raw.glob("*.tmp"))


# ----------------------------------------------------------------------------- decoders


def test_truncated_gz_is_a_format_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(FormatError, match="t10k-images-idx3-ubyte.gz: expected a complete gzip"):
        read_idx(path, 3)


def test_truncated_gz_with_verify_off_leaves_no_trusted_copy(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(10, np.uint8))
    blob = (raw / "t10k-images-idx3-ubyte.gz").read_bytes()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.warns(UserWarning), pytest.raises(FormatError, match="gzip"):
        KMNIST(tmp_path, train=False, verify=False)
    assert not (raw / "t10k-images-idx3-ubyte").exists()


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros(5, np.uint8))  # labels file where images are expected
    with pytest.raises(FormatError, match=r"x.gz: expected idx magic 0x00000803, found 0x00000801"):
        read_idx(path, 3)


def test_idx_wrong_length(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.zeros((4, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(FormatError, match="3136 data bytes .* found 3137"):
        read_idx(path, 3)
    with pytest.raises(FormatError, match="dimensions N x 64 x 64"):
        write_idx(path, np.zeros((4, 28, 28), np.uint8), compress=False)
        read_idx(path, 3, (-1, 64, 64))


def test_idx_header_too_short(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(gzip.compress(b"\0\0\x08\x01\0"))
    with pytest.raises(FormatError, match="idx header"):
        read_idx(path, 1)


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(FormatError, match="evil.npz: expected a plain uint8 array"):
        read_npz(path)


def test_npz_wrong_dtype_key_shape_and_truncation(tmp_path):
    p = tmp_path / "a.npz"
    np.savez_compressed(p, np.zeros((3, 28, 28), np.float32))
    with pytest.raises(FormatError, match="dtype uint8"):
        read_npz(p)
    np.savez_compressed(p, images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(FormatError, match="key 'arr_0'"):
        read_npz(p)
    np.savez_compressed(p, np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(FormatError, match="shape N x 28 x 28"):
        read_npz(p, (-1, 28, 28))
    np.savez_compressed(p, np.zeros((3, 28, 28), np.uint8))
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(FormatError, match="a.npz: expected a complete npz"):
        read_npz(p)
