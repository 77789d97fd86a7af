"""The tar reader: shard URLs → tar members → raw samples grouped by key, and where it stands.

    shard urls ─ open (retries, HTTP/S3 Range at the byte reached, unreadable shard skipped)
      └─ tar members (sizes bounded from the header before reading) ─ grouped by key

A raw sample is ``__key__``, ``__url__``, ``__ref__`` (``[shard, offset, index,
seekable]``: where it lies, for re-reading by reference) and ext → bytes. The reader
keeps a :class:`~regionvlp.data.consumer.ReadCursor` on the next sample, so a consumer
resumed from its position opens each shard at its byte offset (:func:`tar_samples`) and
re-reads only what it held by reference (:func:`read_refs`), once :func:`checked_position`
has compared the shards the position names with the shards now at their places (a shard
that changed is read from its start, never at a stale offset). Bad input never raises: an
unreadable or broken shard and an oversize sample are skipped and counted
(:class:`~regionvlp.data.skips.SkipCounter`).
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from regionvlp.config import DataConfig, mask_secrets
from regionvlp.data.consumer import ReadCursor, SampleShare, identity_change, shard_identity
from regionvlp.data.skips import SkipCounter, short_error
from regionvlp.data.tarstream import (BLOCK, MAX_HEADER_BYTES, Decompressed, PlainTar, PrefixedStream,
                                      compression_of, looks_plain, read_exact)
from regionvlp.data.sources import DEFAULT_TIMEOUT, PROGRAMMING_ERRORS, open_shard, scheme_of
from regionvlp.errors import UserError


log = logging.getLogger(__name__)


def _split_name(name: str) -> tuple[Optional[str], str]:
    """``dir/key.ext.more`` → (``dir/key``, ``ext.more``), as webdataset groups files."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


@dataclass
class ReadOptions:
    """How shards are read: retries, backoff, timeout and the per-sample byte bound (``data.*``)."""

    retries: int = 3
    backoff: float = 0.5
    allow_pipe: bool = False
    timeout: float = DEFAULT_TIMEOUT
    max_sample_bytes: Optional[int] = DataConfig.max_sample_bytes

    @classmethod
    def of(cls, cfg) -> "ReadOptions":
        d = cfg.data
        return cls(int(d.retries), float(d.retry_backoff), bool(d.allow_pipe), float(d.read_timeout_s),
                   int(d.max_sample_bytes))


def tar_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    opts: Optional[ReadOptions] = None,
    *,
    max_consecutive_failures: Optional[int] = None,
    share: Optional[SampleShare] = None,
    cursor: Optional[ReadCursor] = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, ``__ref__``, ext → bytes) from tar shards,
    read as ``opts`` says (default :class:`ReadOptions`; ``ReadOptions.of(cfg)`` for a
    config's ``data.*``). An unreadable shard is skipped and counted; a tar that breaks
    off yields what came before. A sample whose members add up to more than
    ``opts.max_sample_bytes`` (sizes from the tar headers) is skipped as ``oversize``
    without reading its data. With a ``share``, only its samples are read (``__index__``
    set); the others' members are passed over by header, unread. ``cursor`` says where
    to start (a resumed position) and, while iterating, where the next sample begins."""
    opts = opts if opts is not None else ReadOptions()
    cursor = cursor if cursor is not None else ReadCursor()
    failures = 0
    for pos, url in enumerate(urls):
        if pos < cursor.shard:  # a resumed position lies past this shard
            continue
        start = cursor.offset if pos == cursor.shard else 0
        cursor.move(pos, start, share)
        produced = yield from shard_samples(url, pos, start, counter, opts, share=share, cursor=cursor)
        cursor.move(pos + 1, 0, share)
        failures = 0 if produced else failures + 1
        if max_consecutive_failures and failures >= max_consecutive_failures:
            last = counter.bad[-1]["detail"] if counter.bad and counter.bad[-1]["url"] == url else "no samples"
            raise UserError(f"{failures} shards in a row gave no samples (last: {url}: {last})")


class StaleOffset(Exception):
    """A shard opened at a saved byte offset holds no tar header there: it changed."""


def shard_samples(url: str, pos: int, start: int, counter: SkipCounter, opts: ReadOptions, *,
                  share: Optional[SampleShare] = None, cursor: Optional[ReadCursor] = None, restart: bool = True):
    """The raw samples of shard ``url`` (``pos`` in the consumer's list) from the sample
    whose first header is at byte ``start``: a seek where the source allows it, else the
    members before ``start`` are passed over by header. A seek that finds no tar header
    (the shard changed since the position was taken) reads the shard from its start
    instead, with a warning (``restart``; else :class:`StaleOffset` is raised). Returns
    whether any sample came."""
    try:
        stream = open_shard(url, retries=opts.retries, backoff=opts.backoff, allow_pipe=opts.allow_pipe,
                            timeout=opts.timeout, offset=start if start and cursor_seekable(url, cursor) else 0)
    except (UserError,) + PROGRAMMING_ERRORS:
        raise
    except Exception as err:
        counter.add("unreadable_shard", url=url, detail=short_error(err))
        return False
    reader = _ShardReader(url, pos, stream.offset, start, counter, share, cursor)
    reader.oversize, reader.size = _Oversize(opts.max_sample_bytes, counter, url), stream.size
    stale = False
    try:
        yield from reader.samples(_CountingStream(stream))
    except (UserError,) + PROGRAMMING_ERRORS:
        raise
    except StaleOffset:
        if not restart:
            raise
        stale = True
    except Exception as err:  # tarfile.ReadError / EOFError: broken tar; OSError: reads failed after retries
        broken_tar = isinstance(err, (tarfile.TarError, EOFError)) or reader.produced
        what = "corrupt_shard" if broken_tar else "unreadable_shard"
        counter.add(what, key=(reader.current or {}).get("__key__", ""), url=url, detail=short_error(err))
    finally:
        stream.close()
    if stale:
        log.warning("resume: no tar header at byte %d of shard %s (it changed since the checkpoint); reading it "
                    "from its start", start, mask_secrets(url))
        if cursor is not None:
            cursor.move(pos, 0, share)
        return (yield from shard_samples(url, pos, 0, counter, opts, share=share, cursor=cursor))
    return reader.produced


def cursor_seekable(url: str, cursor: Optional[ReadCursor]) -> bool:
    """Whether a position in ``url`` is reached by opening at its byte offset (plain tar
    from a file, HTTP, S3 or GCS) rather than by passing members over from the start."""
    return scheme_of(url) != "pipe" and (cursor is None or cursor.seekable)


class _ShardReader:
    """Groups one tar stream's members into samples; keeps the cursor on the next sample."""

    def __init__(self, url: str, pos: int, base: int, skip_to: int, counter: SkipCounter,
                 share: Optional[SampleShare], cursor: Optional[ReadCursor]) -> None:
        self.url, self.pos, self.base, self.skip_to = url, pos, base, skip_to
        self.counter, self.share, self.cursor = counter, share, cursor
        self.current: Optional[dict[str, Any]] = None
        self.produced = False
        self.seekable = True  # False: a compressed tar (offsets count uncompressed bytes)
        self.oversize = _Oversize(None, counter, url)
        self.size: Optional[int] = None  # the shard's size as its source reports it
        self.end = 0  # where the tar archive stopped (its end block, or a garbled header)
        self.end_problem: Optional[str] = None  # a compressed tar's end check (on its uncompressed bytes)
        self.end_block = b""  # the block read there (the end check looks at it)

    def emit(self) -> dict[str, Any]:
        if not self.produced:
            self.produced, self.counter.shards = True, self.counter.shards + 1
        out, self.current = self.current, None
        return out

    def members(self, counted: "_CountingStream") -> Iterator[Any]:
        """The stream's members (``name``, ``isreg``, ``offset``, ``size``, ``header``,
        ``read()``), parsed header by header (:mod:`~regionvlp.data.tarstream`); a gzip,
        bz2 or xz tar through its streaming decompressor. :attr:`end` is where the archive
        stopped; a compressed tar's end is checked here (:attr:`end_problem`). Read from
        byte 0, its first block gives the shard's identity (kept in the cursor); read from
        a saved offset, that block must be a tar header (else :class:`StaleOffset`)."""
        head = read_exact(counted, BLOCK)
        if self.base > 0 and not (head.strip(b"\0") and looks_plain(head)):
            raise StaleOffset(self.base)
        if self.base == 0 and self.cursor is not None:
            self.cursor.identities[self.pos] = shard_identity(self.url, self.size, head)
        stream = PrefixedStream(head, counted)
        if looks_plain(head):
            plain = PlainTar(stream)
            yield from plain
            self.end, self.end_block = plain.offset, plain.end_block
            return
        kind = compression_of(head)
        if kind is None:
            raise tarfile.ReadError("empty file" if not head else "not a tar archive (nor a gzip, bz2 or xz one)")
        self.seekable = False  # offsets count uncompressed bytes: skip headers to reach them
        if self.cursor is not None:
            self.cursor.seekable = False
        inner = _CountingStream(Decompressed(stream, kind))
        plain = PlainTar(inner)
        yield from plain
        self.end, self.end_block = plain.offset, plain.end_block
        self.end_problem = _compressed_end_problem(inner, plain.offset, plain.end_block)

    def samples(self, counted: "_CountingStream") -> Iterator[dict[str, Any]]:
        last_key, index = None, None
        for info in self.members(counted):
            key, ext = _split_name(info.name) if info.isreg else (None, "")
            where = self.base + info.offset  # the member's first header block in the shard
            if key is None or key.rpartition("/")[2].startswith("__") or where < self.skip_to:
                continue
            if self.current is not None and self.current["__key__"] != key:
                if self.cursor is not None:
                    self.cursor.move(self.pos, where, self.share)
                yield self.emit()
            if key != last_key:
                last_key, index = key, (self.share.take() if self.share is not None else -1)
                start = where
            if index is None:  # another consumer's sample: skipped by its header
                continue
            if self.oversize.skip(key, info.size, info.header):
                self.current = None
                continue
            data = info.read()
            if self.current is None:
                self.current = {"__key__": key, "__url__": self.url, "__ref__": [self.pos, start, index, self.seekable]}
                if self.share is not None:
                    self.current["__index__"] = index
            self.current[ext] = data
        # the end check counts archive bytes: a compressed tar's were checked on its uncompressed stream
        problem = _tar_end_problem(counted, self.end, self.end_block) if self.seekable else self.end_problem
        if self.current is not None:  # whole files only; a missing caption/media is caught downstream
            if self.cursor is not None:
                self.cursor.move(self.pos + 1, 0, self.share)
            yield self.emit()
        if problem is not None:
            raise tarfile.ReadError(problem)
        if not self.produced:  # a well-formed empty tar (or none of this consumer's samples) still counts as read
            self.counter.shards += 1


class _Oversize:
    """Per-sample byte budget from tar headers: a sample over it is counted once as
    ``oversize`` and its remaining members are passed over unread. A member's long-name /
    pax header members count in its size; over ``MAX_HEADER_BYTES`` they were passed over
    unread (the member's real name and size are unknown), so its sample is ``oversize``
    whatever the budget."""

    def __init__(self, limit: Optional[int], counter: SkipCounter, url: str) -> None:
        self.limit, self.counter, self.url = limit, counter, url
        self.key: Optional[str] = None  # the sample being measured
        self.total = 0
        self.dropped: Optional[str] = None  # key of the sample already skipped

    def skip(self, key: str, size: int, header: int = 0) -> bool:
        limit = self.limit
        if limit is None:
            if header <= MAX_HEADER_BYTES:
                return False
            limit = -1
        if key != self.key:
            self.key, self.total = key, 0
        self.total += int(size) + header
        if key == self.dropped:
            return True
        if self.total <= limit and header <= MAX_HEADER_BYTES:
            return False
        self.dropped = key
        detail = (f"long-name / pax tar header members of {header} bytes (over {MAX_HEADER_BYTES}) passed over unread"
                  if header > MAX_HEADER_BYTES else
                  f"members declare {self.total} bytes > data.max_sample_bytes={self.limit}")
        self.counter.add("oversize", key=key, url=self.url, detail=detail)
        return True


class _CountingStream:
    """Pass-through reader that counts bytes, so the end of a tar stream can be checked
    after the parser stops reading."""

    def __init__(self, f) -> None:
        self.f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data


def _tar_end_problem(stream: _CountingStream, end: int, block: bytes, max_trailing: int = 1 << 20) -> Optional[str]:
    """Why a tar that was read "to the end" is in fact cut off or broken: the block at
    ``end`` where the parser stopped (``block``, the bytes it read there) must be a whole
    zero block; like tarfile, the parser stops silently on a truncated or garbled header
    after the first member. Trailing data past it is read (up to ``max_trailing``)."""
    trailing = 0
    while trailing <= max_trailing:
        chunk = stream.read(1 << 16)
        if not chunk:
            break
        trailing += len(chunk)
    if trailing > max_trailing:
        return f"data after the end of the tar archive at byte {end} (garbled header?)"
    if end + 512 > stream.count:
        return f"tar cut off inside a header at byte {end} of {stream.count}"
    if len(block) < 512 or block.strip(b"\0"):
        return f"invalid tar header at byte {end}"
    return None


def _compressed_end_problem(stream: _CountingStream, end: int, block: bytes) -> Optional[str]:
    """:func:`_tar_end_problem` on a compressed tar's uncompressed stream; reading it to
    its end also checks the compressed stream's own end (gzip / bz2 / xz CRC, cut off)."""
    try:
        return _tar_end_problem(stream, end, block)
    except tarfile.ReadError as err:
        return str(err)


def read_refs(shard_url: Callable[[int], Optional[str]], refs: Sequence[Sequence], counter: SkipCounter,
              opts: ReadOptions) -> list[Optional[dict[str, Any]]]:
    """The raw samples at ``refs`` (``[shard, offset, index, seekable]``, as ``__ref__``
    records them), in order; None where one cannot be read. A plain tar is opened at each
    sample's offset (one with no tar header there is dropped, with one warning per shard);
    a compressed tar or ``pipe:`` is read once from the start with the other members
    passed over by header."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    by_shard: dict[int, list[Sequence]] = {}
    for ref in refs:
        by_shard.setdefault(int(ref[0]), []).append(ref)
    for pos, group in by_shard.items():
        url = shard_url(pos)
        if url is None:  # past the end of the shard list
            continue
        if all(bool(r[3]) for r in group) and cursor_seekable(url, None):
            stale = 0
            for ref in group:
                gen = shard_samples(url, pos, int(ref[1]), counter, opts, restart=False)
                try:
                    found.update({(pos, int(ref[1])): s for s in [next(gen, None)] if s is not None})
                except StaleOffset:
                    stale += 1
                gen.close()
            if stale:
                log.warning("resume: %d buffered sample(s) of shard %s dropped: no tar header at their byte offsets "
                            "(it changed since the checkpoint)", stale, mask_secrets(url))
            continue
        wanted = {int(r[1]) for r in group}
        for s in shard_samples(url, pos, 0, counter, opts):
            if s["__ref__"][1] in wanted:
                found[(pos, s["__ref__"][1])] = s
                wanted.discard(s["__ref__"][1])
                if not wanted:
                    break
    out = []
    for ref in refs:
        s = found.get((int(ref[0]), int(ref[1])))
        if s is not None:
            s["__ref__"] = list(ref)
            if int(ref[2]) >= 0:
                s["__index__"] = int(ref[2])
        out.append(s)
    return out


def read_identity(url: str, opts: ReadOptions) -> Optional[dict[str, Any]]:
    """The :func:`~regionvlp.data.consumer.shard_identity` of the shard at ``url`` now
    (one read of its first block); None when it cannot be read now (reading it later
    counts that)."""
    try:
        with open_shard(url, retries=opts.retries, backoff=opts.backoff, allow_pipe=opts.allow_pipe,
                        timeout=opts.timeout) as stream:
            return shard_identity(url, stream.size, read_exact(stream, BLOCK))
    except (UserError,) + PROGRAMMING_ERRORS:
        raise
    except Exception:
        return None


def checked_position(saved: dict[str, Any], shard_url: Callable[[int], Optional[str]], opts: ReadOptions) -> dict[str, Any]:
    """``saved`` (a :func:`~regionvlp.data.consumer.check_position`-checked position)
    fitted to the shards as they are now. Each shard it names with an identity is
    compared with the shard now at its place (``shard_url``): one that changed (another
    URL there, another size or first block) is named in one warning; the cursor, when in
    it, reads it from its start and its buffered samples are dropped. ``shards`` keeps the
    identities that still hold. A position without identities is taken as it is."""
    identities = {int(k): v for k, v in saved.get("shards", {}).items()}
    cursor, held = list(saved["cursor"]), saved["held"]
    refs = list(saved["buffer"]) + ([held] if held is not None else [])
    kept: dict[int, dict] = {}
    changed: set[int] = set()
    for pos in sorted({cursor[0]} | {int(r[0]) for r in refs}):
        if pos not in identities:
            continue
        url = shard_url(pos)
        now = read_identity(url, opts) if url is not None and identities[pos]["url"] == url else None
        reason = identity_change(identities[pos], now, url)
        if reason is None:
            kept[pos] = identities[pos]
            continue
        changed.add(pos)
        dropped = sum(int(r[0]) == pos for r in refs)
        then = [f"{dropped} buffered sample(s) from it dropped"] if dropped else []
        if cursor[0] == pos:
            cursor, then = [pos, 0, cursor[2], True], ["reading it from its start"] + then
        log.warning("resume: %s; %s", mask_secrets(reason), "; ".join(then))
    buffer = [r for r in saved["buffer"] if int(r[0]) not in changed]
    held = held if held is not None and int(held[0]) not in changed else None
    return dict(saved, cursor=cursor, buffer=buffer, held=held, shards={str(p): v for p, v in kept.items()})
