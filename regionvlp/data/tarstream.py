"""A plain (uncompressed) tar stream read header by header, for the loader's hot path.

:mod:`tarfile` in stream mode spends ~60 µs of Python per member (its buffered
``_Stream``, ``TarInfo.frombuf``, ``extractfile``); a frame-shard sample has ~10
members, so that was a quarter of the per-core loader time (`bench data`,
docs/benchmarks.md). :func:`plain_members` parses the 512-byte ustar/GNU/pax headers
itself with the same outcome for what the reader needs: member name, whether it is a
regular file, the offset of its first header block, its size and its bytes (read only
when asked for: members nobody reads are passed over). Compressed tars
(:func:`looks_plain` is false) go to :mod:`tarfile` as before.

Like tarfile, a garbled header after the first member ends the stream silently at its
offset (``end``), so the reader's end check (``_tar_end_problem``) reports it; a
garbled first header or data cut off inside a member raise :class:`tarfile.ReadError`.
"""

from __future__ import annotations

import tarfile
from typing import Callable, Iterator, Optional

BLOCK = 512
MAX_HEADER_BYTES = 1 << 20  # a long-name / pax header member larger than this is a broken tar
REGULAR = (b"0", b"\0", b"7")  # regular, old regular, contiguous (tarfile's REGULAR_TYPES, less sparse)


def read_exact(f, n: int) -> bytes:
    """``n`` bytes of ``f``, fewer only at its end (an HTTP body may return short reads)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class PrefixedStream:
    """``head`` bytes already read, then the rest of ``f``."""

    def __init__(self, head: bytes, f) -> None:
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + read_exact(self.f, n - len(out))


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == unsigned


def looks_plain(head: bytes) -> bool:
    """Whether ``head`` (the first block) is an uncompressed tar header (or an empty tar)."""
    return len(head) == BLOCK and (not head.strip(b"\0") or _checksum_ok(head))


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345:346] != b"\0":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix and block[257:263] == b"ustar\0":  # POSIX ustar (GNU keeps no prefix there)
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _sparse_unsupported() -> bytes:
    raise tarfile.ReadError("a sparse member within data.max_sample_bytes: sparse members are not read")


class Member:
    """One member: ``name``, ``isreg``, ``offset`` (its first header block), ``size``; ``read()``."""

    __slots__ = ("name", "isreg", "offset", "size", "read")

    def __init__(self, name: str, isreg: bool, offset: int, size: int, read: Callable[[], bytes]) -> None:
        self.name, self.isreg, self.offset, self.size, self.read = name, isreg, offset, size, read


class PlainTar:
    """Iterate :class:`Member` s of a plain tar stream; ``offset`` ends where the archive
    stopped (the end-of-archive block, or a garbled header)."""

    def __init__(self, f) -> None:
        self.f, self.offset = f, 0
        self.pos = 0  # bytes consumed from f
        self.pending = 0  # data + padding of the current member not yet consumed

    def _take(self, n: int) -> bytes:
        data = read_exact(self.f, n)
        self.pos += len(data)
        if len(data) < n:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def _skip_pending(self) -> None:
        while self.pending:
            chunk = self.f.read(min(self.pending, 1 << 16))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            self.pos += len(chunk)
            self.pending -= len(chunk)

    def _data(self, size: int) -> bytes:
        data = self._take(size)
        pad = -size % BLOCK
        if pad:
            self._take(pad)
        self.pending = 0
        return data

    def __iter__(self) -> Iterator[Member]:
        first = True
        while True:
            self._skip_pending()
            start = self.pos
            block = read_exact(self.f, BLOCK)
            self.pos += len(block)
            member = self._member(block, start, first)
            if member is None:
                self.offset = start
                return
            first = False
            yield member

    def _member(self, block: bytes, start: int, first: bool) -> Optional[Member]:
        long_name: Optional[str] = None
        pax: dict[str, str] = {}
        while True:
            if len(block) < BLOCK or not block.strip(b"\0"):
                return None
            if not _checksum_ok(block):
                if first:
                    raise tarfile.ReadError("invalid header")
                return None
            kind, size = block[156:157], _number(block[124:136])
            if kind in (b"L", b"x", b"g", b"K"):  # GNU long name, pax header: data describes the next member
                if not 0 <= size <= MAX_HEADER_BYTES:  # never read whole (a 1 GiB long name took 2.6 GB)
                    raise tarfile.ReadError(f"tar header member of {size} bytes at byte {self.pos - BLOCK} "
                                            f"(more than {MAX_HEADER_BYTES})")
                data = self._data(size)
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax.update(_pax(data))
                block = read_exact(self.f, BLOCK)
                self.pos += len(block)
                continue
            name = pax.get("path") or long_name or _name(block)
            if kind == b"5":
                name = name.rstrip("/")  # as tarfile names directories
            size = int(pax["size"]) if "size" in pax else size
            self.pending = size + (-size % BLOCK)
            if kind == b"S":  # old-GNU sparse: sized by its real size (the oversize bound), never expanded
                return Member(name, True, start, _number(block[483:495]), _sparse_unsupported)
            return Member(name, kind in REGULAR, start, size, lambda size=size: self._data(size))
