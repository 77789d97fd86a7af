"""A tar stream read header by header, for the loader's hot path.

:mod:`tarfile` in stream mode spends ~60 µs of Python per member (its buffered
``_Stream``, ``TarInfo.frombuf``, ``extractfile``); a frame-shard sample has ~10
members, so that was a quarter of the per-core loader time (`bench data`,
docs/benchmarks.md). :func:`plain_members` parses the 512-byte ustar/GNU/pax headers
itself with the same outcome for what the reader needs: member name, whether it is a
regular file, the offset of its first header block, its size and its bytes (read only
when asked for: members nobody reads are passed over). A compressed tar (gzip, bz2, xz:
:func:`compression_of` its first bytes) is the same parser over :class:`Decompressed`,
the stdlib's streaming decompressor, so passing a member over decompresses at most what
the stream holds, in 64 KiB reads (a declared 10^15 bytes ends at the stream's end).

Long-name / pax header members (``L``, ``x``, ``g``, ``K``) are read only while the ones
before a member add up to at most :data:`MAX_HEADER_BYTES`; past that they are passed
over unread and the member they describe carries their size in ``header`` (the reader
counts its sample ``oversize``; its name is then the header block's own).

Like tarfile, a garbled header (a bad checksum; here also a negative or unparsable size,
which would read the rest of the stream at once) after the first member ends the stream
silently at its offset (``end``), so the reader's end check (``_tar_end_problem``)
reports it; a garbled first header, data cut off inside a member or a broken compressed
stream raise :class:`tarfile.ReadError`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from typing import Callable, Iterator, Optional

BLOCK = 512
MAX_HEADER_BYTES = 1 << 20  # long-name / pax header members of one member past this are passed over unread
HEADER_KINDS = (b"L", b"x", b"g", b"K")  # GNU long name / link, pax header, pax global header
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
    """A size field's value; -1 for a garbled or negative one (which would read the rest
    of the stream at once)."""
    if field[:1] == b"\x80":  # GNU base-256 (0xff, negative, is no size)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return max(-1, int(text, 8)) if text else 0
    except ValueError:
        return -1


def _size_text_ok(text: str) -> bool:
    """Whether a pax ``size`` is a decimal size (at most 20 digits: int() refuses 4300)."""
    return text.isascii() and text.isdigit() and len(text) <= 20


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
        length = int(data[pos:space]) if data[pos:space].isdigit() else 0
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _sparse_unsupported() -> bytes:
    raise tarfile.ReadError("a sparse member within data.max_sample_bytes: sparse members are not read")


class Member:
    """One member: ``name``, ``isreg``, ``offset`` (its first header block), ``size``; ``read()``;
    ``header``: the bytes of the long-name / pax header members before it (over
    :data:`MAX_HEADER_BYTES`: they were passed over unread)."""

    __slots__ = ("name", "isreg", "offset", "size", "read", "header")

    def __init__(self, name: str, isreg: bool, offset: int, size: int, read: Callable[[], bytes],
                 header: int = 0) -> None:
        self.name, self.isreg, self.offset, self.size, self.read = name, isreg, offset, size, read
        self.header = header


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

    def _broken(self, first: bool) -> None:
        """A header with a garbled size: the end of the archive, as tarfile stops at it (a broken first one raises)."""
        if first:
            raise tarfile.ReadError(f"invalid size in the tar header before byte {self.pos}")

    def _member(self, block: bytes, start: int, first: bool) -> Optional[Member]:
        long_name: Optional[str] = None
        pax: dict[str, str] = {}
        header = 0  # bytes of the header members that describe this member
        while True:
            if len(block) < BLOCK or not block.strip(b"\0"):
                return None
            if not _checksum_ok(block):
                if first:
                    raise tarfile.ReadError("invalid header")
                return None
            kind, size = block[156:157], _number(block[124:136])
            if size < 0:  # a broken header, as a bad checksum
                return self._broken(first)
            if kind in HEADER_KINDS:  # GNU long name, pax header: data describes the next member
                header += size
                if header > MAX_HEADER_BYTES:  # passed over unread (a 1 GiB long name took 2.6 GB)
                    self.pending = size + (-size % BLOCK)
                    self._skip_pending()
                else:
                    data = self._data(size)
                    if kind == b"L":
                        long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    elif kind == b"x":
                        pax.update(_pax(data))
                        if not _size_text_ok(pax.get("size", "0")):
                            return self._broken(first)
                block = read_exact(self.f, BLOCK)
                self.pos += len(block)
                continue
            name = pax.get("path") or long_name or _name(block)
            if kind == b"5":
                name = name.rstrip("/")  # as tarfile names directories
            size = int(pax["size"]) if "size" in pax else size
            self.pending = size + (-size % BLOCK)
            if kind == b"S":  # old-GNU sparse: sized by its real size (the oversize bound), never expanded
                return Member(name, True, start, _number(block[483:495]), _sparse_unsupported, header)
            return Member(name, kind in REGULAR, start, size, lambda size=size: self._data(size), header)


COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00\x80\x00", "xz"))
_OPENERS = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bz2": lambda f: bz2.BZ2File(f, mode="rb"),
            "xz": lambda f: lzma.LZMAFile(f, mode="rb")}  # xz also reads the old .lzma format
_BROKEN = (EOFError, OSError, zlib.error, lzma.LZMAError)  # cut off, bad magic / CRC, bad data


def compression_of(head: bytes) -> Optional[str]:
    """``"gzip"``, ``"bz2"`` or ``"xz"`` from a stream's first bytes (as tarfile's ``r|*``), else None."""
    return next((kind for magic, kind in COMPRESSIONS if head.startswith(magic)), None)


class _RawReads:
    """The compressed stream, keeping the error of a failed read: that one is the source's, not the archive's."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except BaseException as err:
            self.error = err
            raise


class Decompressed:
    """The uncompressed bytes of ``f``, a ``kind`` (:func:`compression_of`) stream,
    decompressed as they are read (each read returns at most what it asks for). A cut-off
    or broken compressed stream raises :class:`tarfile.ReadError`; a failed read of ``f``
    raises its own error."""

    def __init__(self, f, kind: str) -> None:
        self.kind, self.raw = kind, _RawReads(f)
        self.f = _OPENERS[kind](self.raw)

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except _BROKEN as err:
            if err is self.raw.error:
                raise
            raise tarfile.ReadError(f"broken {self.kind} stream: {err}") from err
