"""Pure decoders from files on disk to NumPy arrays; each validates what it reads.

No network and no torch here. Every error names the file, what was expected and what was found.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import FormatError


def _fail(path: os.PathLike | str, expected: str, found: str) -> FormatError:
    return FormatError(
        f"{path}: expected {expected}, found {found}. The file is damaged or not the official "
        "one: delete it and download it again (or pass the right file)."
    )


# The most bytes an idx or npz array may hold before anything is allocated or inflated: the
# largest official array (K49 train images) is 182 MB.
MAX_ARRAY_BYTES = 1 << 30
IDX_MAGICS = {0x00000801: 1, 0x00000802: 2, 0x00000803: 3, 0x00000804: 4}


def read_gzip(path: os.PathLike | str, max_bytes: int = MAX_ARRAY_BYTES) -> bytes:
    """The decompressed bytes of a gzip file, or a FormatError if the stream is broken.

    Never inflates more than it needs: when the content starts with an idx header, no more than
    the header's dimensions promise (anything after that is an error, found after inflating
    one byte more); otherwise at most ``max_bytes``. Memory stays at the size of the result."""
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(4)
            magic = int.from_bytes(head, "big") if len(head) == 4 else None
            if magic in IDX_MAGICS:
                ndim = IDX_MAGICS[magic]
                dims_raw = fh.read(4 * ndim)
                head += dims_raw
                if len(dims_raw) == 4 * ndim:
                    dims = struct.unpack(f">{ndim}I", dims_raw)
                    n_bytes = _bounded_size(path, dims, max_bytes)
                    body = fh.read(n_bytes)
                    if len(body) == n_bytes and fh.read(1):
                        raise _fail(
                            path,
                            f"{n_bytes} data bytes for dimensions {_shape_str(dims)}",
                            "more data after them (decompression stopped there)",
                        )
                    return head + body
                return head
            rest = fh.read(max_bytes + 1 - len(head))
            if len(head) + len(rest) > max_bytes:
                raise _fail(path, f"at most {max_bytes} bytes once decompressed", "more")
            return head + rest
    except (EOFError, OSError, zlib.error) as exc:
        raise _fail(path, "a complete gzip stream", f"a broken one ({exc})") from exc


def _bounded_size(path, dims: tuple[int, ...], max_bytes: int) -> int:
    n_bytes = 1
    for d in dims:
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


def read_idx(
    path: os.PathLike | str,
    ndim: int,
    shape: tuple[int, ...] | None = None,
    max_bytes: int = MAX_ARRAY_BYTES,
) -> np.ndarray:
    """Read an MNIST idx file (``.gz`` or uncompressed) of unsigned bytes with ``ndim`` dims.

    ``shape`` (with ``-1`` for "any") is checked when given, from the header, before the data
    is read or inflated; so is ``max_bytes``. Returns a read-only uint8 array."""
    path = Path(path)
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    header_len = 4 + 4 * ndim
    try:
        with opener(path, "rb") as fh:
            head = fh.read(header_len)
            if len(head) >= 4:
                magic = int.from_bytes(head[:4], "big")
                if magic != 0x00000800 | ndim:
                    raise _fail(path, f"idx magic 0x{0x00000800 | ndim:08X}", f"0x{magic:08X}")
            if len(head) < header_len:
                found = f"{len(head)} bytes in all"
                raise _fail(path, f"an idx header of {header_len} bytes", found)
            dims = struct.unpack(f">{ndim}I", head[4:])
            _check_dims(path, dims, ndim, shape)
            n_bytes = _bounded_size(path, dims, max_bytes)
            body = fh.read(n_bytes)
            extra = len(fh.read(1)) if len(body) == n_bytes else 0
    except (EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, FormatError):
            raise
        raise _fail(path, "a complete gzip stream", f"a broken one ({exc})") from exc
    if len(body) != n_bytes or extra:
        found = f"{len(body)}"
        if extra:
            found = (
                "more data after them (decompression stopped there)"
                if gzipped
                else f"{path.stat().st_size - header_len}"
            )
        raise _fail(path, f"{n_bytes} data bytes for dimensions {_shape_str(dims)}", found)
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def parse_idx(
    raw: bytes, path: os.PathLike | str, ndim: int, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Decode the bytes of an idx file read from ``path`` (named in errors)."""
    magic_expected = 0x00000800 | ndim
    header_len = 4 + 4 * ndim
    if len(raw) >= 4:
        magic = int.from_bytes(raw[:4], "big")
        if magic != magic_expected:
            raise _fail(path, f"idx magic 0x{magic_expected:08X}", f"0x{magic:08X}")
    if len(raw) < header_len:
        raise _fail(path, f"an idx header of {header_len} bytes", f"{len(raw)} bytes in all")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    _check_dims(path, dims, ndim, shape)
    n_bytes = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header_len != n_bytes:
        raise _fail(
            path,
            f"{n_bytes} data bytes for dimensions {_shape_str(dims)}",
            f"{len(raw) - header_len}",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def read_npz(
    path: os.PathLike | str,
    shape: tuple[int, ...] | None = None,
    max_bytes: int = MAX_ARRAY_BYTES,
) -> np.ndarray:
    """Read the ``arr_0`` uint8 array of an official npz file, never unpickling anything.

    The ``.npy`` header inside the zip is read first: dtype, ``shape`` and ``max_bytes`` are
    checked, and the member's declared uncompressed size compared with them, before anything
    is allocated or inflated; then exactly that many bytes are inflated."""
    path = Path(path)
    with open(path, "rb") as fh:
        lead = fh.read(64)
    if not lead.startswith(b"PK"):
        shown = lead[:24].decode("latin-1").strip()
        hint = " (an HTML page: a proxy or web page was saved instead)" if b"<" in lead else ""
        found = f"something else, starting {shown!r}{hint}"
        raise _fail(path, "an npz file (a zip archive)", found)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
            if "arr_0" not in names:
                raise _fail(path, "an npz with key 'arr_0'", f"keys {names}")
            info = zf.getinfo("arr_0.npy")
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    hshape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                else:
                    hshape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                header_len = member.tell()
                if dtype.hasobject:
                    raise _fail(path, "a plain uint8 array (no pickled objects)", f"dtype {dtype}")
                if dtype != np.uint8:
                    raise _fail(path, "dtype uint8", f"dtype {dtype}")
                if shape is not None and (
                    len(hshape) != len(shape)
                    or any(s not in (-1, d) for s, d in zip(shape, hshape))
                ):
                    raise _fail(path, f"shape {_shape_str(shape)}", f"shape {_shape_str(hshape)}")
                n_bytes = _bounded_size(path, hshape, max_bytes)
                if info.file_size != header_len + n_bytes:
                    raise _fail(
                        path,
                        f"an arr_0.npy of {header_len + n_bytes} bytes for shape "
                        f"{_shape_str(hshape)}",
                        f"{info.file_size} bytes declared in the zip",
                    )
                body = member.read(n_bytes)
                if len(body) != n_bytes or member.read(1):
                    raise _fail(path, f"{n_bytes} data bytes", "a different amount")
    except FormatError:
        raise
    except ValueError as exc:  # a damaged .npy header
        raise _fail(path, "a plain uint8 array (no pickled objects)", str(exc)) from exc
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, KeyError) as exc:
        raise _fail(path, "a complete npz (zip) file", f"a broken one ({exc})") from exc
    arr = np.frombuffer(body, dtype=np.uint8)
    return arr.reshape(hshape, order="F" if fortran else "C")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_problem(data: bytes, size: tuple[int, int]) -> str | None:
    """Why ``data`` is not a ``size`` (width, height) 8-bit grayscale PNG, judged from its
    header alone (no decoding), or None."""
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


def read_gray_png(path: os.PathLike | str, size: tuple[int, int]) -> np.ndarray:
    """One ``size`` 8-bit grayscale PNG as a uint8 (height x width) array; a FormatError naming
    the file for anything else (checked from the header first, then by decoding)."""
    with open(path, "rb") as fh:
        data = fh.read()
    problem = png_problem(data, size)
    if problem is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if im.size == tuple(size) and im.mode == "L":
                    return np.asarray(im, dtype=np.uint8)
                problem = f"a {im.size[0]}x{im.size[1]} image of mode {im.mode}"
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
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
