"""``regions.bin``: a sample's region arrays as raw little-endian bytes behind a small JSON header.

Layout (every integer little-endian)::

    b"RVRG"  uint16 version (1)  uint16 0  uint32 H   header: H bytes of UTF-8 JSON
    zero padding to a multiple of 64, then each array's bytes at its stated offset

The header is ``{"arrays": {NAME: {"dtype": "<f2", "shape": [T, K, F], "offset": N}}}``.
Reading is a view: every array is ``np.frombuffer`` over the member's bytes, no zip
parsing and no copy. Nothing is allocated before the header has been checked: each
array's dtype must be one its name allows, its shape have the stated rank, and
``offset + prod(shape) * itemsize`` lie inside the bytes present. A checked layout is
remembered by its header bytes and the member's length (:func:`layout_key`, the last
64): the samples of a shard share one, parsed once.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from regionvlp.data.decode import DecodeError


MAGIC = b"RVRG"
VERSION = 1
PREFIX = struct.Struct("<4sHHI")  # magic, version, reserved, header length
MAX_HEADER = 4096  # a header names at most six small arrays
ALIGN = 64
# name -> (rank, allowed dtypes); feats_scale: int8 feats' per-region scale (x = q * scale)
ARRAY_SPECS: dict[str, tuple[int, tuple[str, ...]]] = {
    "feats": (3, ("<f2", "<f4", "|i1")),
    "feats_scale": (2, ("<f2", "<f4")),
    "boxes": (3, ("<f2", "<f4")),
    "mask": (2, ("|b1",)),
    "labels": (2, ("|u1", "<i2", "<i4", "<i8")),
    "scores": (2, ("<f2", "<f4")),
}
DTYPES = {s: np.dtype(s) for _, names in ARRAY_SPECS.values() for s in names}


def _bad(detail: str) -> DecodeError:
    return DecodeError("corrupt_regions", f"regions.bin {detail}")


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The parsed header and where the array bytes may start."""
    if len(data) < PREFIX.size:
        raise _bad(f"is {len(data)} bytes, shorter than its {PREFIX.size}-byte prefix")
    magic, version, _, size = PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise _bad(f"starts {magic!r} v{version}, not {MAGIC!r} v{VERSION}")
    if size > MAX_HEADER or PREFIX.size + size > len(data):
        raise _bad(f"header of {size} bytes does not fit (max {MAX_HEADER}, member {len(data)})")
    try:
        header = json.loads(bytes(data[PREFIX.size:PREFIX.size + size]))
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(f"header is not JSON ({str(err)[:80]})") from None
    arrays = header.get("arrays") if isinstance(header, dict) else None
    if not isinstance(arrays, dict):
        raise _bad("header has no 'arrays' object")
    return arrays, PREFIX.size + size


def _checked(name: str, entry: Any, start: int, total: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and offset of one declared array, checked against the bytes present."""
    if name not in ARRAY_SPECS or not isinstance(entry, dict):
        raise _bad(f"declares an unknown array {name!r}")
    rank, dtypes = ARRAY_SPECS[name]
    dtype, shape, offset = entry.get("dtype"), entry.get("shape"), entry.get("offset")
    if dtype not in dtypes:
        raise DecodeError("region_shape", f"regions.bin '{name}' has dtype {dtype!r}; expected one of {dtypes}")
    if (not isinstance(shape, list) or len(shape) != rank
            or not all(type(d) is int and 0 <= d for d in shape)):
        raise _bad(f"'{name}' has shape {shape!r}; expected {rank} non-negative integers")
    dt = DTYPES[dtype]
    if type(offset) is not int or offset < start or offset % dt.itemsize:
        raise _bad(f"'{name}' has offset {offset!r} (header ends at {start})")
    nbytes = math.prod(shape) * dt.itemsize  # python ints: no overflow on a hostile shape
    if offset + nbytes > total:
        raise _bad(f"'{name}' declares {shape} x {dt.itemsize} B at {offset}, past the {total} bytes present")
    return dt, tuple(shape), offset


Layout = dict[str, tuple[np.dtype, tuple[int, ...], int, int]]  # name -> dtype, shape, offset, count
_LAYOUTS: dict[tuple[bytes, int], Layout] = {}  # (prefix + header bytes, member length) -> its checked layout
MAX_LAYOUTS = 64


def layout_key(data: bytes) -> tuple[bytes, int]:
    """What a member's layout depends on: its prefix and header bytes, and its length
    (equal keys: equal layouts, so a checked one is looked up, not parsed again)."""
    size = int.from_bytes(data[8:12], "little") if len(data) >= PREFIX.size else 0
    return bytes(data[: PREFIX.size + min(size, MAX_HEADER)]), len(data)


def _layout(data: bytes, key: tuple[bytes, int]) -> Layout:
    placed = _LAYOUTS.get(key)
    if placed is None:
        entries, start = _header(data)
        placed = {name: (dt, shape, off, math.prod(shape))
                  for name, (dt, shape, off) in ((n, _checked(n, e, start, len(data))) for n, e in entries.items())}
        if len(_LAYOUTS) >= MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = placed
    return placed


def read_arrays(data: bytes, key: tuple[bytes, int] | None = None) -> dict[str, np.ndarray]:
    """``regions.bin`` bytes -> read-only numpy views into them, by name (checked first;
    a layout seen before, by :func:`layout_key`, is not parsed again)."""
    placed = _layout(data, key if key is not None else layout_key(data))
    return {name: np.frombuffer(data, dtype=dt, count=count, offset=off).reshape(shape)
            for name, (dt, shape, off, count) in placed.items()}


def write_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays (dtypes and ranks as :data:`ARRAY_SPECS` allows) -> ``regions.bin`` bytes."""
    entries: dict[str, dict[str, Any]] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
        if name not in ARRAY_SPECS or arr.dtype.str not in ARRAY_SPECS[name][1] or arr.ndim != ARRAY_SPECS[name][0]:
            raise ValueError(f"regions.bin cannot hold {name!r} {arr.dtype.str} of rank {arr.ndim}")
        entries[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        blobs.append(arr.tobytes() + b"\0" * (-arr.nbytes % ALIGN))
        offset += len(blobs[-1])
    # offsets are relative until the header's own length is known; it fits in a few digits more
    rel = json.dumps({"arrays": entries}, separators=(",", ":")).encode()
    base = -(-(PREFIX.size + len(rel) + 16 * len(entries) + ALIGN) // ALIGN) * ALIGN
    for entry in entries.values():
        entry["offset"] += base
    header = json.dumps({"arrays": entries}, separators=(",", ":")).encode()
    head = PREFIX.pack(MAGIC, VERSION, 0, len(header)) + header
    if len(header) > MAX_HEADER or len(head) > base:
        raise ValueError("regions.bin header too long")
    return head + b"\0" * (base - len(head)) + b"".join(blobs)
