"""A tar stream read header by header, for the loader's hot path.

:mod:`tarfile` in stream mode spends ~60 µs of Python per member (its buffered
``_Stream``, ``TarInfo.frombuf``, ``extractfile``); a frame-shard sample has ~10
members, so that was a quarter of the per-core loader time (`bench data`,
docs/benchmarks.md). :class:`PlainTar` parses the 512-byte ustar/GNU/pax headers
itself with the same outcome for what the reader needs: member name, whether it is a
regular file, the offset of its first header block, its size and its bytes (read only
when asked for: members nobody reads are passed over). A compressed tar (gzip, bz2, xz:
:func:`compression_of` its first bytes) is the same parser over :class:`Decompressed`,
the stdlib's streaming decompressor, so passing a member over decompresses at most what
the stream holds, in reads of at most 1 MiB (a declared 10^15 bytes ends at the stream's end).

Long-name / pax header members (``L``, ``x``, ``g``, ``K``) are read only while the ones
before a member add up to at most :data:`MAX_HEADER_BYTES`; past that they are passed
over unread and the member they describe carries their size in ``header`` (the reader
counts its sample ``oversize``; its name is then the header block's own).

Like tarfile, a garbled header (a bad checksum; here also a negative or unparsable size,
which would read the rest of the stream at once) after the first member ends the stream
silently at its offset (``offset``, the block read there in ``end_block``), so the
reader's end check (``_tar_end_problem``) reports it; a garbled first header, data cut
off inside a member or a broken compressed stream raise :class:`tarfile.ReadError`. A
small member's data, padding and the next header are one read of the stream, a large
member's data one read into its bytes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from typing import Callable, Iterator, Optional

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
READ_ALONG = 1 << 16  # a member's data + padding up to this size is read in one call with the next header
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
    """The header's stored checksum is the sum of its bytes, the checksum field counted
    as spaces. Summed by ``zlib.adler32`` started at 0, whose low half is the byte sum
    mod 65521: exact for runs of at most 256 bytes (255 x 256 < 65521), 4x faster than
    ``sum()`` over the bytes."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    view = memoryview(block)
    unsigned = (zlib.adler32(view[:148], 0) & 0xFFFF) + 8 * 32 + (zlib.adler32(view[156:412], 0) & 0xFFFF) \
        + (zlib.adler32(view[412:], 0) & 0xFFFF)
    return stored == unsigned


def looks_plain(head: bytes) -> bool:
    """Whether ``head`` (the first block) is an uncompressed tar header (or an empty tar)."""
    return len(head) == BLOCK and (head == ZERO_BLOCK or _checksum_ok(head))


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
    stopped (the end-of-archive block, or a garbled header) and ``end_block`` holds the
    bytes read there (the reader's end check looks at them).

    Few reads per member: the data, its padding and the next header come in one read
    (``ahead`` keeps the header) when they are at most :data:`READ_ALONG` bytes; a larger
    member's data is one read straight into its bytes (one copy), then padding + header."""

    def __init__(self, f) -> None:
        self.f, self.offset = f, 0
        self.pos = 0  # archive bytes consumed by the parser (``ahead`` not counted)
        self.pending = 0  # data + padding of the current member not yet consumed
        self.ahead = b""  # the next header block, read along with the previous member's data
        self.end_block = b""

    def _read(self, n: int, need: int) -> bytes:
        """``n`` bytes (fewer only at the end of the stream, never fewer than ``need``)."""
        data = self.f.read(n)
        if len(data) < n and data:
            data = data + read_exact(self.f, n - len(data))
        if len(data) < need:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def _take_along(self, n: int) -> None:
        """Consume the ``n`` bytes before the next header and keep that header in ``ahead``."""
        chunk = self._read(n + BLOCK, n)
        self.ahead = chunk[n:]
        self.pos += n

    def _skip_pending(self) -> None:
        while self.pending > READ_ALONG:  # a large member nobody reads: passed over 1 MiB at a time
            step = min(self.pending - READ_ALONG, 1 << 20)
            self._read(step, step)
            self.pos += step
            self.pending -= step
        self._take_along(self.pending)
        self.pending = 0

    def _data(self, size: int) -> bytes:
        pad = -size % BLOCK
        self.pending = 0
        if size + pad <= READ_ALONG:
            chunk = self._read(size + pad + BLOCK, size + pad)
            self.ahead, self.pos = chunk[size + pad:], self.pos + size + pad
            return chunk[:size]
        data = self._read(size, size)
        self.pos += size
        self._take_along(pad)
        return data

    def _block(self) -> bytes:
        block = self.ahead if self.ahead else read_exact(self.f, BLOCK)
        self.ahead, self.pos = b"", self.pos + len(block)
        return block

    def __iter__(self) -> Iterator[Member]:
        first = True
        while True:
            if self.pending:
                self._skip_pending()
            start = self.pos
            block = self._block()
            member = self._member(block, start, first)
            if member is None:
                self.offset, self.end_block = start, block
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
            if len(block) < BLOCK or block == ZERO_BLOCK:
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
                block = self._block()
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
