"""What one consumer (a rank's DataLoader worker) reads, and where it stands.

**Fewer shards than consumers.**
With ``S`` shards and ``C = ranks × workers`` consumers, ``S >= C`` splits by shard (each
shard to one consumer). With ``S < C`` some consumers would get nothing, so every consumer
reads all of the epoch's shards in the same order and keeps every ``C``-th sample
(:class:`SampleShare`): sample ``i`` of the epoch goes to consumer ``i mod C``. The other
samples are passed over by their tar headers (their bytes are read and dropped, never
decoded). In training, :func:`whole_blocks` also drops the last ``N mod C`` samples of
the epoch, so every consumer keeps the same number of samples and every rank gets the
same number of batches.

**Position.** A consumer's position is everything its stream holds between two batches:
the reader's :class:`ReadCursor` (shard, byte offset of the next sample's first tar
header, samples seen), the raw samples waiting in the :class:`ShuffleBuffer` (and in
:class:`WholeBlocks`) by reference (shard, offset), and its random state. Each batch
carries the position after it (``__position__``), so a resumed run opens every shard
at its offset and re-reads only the buffered samples' bytes, decoding nothing it skips.

**Shard identity.** A byte offset means something only in the shard it was taken in, so
the position also records, for the cursor's shard and each shard a buffered sample lies
in, that shard's identity (:func:`shard_identity`: URL, size as its source reports it, a
hash of its first tar block). A resumed consumer compares them with the shards now at
those places (:func:`identity_change`); a shard that changed is read from its start
instead (see :class:`~regionvlp.data.loader.ConsumerStream`). A position is plain JSON,
checked by :func:`check_position` before use.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

from regionvlp.data.sources import ShardList


@dataclass
class SampleShare:
    """Consumer ``index`` of ``count``: keeps samples ``index, index + count, …`` of the
    epoch's stream. ``seen`` counts every sample passed (kept or not) in stream order."""

    index: int
    count: int
    seen: int = 0

    def take(self) -> Optional[int]:
        """Called once per sample in stream order: its epoch index when this consumer
        keeps it, else None (its data is then skipped unread)."""
        i = self.seen
        self.seen += 1
        return i if i % self.count == self.index else None

    def block_done(self, index: int) -> bool:
        """Whether every consumer has a sample in ``index``'s block of ``count``."""
        return self.seen >= (index // self.count + 1) * self.count


class WholeBlocks:
    """Kept samples (``__index__`` set by the reader) whose block of ``share.count`` is
    complete: a sample of a last, partial block is dropped, so all consumers keep equally
    many. The next kept sample lies in a later block, so it releases the one ``held``."""

    def __init__(self, share: SampleShare, held: Optional[dict[str, Any]] = None) -> None:
        self.share, self.held = share, held

    def __call__(self, raw: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in raw:
            out, self.held = self.held, sample  # held before the yield: a position taken then includes it
            if out is not None:
                yield out
        held, self.held = self.held, None
        if held is not None and self.share.block_done(int(held["__index__"])):
            yield held


def whole_blocks(raw: Iterable[dict[str, Any]], share: SampleShare) -> Iterator[dict[str, Any]]:
    """:class:`WholeBlocks` over ``raw``."""
    return WholeBlocks(share)(raw)


@dataclass
class ReadCursor:
    """Where a consumer's reader stands: shard ``shard`` of its list, the next sample's
    first tar header at byte ``offset``, ``seen`` samples passed (sample-level split).
    ``seekable`` is False for compressed shards (offsets count uncompressed bytes).
    ``identities``: shard → :func:`shard_identity` of the shards read (or verified on
    resume) that a position may still name; not part of :meth:`to_json`."""

    shard: int = 0
    offset: int = 0
    seen: int = 0
    seekable: bool = True
    identities: dict[int, dict] = field(default_factory=dict)

    def move(self, shard: int, offset: int, share: Optional[SampleShare]) -> None:
        if shard != self.shard:
            self.seekable = True  # a new shard: its own compression decides
        self.shard, self.offset = shard, offset
        self.seen = share.seen if share is not None else 0

    def to_json(self) -> list:
        return [self.shard, self.offset, self.seen, self.seekable]

    @classmethod
    def from_json(cls, v: Any) -> "ReadCursor":
        shard, offset, seen, seekable = v
        return cls(int(shard), int(offset), int(seen), bool(seekable))


@dataclass
class ShuffleBuffer:
    """The sample shuffle buffer (``size`` 0 or 1: pass through), its state in the open:
    the raw samples waiting and whether the stream behind it has ended (``draining``)."""

    size: int
    rng: random.Random
    buf: list = field(default_factory=list)
    draining: bool = False

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.size <= 1:
            yield from samples
            return
        if not self.draining:
            for s in samples:
                if len(self.buf) < self.size:
                    self.buf.append(s)
                    continue
                i = self.rng.randrange(len(self.buf))
                self.buf[i], s = s, self.buf[i]
                yield s
            self.rng.shuffle(self.buf)
            self.draining = True
        while self.buf:
            yield self.buf.pop(0)


def rng_to_json(rng: random.Random) -> list:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


def rng_from_json(v: Any) -> tuple:
    version, state, gauss = v
    if version != random.Random.VERSION or type(version) is not int or not isinstance(state, list) \
            or len(state) != 625 or not all(type(x) is int and 0 <= x < 1 << 32 for x in state) or state[-1] > 624 \
            or not (gauss is None or isinstance(gauss, float)):
        raise ValueError("not a random.Random state")
    return version, tuple(state), gauss


def position(worker: int, cursor: ReadCursor, shuffle: ShuffleBuffer, blocks: Optional[WholeBlocks],
             rng: random.Random) -> dict[str, Any]:
    """A consumer's position as plain JSON values (see the module docstring). The
    identities of shards behind the cursor that no buffered sample names are dropped
    from ``cursor`` (no later position can name them)."""
    held = blocks.held if blocks is not None else None
    refs = [s["__ref__"] for s in shuffle.buf] + ([held["__ref__"]] if held is not None else [])
    named = {cursor.shard} | {int(r[0]) for r in refs}
    for pos in [p for p in cursor.identities if p < cursor.shard and p not in named]:
        del cursor.identities[pos]
    shards = {str(p): cursor.identities[p] for p in sorted(named) if p in cursor.identities}
    return {"worker": worker, "cursor": cursor.to_json(), "buffer": refs[: len(shuffle.buf)],
            "draining": shuffle.draining, "held": refs[-1] if held is not None else None,
            "rng": rng_to_json(rng), "shards": shards}


# -------------------------------------------------------------- shard identity
def head_digest(block: bytes) -> str:
    """A short hash (16 hex digits) of a shard's first 512-byte block."""
    return hashlib.blake2b(block, digest_size=8).hexdigest()


def shard_identity(url: str, size: Optional[int], head: bytes) -> dict[str, Any]:
    """What tells a shard from a rewritten one or another: its URL, its size in bytes as
    its source reports it (None when it does not: ``pipe:``) and :func:`head_digest` of
    its first block."""
    return {"url": url, "size": size, "head": head_digest(head)}


def identity_change(saved: dict[str, Any], now: Optional[dict[str, Any]], url: Optional[str]) -> Optional[str]:
    """Why the shard now at a saved position (``url``, None past the end of the shard
    list; its identity ``now``, None: it could not be read to check) is not the one the
    position was taken in; None: the same, or nothing to tell them apart."""
    if url is None:
        return f"the shard list changed since the checkpoint: this consumer's shards no longer reach the place of {saved['url']}"
    if saved["url"] != url:
        return f"the shard list changed since the checkpoint: this place in the shard order now holds {url} " \
               f"(was {saved['url']})"
    if now is None:
        return None
    if saved["size"] is not None and now["size"] is not None and saved["size"] != now["size"]:
        return f"shard {url} changed since the checkpoint (size {saved['size']} -> {now['size']} bytes)"
    if saved["head"] != now["head"]:
        return f"shard {url} changed since the checkpoint (its first tar block differs)"
    return None


# ---------------------------------------------------------- checking a position
def _count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _check_ref(v: Any, what: str) -> None:
    if not (isinstance(v, list) and len(v) == 4 and _count(v[0]) and _count(v[1]) and type(v[2]) is int
            and v[2] >= -1 and type(v[3]) is bool):
        raise ValueError(f"{what} is not a sample reference [shard, offset, index, seekable]: {str(v)[:80]}")


def _check_identity(v: Any, what: str) -> None:
    if not (isinstance(v, dict) and set(v) == {"url", "size", "head"} and isinstance(v["url"], str)
            and (v["size"] is None or _count(v["size"])) and isinstance(v["head"], str)):
        raise ValueError(f"{what} is not a shard identity {{url, size, head}}: {str(v)[:80]}")


def check_position(v: Any) -> dict[str, Any]:
    """``v`` when it is a consumer position as :func:`position` writes it (``shards``
    may be absent: a position from before shard identities), else ValueError saying
    which part is wrong. Nothing in it is trusted before this check."""
    if not isinstance(v, dict):
        raise ValueError(f"not a JSON object: {str(v)[:80]}")
    missing = {"worker", "cursor", "buffer", "draining", "held", "rng"} - set(v)
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    c = v["cursor"]
    if not (_count(v["worker"]) and isinstance(c, list) and len(c) == 4 and all(_count(x) for x in c[:3])
            and type(c[3]) is bool):
        raise ValueError(f"worker/cursor are not a worker and [shard, offset, seen, seekable]: {str(c)[:80]}")
    if not isinstance(v["buffer"], list) or type(v["draining"]) is not bool:
        raise ValueError("buffer is not a list of sample references or draining not true/false")
    for i, ref in enumerate(v["buffer"] + [v["held"]]):
        if ref is None and i == len(v["buffer"]):
            continue
        what = f"buffer[{i}]" if i < len(v["buffer"]) else "held"
        _check_ref(ref, what)
        if ref[0] > c[0]:
            raise ValueError(f"{what} lies in shard {ref[0]}, after the cursor's shard {c[0]}")
    try:
        rng_from_json(v["rng"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"rng is not a random state ({err})") from None
    shards = v.get("shards", {})
    if not isinstance(shards, dict):
        raise ValueError("shards is not an object of shard -> identity")
    for key, ident in shards.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"shards: key {str(key)[:20]!r} is not a shard number")
        _check_identity(ident, f"shards[{key}]")
    return v


def consumer_count(world: int, num_workers: int) -> int:
    """Consumers of one split: ranks × DataLoader workers (the main process is one worker)."""
    return world * max(1, num_workers)


# ------------------------------------------------------------------ shard order
def shard_order(urls: Sequence[str], *, seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The epoch's shard order; identical on every rank (seeded by seed + epoch only)."""
    urls = list(urls)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(urls)
    return urls


def splits_samples(num_shards: int, world: int, num_workers: int) -> bool:
    """True when a non-resampled split has fewer shards than consumers (ranks × workers):
    then every consumer reads every shard and keeps its share of the samples."""
    return num_shards < consumer_count(world, num_workers)


def split_shards(urls: Sequence[str], rank: int, world: int, worker: int, num_workers: int) -> list[str]:
    """This (rank, worker)'s disjoint share: rank-major, then worker."""
    return list(urls)[rank::world][worker::num_workers]


def resampled_shards(shards: ShardList, rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement: a source by weight, then a shard in it uniformly."""
    sources = [s for s in shards.sources if s.urls]
    weights = [s.weight for s in sources]
    while True:
        src = rng.choices(sources, weights=weights)[0]
        yield rng.choice(src.urls)
