"""Bounded ``.npz`` reading: arrays only, sizes checked before and while decompressing.

``np.load`` decompresses each member whole, whatever its header says: a 264 KB deflate
bomb becomes 256 MiB of features. Here each member's ``.npy`` header is read first
(shape × itemsize, no pickled objects), the sum is checked against a byte budget before
any data is decompressed, and the data is then decompressed only up to what the header
declares: a member holding more (or less) than its header says is corrupt. Arrays come
back in their stored dtype.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from typing import Iterable, Optional

import numpy as np
from numpy.lib import format as npy_format

MAX_HEADER = 1 << 16  # a .npy header is a short dict literal


class NpzError(ValueError):
    """An npz that is not a plain-array archive as its headers declare it."""


class NpzOversize(NpzError):
    """Arrays that declare more bytes than the budget."""


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(f)
    reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = reader(f, max_header_size=MAX_HEADER)
    if dtype.hasobject:
        raise NpzError("holds Python objects (pickles are never loaded)")
    return tuple(int(n) for n in shape), bool(fortran), dtype


def _read_array(f, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, nbytes: int) -> np.ndarray:
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got : got + min(nbytes - got, 1 << 22)])
        if not n:
            raise NpzError(f"data ends after {got} of the {nbytes} bytes its header declares")
        got += n
    if f.read(1):
        raise NpzError("holds more data than its header declares")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def load_npz(data: bytes, names: Iterable[str], max_bytes: Optional[int] = None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (those present) of the npz ``data``. Raises :class:`NpzOversize`
    when their headers declare more than ``max_bytes`` in all (nothing decompressed
    then), :class:`NpzError` for anything else wrong."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        raise NpzError(f"not an npz archive ({err})") from None
    with zf:
        present = set(zf.namelist())
        members = [n for n in names if f"{n}.npy" in present]
        headers, total = {}, 0
        for name in members:
            with zf.open(f"{name}.npy") as f:
                headers[name] = _checked(lambda: _npy_header(f), name)
            shape, _, dtype = headers[name]
            total += math.prod(shape) * dtype.itemsize
        if max_bytes is not None and total > max_bytes:
            raise NpzOversize(f"arrays declare {total} bytes, more than the {max_bytes} allowed")
        out = {}
        for name in members:
            shape, fortran, dtype = headers[name]
            with zf.open(f"{name}.npy") as f:
                _checked(lambda: _npy_header(f), name)
                out[name] = _checked(lambda: _read_array(f, shape, fortran, dtype, math.prod(shape) * dtype.itemsize),
                                     name)
    return out


def _checked(fn, name: str):
    try:
        return fn()
    except NpzError as err:
        raise NpzError(f"'{name}' {err}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, zlib.error) as err:  # bad header, CRC, deflate
        raise NpzError(f"'{name}': {' '.join(str(err).split())[:200]}") from None
