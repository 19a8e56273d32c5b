"""The one boundary where outside bytes become arrays: idx (gzipped or not), npz, PNG headers.

Every reader here is bounded before it trusts anything it read: only a regular file is opened
(a FIFO or a device is refused without blocking on it), its size on disk is checked first, a
header's dimensions are checked against ``max_bytes`` before anything is allocated or inflated,
and data is read in chunks, so memory follows the bytes actually there, not the bytes a header
claims. For any input a reader returns its array or raises :class:`FormatError` naming the file,
what was expected and what was found; ``tests/test_fuzz.py`` checks that with Hypothesis, and
``benchmarks/fuzz.py`` measures the time and memory bounds. No network and no torch here.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .._io import open_regular as open_regular_file
from ..errors import FormatError


def _fail(path: os.PathLike | str, expected: str, found: str) -> FormatError:
    return FormatError(
        f"{path}: expected {expected}, found {found}. The file is damaged or not the official "
        "one: delete it and download it again (or pass the right file)."
    )


# The most bytes an idx or npz array may hold before anything is allocated or inflated: the
# largest official array (K49 train images) is 182 MB.
MAX_ARRAY_BYTES = 1 << 30
# The most bytes of a compressed file per byte it may inflate to (deflate's worst case is 0.03%
# larger than its input), plus room for headers: a bigger file on disk is refused unread.
_SLACK = 1 << 20
CHUNK = 1 << 24  # bytes read or inflated at a time
IDX_MAGICS = {0x00000801: 1, 0x00000802: 2, 0x00000803: 3, 0x00000804: 4}
# Errors the standard library's readers raise on damaged input, each turned into a FormatError.
_BROKEN = (EOFError, OSError, zlib.error, struct.error, ValueError, zipfile.BadZipFile)


def open_regular(path: os.PathLike | str, follow_links: bool = True) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file; a FormatError otherwise.

    Opened without blocking (a FIFO is refused at once, never waited on), and checked with
    ``fstat`` on the open file, so what is read is what was checked. ``follow_links=False``
    refuses a symbolic link at ``path`` without reading what it points to."""
    try:
        return open_regular_file(path, follow_links)
    except OSError as exc:
        if not follow_links and os.path.islink(path):
            raise FormatError(f"{path}: a symbolic link, never followed: put the file itself "
                              "there") from exc  # fmt: skip
        if exc.errno is None:  # not a regular file: the message says what it is
            raise FormatError(f"{exc}; it was not read: put the file itself there") from exc
        raise FormatError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _check_file_size(path, fh: BinaryIO, most: int) -> int:
    size = os.fstat(fh.fileno()).st_size
    if size > most:
        raise _fail(path, f"a file of at most {most} bytes", f"{size} bytes (refused unread)")
    return size


def _read_upto(fh: BinaryIO, n: int, out: bytearray | None = None) -> bytearray:
    """``out`` (default empty) extended by at most ``n`` bytes of ``fh``, read a chunk at a
    time: memory grows with what is there, and nothing is copied twice."""
    out = bytearray() if out is None else out
    n += len(out)
    while len(out) < n:
        chunk = fh.read(min(CHUNK, n - len(out)))
        if not chunk:
            break
        out += chunk
    return out


def _bounded_size(path, dims: tuple[int, ...], max_bytes: int) -> int:
    n_bytes = 1
    for d in dims:
        if int(d) < 0:
            raise _fail(path, "dimensions >= 0", f"dimensions {_shape_str(dims)}")
        n_bytes *= int(d)
    if n_bytes > max_bytes:
        raise _fail(
            path,
            f"an array of at most {max_bytes} bytes",
            f"a header claiming {_shape_str(dims)} = {n_bytes} bytes (refused before reading)",
        )
    return n_bytes


def _check_dims(path, dims: tuple[int, ...], ndim: int, shape) -> None:
    if shape is not None and (
        len(shape) != ndim or any(s not in (-1, d) for s, d in zip(shape, dims))
    ):
        raise _fail(path, f"dimensions {_shape_str(shape)}", f"{_shape_str(dims)}")


def _check_magic(path, head: bytes, ndim: int | None) -> int:
    """The idx magic at the start of ``head``: the number of dimensions it announces, or a
    FormatError naming the magic found (and the one expected, when ``ndim`` is given)."""
    magic = int.from_bytes(head[:4], "big")
    found = f"0x{magic:08X}" + ("" if magic in IDX_MAGICS else " (not an idx file)")
    if ndim is not None and magic != 0x00000800 | ndim:
        raise _fail(path, f"idx magic 0x{0x00000800 | ndim:08X}", found)
    if magic not in IDX_MAGICS:
        raise _fail(path, "an idx magic (0x00000801 to 0x00000804)", found)
    return IDX_MAGICS[magic]


def _read_idx_stream(
    fh: BinaryIO, path, ndim: int | None, shape, max_bytes: int, gzipped: bool
) -> tuple[bytearray, tuple[int, ...]]:
    """The whole idx file from ``fh``: magic, dimensions and exactly the data they promise,
    each checked before the next is read; never reads more than one byte past the data."""
    head = _read_upto(fh, 4)
    if len(head) < 4:
        raise _fail(path, "an idx header", f"{len(head)} bytes in all")
    ndim = _check_magic(path, head, ndim)
    header_len = 4 + 4 * ndim
    head = _read_upto(fh, header_len - 4, head)
    if len(head) < header_len:
        raise _fail(path, f"an idx header of {header_len} bytes", f"{len(head)} bytes in all")
    dims = struct.unpack(f">{ndim}I", head[4:header_len])
    _check_dims(path, dims, ndim, shape)
    n_bytes = _bounded_size(path, dims, max_bytes)
    body = _read_upto(fh, n_bytes, head)
    if len(body) - header_len != n_bytes or fh.read(1):
        found = f"{len(body) - header_len}"
        if len(body) - header_len == n_bytes:
            found = "more data after them" + (" (decompression stopped there)" if gzipped else "")
        raise _fail(path, f"{n_bytes} data bytes for dimensions {_shape_str(dims)}", found)
    return body, dims


def _as_array(raw: bytearray, offset: int, dims) -> np.ndarray:
    arr = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)
    arr.flags.writeable = False
    return arr


def read_gzip(
    path: os.PathLike | str, max_bytes: int = MAX_ARRAY_BYTES, ndim: int | None = None
) -> bytearray:
    """The decompressed bytes of a gzip file, or a FormatError if the stream is broken.

    Never inflates more than it needs: when the content starts with an idx header (of ``ndim``
    dimensions when given: any other magic is an error naming it), no more than the header's
    dimensions promise, and anything after that is an error; otherwise at most ``max_bytes``.
    Memory stays at the size of the result."""
    with open_regular(path) as raw_fh:
        _check_file_size(path, raw_fh, max_bytes + max_bytes // 64 + _SLACK)
        try:
            with gzip.GzipFile(fileobj=raw_fh, mode="rb") as fh:
                head = _read_upto(fh, 4)
                magic = int.from_bytes(head, "big") if len(head) == 4 else None
                if ndim is not None or magic in IDX_MAGICS:
                    fh.seek(0)
                    return _read_idx_stream(fh, path, ndim, None, max_bytes, True)[0]
                head = _read_upto(fh, max_bytes + 1 - len(head), head)
        except FormatError:
            raise
        except _BROKEN as exc:
            raise _fail(path, "a complete gzip stream", f"a broken one ({exc})") from exc
    if len(head) > max_bytes:
        raise _fail(path, f"at most {max_bytes} bytes once decompressed", "more")
    return head


def read_idx(
    path: os.PathLike | str,
    ndim: int,
    shape: tuple[int, ...] | None = None,
    max_bytes: int = MAX_ARRAY_BYTES,
) -> np.ndarray:
    """Read an MNIST idx file (``.gz`` or uncompressed) of unsigned bytes with ``ndim`` dims.

    The magic, then ``shape`` (with ``-1`` for "any") and ``max_bytes`` are checked from the
    header before the data is read or inflated; an uncompressed file's size on disk must be
    exactly what its header promises. Returns a read-only uint8 array."""
    path = Path(path)
    with open_regular(path) as fh:
        size = _check_file_size(path, fh, max_bytes + max_bytes // 64 + _SLACK)
        gzipped = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        try:
            if gzipped:
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    raw, dims = _read_idx_stream(gz, path, ndim, shape, max_bytes, True)
            else:
                _check_plain_header(path, fh.read(4 + 4 * ndim), ndim, shape, max_bytes, size)
                fh.seek(0)
                raw, dims = _read_idx_stream(fh, path, ndim, shape, max_bytes, False)
        except FormatError:
            raise
        except _BROKEN as exc:
            raise _fail(path, "a complete gzip stream", f"a broken one ({exc})") from exc
    return _as_array(raw, 4 + 4 * ndim, dims)


def _check_plain_header(path, head: bytes, ndim: int, shape, max_bytes: int, size: int) -> None:
    """An uncompressed idx file's header against its size on disk, before its data is read."""
    if len(head) < 4 + 4 * ndim:
        return  # _read_idx_stream names what is missing
    _check_magic(path, head, ndim)
    dims = struct.unpack(f">{ndim}I", head[4:])
    _check_dims(path, dims, ndim, shape)
    n_bytes = _bounded_size(path, dims, max_bytes)
    if size - len(head) != n_bytes:
        raise _fail(path, f"{n_bytes} data bytes for dimensions {_shape_str(dims)}",
                    f"{size - len(head)}")  # fmt: skip


def parse_idx(
    raw: bytes, path: os.PathLike | str, ndim: int, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Decode the bytes of an idx file read from ``path`` (named in errors)."""
    header_len = 4 + 4 * ndim
    if len(raw) < 4:
        raise _fail(path, f"an idx header of {header_len} bytes", f"{len(raw)} bytes in all")
    _check_magic(path, raw, ndim)
    if len(raw) < header_len:
        raise _fail(path, f"an idx header of {header_len} bytes", f"{len(raw)} bytes in all")
    dims = struct.unpack(f">{ndim}I", bytes(raw[4:header_len]))
    _check_dims(path, dims, ndim, shape)
    n_bytes = 1
    for d in dims:
        n_bytes *= d
    if len(raw) - header_len != n_bytes:
        raise _fail(
            path,
            f"{n_bytes} data bytes for dimensions {_shape_str(dims)}",
            f"{len(raw) - header_len}",
        )
    return _as_array(raw, header_len, dims)


# ------------------------------------------------------------------------------------- npz

_ZIP_END = b"PK\x05\x06"
_MAX_DIRECTORY = 1 << 16  # bytes of a zip's central directory: an npz's is about 100
_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 4096  # numpy writes 128 bytes for any uint8 array
_UINT8 = {"|u1", "<u1", ">u1", "=u1", "u1", "|B", "B"}
_NPY_ITEM = re.compile(
    r"\s*'(descr|fortran_order|shape)'\s*:\s*"
    r"('[^'\\]{0,32}'|True|False|\(\s*(?:\d{1,19}\s*,\s*)*(?:\d{1,19}\s*)?\))\s*(,|(?=\}))"
)


def _zip_directory_size(path, fh: BinaryIO, size: int) -> None:
    """Refuse a zip whose central directory is large (a listing that alone would fill memory)
    before :mod:`zipfile` reads it; found as :mod:`zipfile` finds it."""
    tail_len = min(size, 22 + 65535)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(_ZIP_END)
    if tail[-22:-18] == _ZIP_END and tail[-2:] == b"\0\0":  # no comment: as zipfile looks
        at = tail_len - 22
    if at < 0 or at + 22 > len(tail):
        raise _fail(path, "a complete npz (zip) file", "no zip end record (a cut file?)")
    _, _, _, _, n_entries, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[at : at + 22])
    if cd_size == 0xFFFFFFFF or n_entries == 0xFFFF:  # zip64: the locator is just before
        loc = tail[max(0, at - 20) : at]
        if len(loc) == 20 and loc[:4] == b"PK\x06\x07":
            fh.seek(struct.unpack("<Q", loc[8:16])[0])
            rec = fh.read(56)
            if len(rec) == 56 and rec[:4] == b"PK\x06\x06":
                cd_size = struct.unpack("<Q", rec[40:48])[0]
    if cd_size > _MAX_DIRECTORY:
        raise _fail(path, f"an npz whose zip directory is at most {_MAX_DIRECTORY} bytes",
                    f"{cd_size} bytes (refused before reading it)")  # fmt: skip
    fh.seek(0)


def parse_npy_header(path, raw: bytes) -> tuple[tuple[int, ...], bool, str]:
    """(shape, fortran_order, dtype descr) from the dict of a ``.npy`` header (``raw``, at most
    :data:`_MAX_NPY_HEADER` bytes), parsed as numpy writes it, never evaluated."""
    text = raw.decode("latin-1").strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise _fail(path, "a .npy header (a dict)", f"{text[:40]!r}")
    items, pos, body = {}, 1, text[:-1]
    while pos < len(body):
        m = _NPY_ITEM.match(body, pos)
        if m is None:
            if body[pos:].strip():
                raise _fail(path, "a .npy header of descr, fortran_order, shape",
                            f"{body[pos : pos + 40]!r}")  # fmt: skip
            break
        if m.group(1) in items:
            raise _fail(path, "a .npy header naming each key once", f"{m.group(1)} twice")
        items[m.group(1)], pos = m.group(2), m.end()
    if set(items) != {"descr", "fortran_order", "shape"}:
        raise _fail(path, "a .npy header of descr, fortran_order, shape", f"keys {sorted(items)}")
    if items["fortran_order"] not in ("True", "False") or items["descr"][0] != "'":
        raise _fail(path, "a .npy header of descr, fortran_order, shape", f"{items}")
    shape = tuple(int(d) for d in re.findall(r"\d+", items["shape"]))
    return shape, items["fortran_order"] == "True", items["descr"][1:-1]


def _read_npy_header(path, member: BinaryIO) -> tuple[tuple[int, ...], bool, int]:
    """(shape, fortran_order, header length) of the ``.npy`` at the start of ``member``; dtype
    uint8 is required (an object dtype, which would need unpickling, is named as such)."""
    lead = member.read(10)
    if len(lead) < 10 or not lead.startswith(_NPY_MAGIC) or lead[6] not in (1, 2, 3):
        raise _fail(path, "a .npy array in arr_0.npy", f"{bytes(lead[:10])!r}")
    if lead[6] == 1:
        n, start = struct.unpack("<H", lead[8:10])[0], 10
    else:
        lead += member.read(2)
        n, start = (struct.unpack("<I", lead[8:12])[0] if len(lead) == 12 else -1), 12
    if not 0 <= n <= _MAX_NPY_HEADER:
        raise _fail(path, f"a .npy header of at most {_MAX_NPY_HEADER} bytes", f"{n} bytes")
    raw = member.read(n)
    if len(raw) != n:
        raise _fail(path, f"a .npy header of {n} bytes", f"{len(raw)}")
    shape, fortran, descr = parse_npy_header(path, raw)
    if descr not in _UINT8:
        what = "a plain uint8 array (no pickled objects)" if "O" in descr else "dtype uint8"
        raise _fail(path, what, f"dtype {descr!r}")
    return shape, fortran, start + n


def read_npz(
    path: os.PathLike | str,
    shape: tuple[int, ...] | None = None,
    max_bytes: int = MAX_ARRAY_BYTES,
) -> np.ndarray:
    """Read the ``arr_0`` uint8 array of an official npz file, never unpickling anything.

    The zip's directory size is checked before :mod:`zipfile` reads it; the ``.npy`` header
    inside is read (at most 4 KiB) and parsed without evaluating it: dtype, ``shape`` and
    ``max_bytes`` are checked, and the member's declared size compared with them, before
    anything is allocated or inflated; then exactly that many bytes are inflated."""
    path = Path(path)
    with open_regular(path) as fh:
        size = _check_file_size(path, fh, max_bytes + max_bytes // 64 + _SLACK)
        lead = fh.read(64)
        if not lead.startswith(b"PK"):
            shown = lead[:24].decode("latin-1").strip()
            hint = " (an HTML page: a proxy or web page was saved instead)" if b"<" in lead else ""
            raise _fail(path, "an npz file (a zip archive)", f"something else, starting "
                        f"{shown!r}{hint}")  # fmt: skip
        _zip_directory_size(path, fh, size)
        try:
            body, hshape, fortran = _read_arr_0(path, fh, shape, max_bytes)
        except FormatError:
            raise
        except (*_BROKEN, KeyError, RuntimeError, NotImplementedError) as exc:
            # RuntimeError: an encrypted member; NotImplementedError: an unknown compression
            raise _fail(path, "a complete npz (zip) file", f"a broken one ({exc})") from exc
    arr = np.frombuffer(body, dtype=np.uint8).reshape(hshape, order="F" if fortran else "C")
    arr.flags.writeable = False
    return arr


def _read_arr_0(path, fh: BinaryIO, shape, max_bytes: int):
    with zipfile.ZipFile(fh) as zf:
        names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
        if "arr_0" not in names:
            raise _fail(path, "an npz with key 'arr_0'", f"keys {names[:8]}")
        info = zf.getinfo("arr_0.npy")
        with zf.open(info) as member:
            hshape, fortran, header_len = _read_npy_header(path, member)
            if shape is not None and (
                len(hshape) != len(shape) or any(s not in (-1, d) for s, d in zip(shape, hshape))
            ):
                raise _fail(path, f"shape {_shape_str(shape)}", f"shape {_shape_str(hshape)}")
            n_bytes = _bounded_size(path, hshape, max_bytes)
            if info.file_size != header_len + n_bytes:
                raise _fail(
                    path,
                    f"an arr_0.npy of {header_len + n_bytes} bytes for shape {_shape_str(hshape)}",
                    f"{info.file_size} bytes declared in the zip",
                )
            body = _read_upto(member, n_bytes)
            if len(body) != n_bytes or member.read(1):
                raise _fail(path, f"{n_bytes} data bytes", "a different amount")
    return body, hshape, fortran


# ------------------------------------------------------------------------------------- PNG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 1 << 20  # a 64x64 grayscale PNG is a few KB


def png_problem(data: bytes, size: tuple[int, int]) -> str | None:
    """Why ``data`` is not a ``size`` (width, height) 8-bit grayscale PNG, judged from its
    header alone (no decoding), or None. ``data`` may be the first 33 bytes only."""
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG file (no PNG signature)"
    if len(data) < 33 or data[12:16] != b"IHDR":
        return "a PNG without a complete IHDR header"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if (width, height, depth, colour) != (*size, 8, 0):
        kind = (
            "8-bit grayscale"
            if (depth, colour) == (8, 0)
            else f"bit depth {depth}, colour type {colour}"
        )
        return f"a {width}x{height} PNG ({kind}); expected {size[0]}x{size[1]} 8-bit grayscale"
    return None


def read_gray_png(
    path: os.PathLike | str, size: tuple[int, int], max_bytes: int = MAX_PNG_BYTES
) -> np.ndarray:
    """One ``size`` 8-bit grayscale PNG as a uint8 (height x width) array; a FormatError naming
    the file for anything else. Only a regular file is read, never through a symbolic link;
    its size on disk is checked first (at most ``max_bytes``), then its header (33 bytes), and
    only then is the rest read and decoded."""
    with open_regular(path, follow_links=False) as fh:
        n = os.fstat(fh.fileno()).st_size
        if n > max_bytes:
            raise _fail(path, f"a {size[0]}x{size[1]} 8-bit grayscale PNG",
                        f"{n} bytes, more than {max_bytes} (refused unread)")  # fmt: skip
        data = fh.read(33)
        problem = png_problem(data, size)
        if problem is None:
            data += _read_upto(fh, max_bytes - len(data))
    if problem is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if im.size == tuple(size) and im.mode == "L":
                    return np.asarray(im, dtype=np.uint8)
                problem = f"a {im.size[0]}x{im.size[1]} image of mode {im.mode}"
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
            problem = f"an undecodable PNG ({exc})"
    raise _fail(path, f"a {size[0]}x{size[1]} 8-bit grayscale PNG", problem)


def _shape_str(shape) -> str:
    return " x ".join("N" if s == -1 else str(s) for s in shape)


def write_idx(path: os.PathLike | str, arr: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array as an MNIST idx file (gzip-compressed by default), as the official
    files are; for fixtures, subsets and benchmarks."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = (0x00000800 | arr.ndim).to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    payload = header + arr.tobytes()
    if compress:
        # zlib's default level: level 9 (gzip's default) takes a minute on images of few grey
        # levels, for 10% fewer bytes.
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    Path(path).write_bytes(payload)


def write_npz(path: os.PathLike | str, arr: np.ndarray) -> None:
    """Write a uint8 array as the official npz files are: compressed, key ``arr_0``."""
    with open(path, "wb") as fh:
        np.savez_compressed(fh, np.ascontiguousarray(arr, dtype=np.uint8))
