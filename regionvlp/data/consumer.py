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
"""

from __future__ import annotations

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
    ``seekable`` is False for compressed shards (offsets count uncompressed bytes)."""

    shard: int = 0
    offset: int = 0
    seen: int = 0
    seekable: bool = True

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
    if len(state) != 625 or not all(isinstance(x, int) for x in state):
        raise ValueError("not a random.Random state")
    return int(version), tuple(state), gauss


def position(worker: int, cursor: ReadCursor, shuffle: ShuffleBuffer, blocks: Optional[WholeBlocks],
             rng: random.Random) -> dict[str, Any]:
    """A consumer's position as plain JSON values (see the module docstring)."""
    held = blocks.held if blocks is not None else None
    return {"worker": worker, "cursor": cursor.to_json(), "buffer": [s["__ref__"] for s in shuffle.buf],
            "draining": shuffle.draining, "held": held["__ref__"] if held is not None else None,
            "rng": rng_to_json(rng)}


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
