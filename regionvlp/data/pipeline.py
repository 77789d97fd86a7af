"""The streaming pipeline: shards → samples → decoded clips → batches.

    shard list ─ shuffle (seed + epoch, same on every rank) ─ split by rank ─ split by worker
      └─ tar (retries, unreadable shard skipped) ─ sample shuffle buffer ─ decode ─ batch

Non-resampled: every shard goes to exactly one (rank, worker), so an epoch visits every
sample once across all ranks and workers; with fewer shards than ranks × workers every
worker reads all shards and keeps its share of the samples instead
(:mod:`regionvlp.data.consumer`). Resampled: each worker draws shards with replacement
(weighted by source) forever, and ``with_epoch`` cuts every rank's loader to the same
number of batches. Training batches carry their worker's position (``__position__``),
from which a loader continues an epoch without decoding what came before.

Bad input never raises: it is skipped and counted by reason (see :data:`SKIP_REASONS`).
Each batch carries ``skipped``, the counts its worker gathered since its previous batch.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from regionvlp import dist, pathways
from regionvlp.config import DataConfig, default_config, mask_secrets
from regionvlp.data import decode as dec
from regionvlp.data.consumer import (ReadCursor, SampleShare, ShuffleBuffer, WholeBlocks, consumer_count, position,
                                     rng_from_json)
from regionvlp.data.jpeg_batch import BatchJpegDecoder, decode_clips, pick_jpegs
from regionvlp.data.qa import QAVocab, has_qa, loader_vocab, qa_samples
from regionvlp.data.regions import REGION_EXT, RegionShape, decode_regions, select_region_frames
from regionvlp.data.sources import (DEFAULT_TIMEOUT, PROGRAMMING_ERRORS, ShardList, open_shard, parse_specs, read_sizes,
                                   register_webdataset_handlers, scheme_of)
from regionvlp.data.text import load_tokenizer, pick_caption, sample_captions, tokenize
from regionvlp.errors import UserError


log = logging.getLogger(__name__)

SKIP_REASONS = {
    "unreadable_shard": "the shard could not be opened or read (after retries)",
    "corrupt_shard": "the tar stream broke off or is not a tar (samples after the break are lost)",
    "bad_json": "the sample's json is not valid JSON / not an object",
    "status_not_success": "json.status is present and not 'success' (failed download)",
    "no_media": "no mp4/webm/mkv/avi/mov/jpg/png/webp/regions.npz/frameNNN.jpg in the sample",
    "no_caption": "no txt and no json caption",
    "corrupt_media": "the video/image/stored-frame bytes do not decode (corrupt, truncated, unknown codec)",
    "empty_video": "the video has zero frames, zero bytes or no video stream",
    "corrupt_regions": "regions.npz is unreadable or its arrays do not match",
    "no_qa": "QA run: the json has no 'qa' list and no 'question'/'answer' pair",
    "bad_qa": "QA run: a question/answer pair with an empty question or no answer (the pair is skipped)",
    "qa_answer_not_in_vocab": "QA training: the answer is not in the answer vocabulary (the pair is skipped)",
    "region_shape": "regions.npz has another K, feature size or dtype than the config (model.detector.num_regions, "
                    "model.region_transformer.feature_dim) or the stream's first region sample",
    "oversize": "the sample's tar members exceed data.max_sample_bytes (from the tar header, never read) or its "
                "image exceeds data.max_image_pixels",
}
MAX_BAD_RECORDS = 1000
PREVIEW_CHARS = 200  # longest caption/key `data inspect` prints


# ---------------------------------------------------------------- skip counting
@dataclass
class SkipCounter:
    """Skip counts by reason: ``total`` since the start, ``pending`` since the last
    :meth:`pop`, and the first bad samples (key, reason, url, detail)."""

    total: Counter = field(default_factory=Counter)
    pending: Counter = field(default_factory=Counter)
    bad: list[dict[str, str]] = field(default_factory=list)
    shards: int = 0  # shards that gave samples (or were read whole and empty)
    samples: int = 0  # good samples produced
    captions_cut: int = 0  # captions cut to data.max_caption_chars (the samples are kept)

    def add(self, reason: str, key: str = "", url: str = "", detail: str = "") -> None:
        url, detail = mask_secrets(url), mask_secrets(detail)  # a token read from the environment stays hidden
        self.total[reason] += 1
        self.pending[reason] += 1
        if len(self.bad) < MAX_BAD_RECORDS:
            self.bad.append({"key": key, "reason": reason, "url": url, "detail": detail})
        if sum(self.total.values()) <= 20:
            log.warning("skipped %s (%s): %s", key or url, reason, detail)

    def pop(self) -> dict[str, int]:
        out = dict(self.pending)
        self.pending.clear()
        return out

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.total)


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


# -------------------------------------------------------------------- tar reading
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
    *,
    retries: int = 3,
    backoff: float = 0.5,
    allow_pipe: bool = False,
    max_consecutive_failures: Optional[int] = None,
    max_sample_bytes: Optional[int] = DataConfig.max_sample_bytes,
    share: Optional[SampleShare] = None,
    timeout: float = DEFAULT_TIMEOUT,
    cursor: Optional[ReadCursor] = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, ``__ref__``, ext → bytes) from tar shards. An
    unreadable shard is skipped and counted; a tar that breaks off yields what came before.
    A sample whose members add up to more than ``max_sample_bytes`` (sizes from the tar
    headers) is skipped as ``oversize`` without reading its data. With a ``share``, only
    its samples are read (``__index__`` set); the others' members are passed over by
    header, unread. ``cursor`` says where to start (a resumed position) and, while
    iterating, where the next sample begins."""
    opts = ReadOptions(retries, backoff, allow_pipe, timeout, max_sample_bytes)
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


def shard_samples(url: str, pos: int, start: int, counter: SkipCounter, opts: ReadOptions, *,
                  share: Optional[SampleShare] = None, cursor: Optional[ReadCursor] = None):
    """The raw samples of shard ``url`` (``pos`` in the consumer's list) from the sample
    whose first header is at byte ``start``: a seek where the source allows it, else the
    members before ``start`` are passed over by header. Returns whether any sample came."""
    try:
        stream = open_shard(url, retries=opts.retries, backoff=opts.backoff, allow_pipe=opts.allow_pipe,
                            timeout=opts.timeout, offset=start if start and cursor_seekable(url, cursor) else 0)
    except (UserError,) + PROGRAMMING_ERRORS:
        raise
    except Exception as err:
        counter.add("unreadable_shard", url=url, detail=_short(err))
        return False
    reader = _ShardReader(url, pos, stream.offset, start, counter, share, cursor)
    reader.oversize = _Oversize(opts.max_sample_bytes, counter, url)
    try:
        yield from reader.samples(_CountingStream(stream))
    except (UserError,) + PROGRAMMING_ERRORS:
        raise
    except Exception as err:  # tarfile.ReadError / EOFError: broken tar; OSError: reads failed after retries
        broken_tar = isinstance(err, (tarfile.TarError, EOFError)) or reader.produced
        what = "corrupt_shard" if broken_tar else "unreadable_shard"
        counter.add(what, key=(reader.current or {}).get("__key__", ""), url=url, detail=_short(err))
    finally:
        stream.close()
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

    def emit(self) -> dict[str, Any]:
        if not self.produced:
            self.produced, self.counter.shards = True, self.counter.shards + 1
        out, self.current = self.current, None
        return out

    def samples(self, counted: "_CountingStream") -> Iterator[dict[str, Any]]:
        last_key, index = None, None
        with tarfile.open(fileobj=counted, mode="r|*") as tf:
            self.seekable = getattr(tf.fileobj, "comptype", "tar") == "tar"
            if self.cursor is not None and not self.seekable:
                self.cursor.seekable = False  # offsets count uncompressed bytes: skip headers to reach them
            for info in tf:
                key, ext = _split_name(info.name) if info.isreg() else (None, "")
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
                if self.oversize.skip(key, info.size):
                    self.current = None
                    continue
                data = tf.extractfile(info).read()
                if self.current is None:
                    self.current = {"__key__": key, "__url__": self.url, "__ref__": [self.pos, start, index, self.seekable]}
                    if self.share is not None:
                        self.current["__index__"] = index
                self.current[ext] = data
            problem = _tar_end_problem(counted, tf.offset)
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
    ``oversize`` and its remaining members are passed over unread."""

    def __init__(self, limit: Optional[int], counter: SkipCounter, url: str) -> None:
        self.limit, self.counter, self.url = limit, counter, url
        self.key: Optional[str] = None  # the sample being measured
        self.total = 0
        self.dropped: Optional[str] = None  # key of the sample already skipped

    def skip(self, key: str, size: int) -> bool:
        if self.limit is None:
            return False
        if key != self.key:
            self.key, self.total = key, 0
        self.total += int(size)
        if key == self.dropped:
            return True
        if self.total <= self.limit:
            return False
        self.dropped = key
        self.counter.add("oversize", key=key, url=self.url,
                         detail=f"members declare {self.total} bytes > data.max_sample_bytes={self.limit}")
        return True


class _CountingStream:
    """Pass-through reader that counts bytes and keeps the last ``keep`` of them, so the
    end of a tar stream can be checked after :mod:`tarfile` stops reading."""

    def __init__(self, f, keep: int = 1 << 16) -> None:
        self.f, self.keep = f, keep
        self.count = 0
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.keep:
            del self.tail[: len(self.tail) - self.keep]
        return data


def _tar_end_problem(stream: _CountingStream, end: int, max_trailing: int = 1 << 20) -> Optional[str]:
    """Why a tar that :mod:`tarfile` read "to the end" is in fact cut off or broken: the
    block at ``end`` (where tarfile stopped) must be a whole zero block. tarfile stops
    silently on a truncated or garbled header after the first member."""
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
    start = len(stream.tail) - (stream.count - end)
    block = bytes(stream.tail[start : start + 512]) if start >= 0 else b""
    if len(block) < 512 or block.strip(b"\0"):
        return f"invalid tar header at byte {end}"
    return None


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def read_refs(shard_url: Callable[[int], str], refs: Sequence[Sequence], counter: SkipCounter,
              opts: ReadOptions) -> list[Optional[dict[str, Any]]]:
    """The raw samples at ``refs`` (``[shard, offset, index, seekable]``, as ``__ref__``
    records them), in order; None where one cannot be read. A plain tar is opened at each
    sample's offset; a compressed tar or ``pipe:`` is read once from the start with the
    other members passed over by header."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    by_shard: dict[int, list[Sequence]] = {}
    for ref in refs:
        by_shard.setdefault(int(ref[0]), []).append(ref)
    for pos, group in by_shard.items():
        url = shard_url(pos)
        if all(bool(r[3]) for r in group) and cursor_seekable(url, None):
            for ref in group:
                gen = shard_samples(url, pos, int(ref[1]), counter, opts)
                found.update({(pos, int(ref[1])): s for s in [next(gen, None)] if s is not None})
                gen.close()
            continue
        wanted = {int(r[1]) for r in group}
        for s in shard_samples(url, pos, 0, counter, opts):
            if s["__ref__"][1] in wanted:
                found[(pos, s["__ref__"][1])] = s
                if len(found) == len(wanted):
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


# ------------------------------------------------------------------------ decode
@dataclass
class DecodeSpec:
    num_frames: int
    size: int
    sampling: str
    backend: str
    training: bool
    decode_device: str = "cpu"  # cuda: frame-shard JPEGs travel compressed, decoded per batch on the GPU
    max_image_pixels: int = dec.MAX_IMAGE_PIXELS
    max_caption_chars: Optional[int] = None
    regions: Optional[RegionShape] = None  # None: the first region sample of the stream sets it


def decode_spec(cfg, *, training: bool, num_frames: Optional[int] = None, region_shape: bool = True) -> DecodeSpec:
    """How to decode for ``cfg``; region samples must have the K and F that the
    pathway's registry entry names (``region_shape``); ``region_shape=False`` takes them
    from the stream's first region sample instead (``shards check`` without ``--config``)."""
    d = cfg.data
    keys = pathways.of(cfg).region_shape  # None: the pathway reads frames only, K and F come from the stream
    regions = RegionShape(*(int(pathways.select(cfg, k)) for k in keys)) if keys and region_shape else None
    return DecodeSpec(
        num_frames=int(num_frames or d.num_frames),
        size=int(d.size),
        sampling=str(d.train_sampling if training else d.eval_sampling),
        backend=str(d.backend),
        training=training,
        decode_device=str(d.get("decode_device", "cpu")),
        max_image_pixels=int(d.max_image_pixels),
        max_caption_chars=int(d.max_caption_chars),
        regions=regions,
    )


def _media_key(sample: dict[str, Any], exts: Sequence[str]) -> Optional[str]:
    for k in sample:
        if not k.startswith("__") and k.rpartition(".")[2] in exts and not dec.FRAME_EXT.fullmatch(k):
            return k
    return None


def decode_sample(raw: dict[str, Any], spec: DecodeSpec, rng: random.Random) -> dict[str, Any]:
    """One raw tar sample → ``frames`` uint8 [T,3,H,W] (or ``region_*`` tensors),
    ``caption``, ``captions``, ``meta``. Raises :class:`~regionvlp.data.decode.DecodeError`
    (its ``reason`` is the skip-count key) for bad input."""
    start = time.perf_counter()
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise dec.DecodeError("bad_json", _short(err)) from None
        if not isinstance(meta, dict):
            raise dec.DecodeError("bad_json", "json is not an object")
    status = meta.get("status")
    if status is not None and status != "success":
        raise dec.DecodeError("status_not_success", f"status={status!r}")
    video_key = _media_key(raw, dec.VIDEO_EXTS)
    stored = dec.frame_keys(raw)  # a frame shard's JPEGs; the video (if kept) serves T > N
    if stored and video_key is not None and spec.num_frames > len(stored):
        stored = []
    image_key = _media_key(raw, dec.IMAGE_EXTS) if video_key is None and not stored else None
    region_key = REGION_EXT if REGION_EXT in raw else None
    if video_key is None and image_key is None and region_key is None and not stored:
        raise dec.DecodeError("no_media", f"keys: {', '.join(k for k in raw if not k.startswith('__'))}")
    captions = sample_captions(raw.get("txt"), meta)
    if not captions and not has_qa(meta):  # a QA clip needs no caption: its question takes the place
        raise dec.DecodeError("no_caption")
    cut = 0
    if spec.max_caption_chars is not None and any(len(c) > spec.max_caption_chars for c in captions):
        cut = sum(len(c) > spec.max_caption_chars for c in captions)
        captions = list(dict.fromkeys(c[: spec.max_caption_chars] for c in captions))
        if "caption" in meta or "captions" in meta:  # never carry the uncut copies along
            meta = {k: v for k, v in meta.items() if k not in ("caption", "captions")} | {"captions": captions}
    out: dict[str, Any] = {
        "__key__": raw["__key__"],
        "__url__": raw.get("__url__", ""),
        "caption": pick_caption(captions, training=spec.training, rng=rng) if captions else "",
        "captions": captions,
        "meta": meta,
        "captions_cut": cut,
    }
    if region_key is not None:
        regions = decode_regions(raw[region_key])
        if spec.regions is None:
            spec.regions = RegionShape.of(regions)
        spec.regions.check(regions)
        out.update(select_region_frames(regions, spec.num_frames, spec.sampling, rng))
        out["media"] = region_key
    else:
        if stored and spec.decode_device == "cuda":
            out["frames_jpeg"], out["frames_crop"] = pick_jpegs([raw[k] for k in stored], spec.num_frames,
                                                                training=spec.training, rng=rng)
            out["media"], out["frames_size"] = f"{len(stored)} frames", spec.size
            out["decode_ms"] = (time.perf_counter() - start) * 1000.0
            return out
        if stored:
            frames = dec.decode_stored_frames([raw[k] for k in stored], spec.num_frames, spec.size,
                                              training=spec.training, rng=rng)
        elif video_key is not None:
            frames = dec.decode_video(
                raw[video_key], spec.num_frames, spec.sampling, spec.backend, rng, short_side=spec.size
            )
        else:
            frame = dec.decode_image(raw[image_key], max_pixels=spec.max_image_pixels)  # [1, H, W, 3]
            frames = np.broadcast_to(frame, (spec.num_frames,) + frame.shape[1:])  # a view, no copies
        out["frames"] = dec.resize_crop(frames, spec.size, training=spec.training, rng=rng)  # [T, 3, S, S]
        out["media"] = f"{len(stored)} frames" if stored else (video_key or image_key)
    out["decode_ms"] = (time.perf_counter() - start) * 1000.0
    return out


def decoded(raw_samples: Iterable[dict], spec: DecodeSpec, counter: SkipCounter, rng: random.Random) -> Iterator[dict]:
    for raw in raw_samples:
        try:
            sample = decode_sample(raw, spec, rng)
        except dec.DecodeError as err:
            counter.add(err.reason, key=raw.get("__key__", ""), url=raw.get("__url__", ""), detail=err.detail)
            continue
        except Exception as err:  # a decoder bug on odd input must not end a long run
            counter.add("corrupt_media", key=raw.get("__key__", ""), url=raw.get("__url__", ""), detail=_short(err))
            continue
        counter.samples += 1
        counter.captions_cut += sample.pop("captions_cut", 0)
        yield sample


# ---------------------------------------------------------------- single process
class SampleStream:
    """Decoded samples from ``urls`` in one process; skip counts in :attr:`skipped`,
    the first bad samples in :attr:`bad`, shards read in :attr:`shards`."""

    def __init__(self, urls: Sequence[str] | str, cfg=None, *, training: bool = False, num_frames: Optional[int] = None,
                 seed: Optional[int] = None, region_shape: bool = True) -> None:

        self.cfg = cfg if cfg is not None else default_config()
        self.shards = parse_specs(urls, allow_pipe=bool(self.cfg.data.allow_pipe))
        self.spec = decode_spec(self.cfg, training=training, num_frames=num_frames, region_shape=region_shape)
        self.spec.decode_device = "cpu"  # one process (check, inspect): every JPEG decoded, bad ones counted here
        self.counter = SkipCounter()
        self.seed = int(self.cfg.seed if seed is None else seed)
        register_webdataset_handlers()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        d = self.cfg.data
        rng = random.Random(self.seed)
        raw = tar_samples(self.shards.urls, self.counter, retries=int(d.retries), backoff=float(d.retry_backoff),
                          allow_pipe=bool(d.allow_pipe), max_sample_bytes=int(d.max_sample_bytes),
                          timeout=float(d.read_timeout_s))
        return decoded(raw, self.spec, self.counter, rng)

    @property
    def skipped(self) -> dict[str, int]:
        return self.counter.skipped

    @property
    def bad(self) -> list[dict[str, str]]:
        return self.counter.bad

    @property
    def num_shards(self) -> int:
        return self.counter.shards


def iter_samples(urls: Sequence[str] | str, cfg=None, *, training: bool = False, num_frames: Optional[int] = None,
                 region_shape: bool = True) -> SampleStream:
    """Decoded sample dicts from ``urls`` (in order, single process). The returned
    :class:`SampleStream` exposes ``skipped`` / ``bad`` / ``num_shards`` as it goes.
    ``region_shape=False``: region samples must agree with the stream's first one
    rather than with the config's K and feature size."""
    return SampleStream(urls, cfg, training=training, num_frames=num_frames, region_shape=region_shape)


# ------------------------------------------------------------------------- batch
def collate(samples: list[dict[str, Any]], tokenizer, max_words: int) -> dict[str, Any]:
    """Decoded samples → the agreed batch dict (``frames`` [B,T,3,H,W] uint8 or
    ``region_*`` [B,T,K,...], ``input_ids``/``attention_mask`` [B,L])."""
    batch: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "captions": [s["captions"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if any("frames_jpeg" in s for s in samples):
        if all("frames_jpeg" in s for s in samples):  # decoded per batch on the GPU (BatchJpegDecoder)
            batch["frames_jpeg"] = [s["frames_jpeg"] for s in samples]
            batch["frames_crop"] = torch.tensor([s["frames_crop"] for s in samples], dtype=torch.int64)  # [B, 4]
        else:  # frame-shard and video samples mixed: decode the JPEG ones here, as the video ones were
            for s in samples:
                if "frames_jpeg" in s:
                    crop = torch.tensor([s.pop("frames_crop")])  # [1, 4]
                    s["frames"] = decode_clips([s.pop("frames_jpeg")], crop, s["frames_size"], "cpu")[0]
    for name in ("frames", "region_feats", "region_boxes", "region_mask", "region_labels", "region_scores"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])  # [B, T, ...]
    if all("answer_id" in s for s in samples):  # QA samples (regionvlp.data.qa); caption = the question
        batch["answer_ids"] = torch.tensor([s["answer_id"] for s in samples], dtype=torch.long)  # [B], -1: OOV
        for name in ("question", "answer", "question_type", "qa_index"):
            batch[name] = [s[name] for s in samples]
    if tokenizer is not None:
        batch["input_ids"], batch["attention_mask"] = tokenize(tokenizer, batch["caption"], max_words)  # [B, L]
    return batch


def skip_report(counter: SkipCounter) -> dict[str, Any]:
    """What a worker that made no batch tells the trainer: ``__report__``, its skip counts
    and the URLs (and first error) of the shards it could not read."""
    unreadable = [r for r in counter.bad if r["reason"] == "unreadable_shard"]
    return {"__report__": True, "skipped": counter.pop(), "unreadable": [r["url"] for r in unreadable],
            "detail": unreadable[0]["detail"] if unreadable else ""}


def batched(samples: Iterable[dict], batch_size: int, *, drop_last: bool, counter: SkipCounter, tokenizer,
            max_words: int, report: bool = False,
            snapshot: Optional[Callable[[], dict]] = None) -> Iterator[dict[str, Any]]:
    """Batches of ``batch_size``. Each takes the skip counts gathered while it filled (the
    last one also those after it) and, with ``snapshot``, the stream's position right
    after its last sample (``__position__``). A finished batch is held until the next
    one fills or the stream ends, so no count is lost. ``report``: a stream that made
    no batch ends with a :func:`skip_report` instead of a log line."""
    held: Optional[tuple[list[dict], dict[str, Any]]] = None
    buf: list[dict] = []

    def filled(group: list[dict]) -> tuple[list[dict], dict[str, Any]]:
        extra: dict[str, Any] = {"skipped": counter.pop()}
        if snapshot is not None:
            extra["__position__"] = snapshot()
        return group, extra

    def finish(group: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
        batch = collate(group, tokenizer, max_words)
        batch.update(extra)
        return batch

    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            done = filled(buf)
            if held is not None:
                yield finish(*held)
            held, buf = done, []
    if buf and not drop_last:
        done = filled(buf)
        if held is not None:
            yield finish(*held)
        held = done
    if held is not None:
        for k, v in counter.pop().items():  # skips after the last batch filled travel with it
            held[1]["skipped"][k] = held[1]["skipped"].get(k, 0) + v
        yield finish(*held)
    elif counter.pending and report:
        yield skip_report(counter)
    elif counter.pending:
        log.warning("data worker produced no batch; skipped %s", dict(counter.pending))


# ------------------------------------------------------------------- the dataset
class ClipDataset(IterableDataset):
    """This rank's stream of batches; every DataLoader worker is one consumer: its shards,
    or its share of the samples when shards are fewer than consumers. ``positions``
    (consumer → a batch's ``__position__``) resumes consumers where they stood;
    ``worker_offset`` rotates which consumer each DataLoader worker plays, so that the
    loader's round robin continues with the consumer whose batch is due next."""

    def __init__(self, cfg, shards: ShardList, *, training: bool, epoch: int, num_frames: Optional[int], tokenizer,
                 rank: int, world: int, qa: bool = False, qa_vocab: QAVocab | None = None, reports: bool = False,
                 positions: Optional[dict[int, dict]] = None, worker_offset: int = 0) -> None:
        super().__init__()
        self.qa, self.qa_vocab = qa, qa_vocab  # QA: clips -> question/answer samples
        self.cfg, self.shards, self.training, self.epoch = cfg, shards, training, epoch
        self.spec = decode_spec(cfg, training=training, num_frames=num_frames)
        self.tokenizer = tokenizer
        self.rank, self.world = rank, world
        self.resampled = bool(cfg.data.resampled) and training
        self.reports, self.positions, self.worker_offset = reports, dict(positions or {}), worker_offset

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return ((info.id + self.worker_offset) % info.num_workers, info.num_workers) if info is not None else (0, 1)

    def consumer_shards(self, worker: int, num_workers: int) -> tuple[Iterable[str], Optional[SampleShare]]:
        """This consumer's shard sequence, and its sample share when shards are fewer than
        consumers (not resampled): then it reads every shard and keeps its share."""
        seed = int(self.cfg.seed)
        if self.resampled:
            return resampled_shards(self.shards, random.Random(f"{seed}/{self.epoch}/{self.rank}/{worker}/shards")), None
        urls = shard_order(self.shards.urls, seed=seed, epoch=self.epoch, shuffle=self.training)
        if splits_samples(len(urls), self.world, num_workers):
            return urls, SampleShare(self.rank * num_workers + worker, consumer_count(self.world, num_workers))
        return split_shards(urls, self.rank, self.world, worker, num_workers), None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        d = self.cfg.data
        worker, num_workers = self._worker()
        if get_worker_info() is not None:
            # objects inherited from the parent by fork (decoders, their threads) must never
            # be finalised here: keep the child's gc away from them
            gc.freeze()
        stream = ConsumerStream(self, worker, num_workers, self.positions.get(worker))
        yield from batched(stream.samples(), int(d.batch_size), drop_last=self.training, counter=stream.counter,
                           tokenizer=self.tokenizer, max_words=int(d.max_words), report=self.reports,
                           snapshot=stream.position if self.training else None)


class ConsumerStream:
    """One consumer's decoded samples: reader → whole blocks (sample share, training) →
    shuffle buffer (training) → decode, from the epoch start or from a saved position."""

    def __init__(self, ds: ClipDataset, worker: int, num_workers: int, saved: Optional[dict] = None) -> None:
        self.ds, self.worker, self.num_workers = ds, worker, num_workers
        self.counter = SkipCounter()
        # distinct per (seed, epoch, rank, worker): sample shuffle, frame sampling, crops
        self.rng = random.Random(f"{int(ds.cfg.seed)}/{ds.epoch}/{ds.rank}/{worker}/samples")
        self.urls, self.share = ds.consumer_shards(worker, num_workers)
        self.cursor = ReadCursor.from_json(saved["cursor"]) if saved else ReadCursor()
        if self.share is not None:
            self.share.seen = self.cursor.seen
        self.shuffle = ShuffleBuffer(int(ds.cfg.data.shuffle_buffer) if ds.training else 0, self.rng)
        self.blocks = WholeBlocks(self.share) if self.share is not None and ds.training else None
        if saved:
            self.restore(saved)

    def shard_url(self, pos: int) -> str:
        """The ``pos``-th shard of this consumer's sequence (redrawn when resampled)."""
        if isinstance(self.urls, list):
            return self.urls[pos]
        return list(islice(self.ds.consumer_shards(self.worker, self.num_workers)[0], pos + 1))[-1]

    def restore(self, saved: dict) -> None:
        """The shuffle buffer (and held sample) re-read by reference, and the random state."""
        held = [saved["held"]] if saved.get("held") is not None else []
        got = read_refs(self.shard_url, list(saved["buffer"]) + held, self.counter, ReadOptions.of(self.ds.cfg))
        self.shuffle.buf = [s for s in got[: len(saved["buffer"])] if s is not None]
        self.shuffle.draining = bool(saved["draining"])
        if held and self.blocks is not None:
            self.blocks.held = got[-1]
        self.rng.setstate(rng_from_json(saved["rng"]))

    def samples(self) -> Iterator[dict[str, Any]]:
        o = ReadOptions.of(self.ds.cfg)
        max_fail = max(8, 3 * len(self.ds.shards.urls)) if self.ds.resampled else None
        raw = tar_samples(self.urls, self.counter, retries=o.retries, backoff=o.backoff, allow_pipe=o.allow_pipe,
                          max_consecutive_failures=max_fail, max_sample_bytes=o.max_sample_bytes, share=self.share,
                          timeout=o.timeout, cursor=self.cursor)
        if self.blocks is not None:
            raw = self.blocks(raw)
        samples = decoded(self.shuffle(raw) if self.ds.training else raw, self.ds.spec, self.counter, self.rng)
        if self.ds.qa:
            counter = self.counter
            samples = qa_samples(samples, training=self.ds.training, vocab=self.ds.qa_vocab, rng=self.rng,
                                 pairs_per_visit=str(self.ds.cfg.data.qa_pairs_per_visit), skip=lambda reason, s, detail: counter.add(reason, s["__key__"], s["__url__"], detail))
        return samples

    def position(self) -> dict[str, Any]:
        return position(self.worker, self.cursor, self.shuffle, self.blocks, self.rng)


# ----------------------------------------------------------------------- loader
def _split_cfg(cfg, split: str):
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown data split '{split}'; use train, val or test")
    return cfg.data[split]


def epoch_size(split_cfg, *, allow_pipe: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Optional[int]:
    """Samples per epoch: ``samples_per_epoch`` if set, else the ``sizes.json`` beside
    the shards, else None."""
    n = split_cfg.get("samples_per_epoch") if hasattr(split_cfg, "get") else getattr(split_cfg, "samples_per_epoch", None)
    if n:
        return int(n)
    urls = list(split_cfg.urls if hasattr(split_cfg, "urls") else split_cfg["urls"])
    if not urls:
        return None
    return read_sizes(parse_specs(urls, allow_pipe=allow_pipe).urls, allow_pipe=allow_pipe, timeout=timeout)


_LOGGED_SPLITS: set[str] = set()


def log_sample_split(split: str, num_shards: int, world: int, num_workers: int) -> None:
    """Say once per process and split that samples, not shards, are split."""
    if split in _LOGGED_SPLITS or not dist.is_main():
        return
    _LOGGED_SPLITS.add(split)
    consumers = consumer_count(world, num_workers)
    log.warning("data.%s: %d shard(s) for %d ranks x %d workers: every worker reads all shards and keeps 1 sample "
                "in %d (at least %d shards avoid the extra reading)", split, num_shards, world, max(1, num_workers),
                consumers, consumers)


def resolve_num_workers(value: Any) -> int:
    """``data.num_workers``: an int, or ``auto`` = this rank's share of the node's CPU
    cores minus one for the rank's own process (the training loop). The share is the
    process's affinity mask when a launcher bound it to some cores, else all cores
    divided by the ranks on this node (``LOCAL_WORLD_SIZE`` from torchrun, ``LOCAL_SIZE``
    from the deepspeed launcher)."""
    if str(value) != "auto":
        return int(value)

    total = os.cpu_count() or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if cores >= total:  # not bound: share the node with the other local ranks
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))
        cores = total // local_world
    return max(0, cores - 1)


def tokenizer_name(cfg) -> str:
    return str(cfg.data.tokenizer or cfg.model.text.name)


def build_loader(cfg, split: str = "train", *, training: bool, epoch: int = 0, num_frames: Optional[int] = None,
                 tokenizer=None, reports: bool = False, positions: Optional[dict[int, dict]] = None,
                 worker_offset: int = 0):
    """A ``wds.WebLoader`` over ``cfg.data.<split>`` yielding collated batch dicts.

    Non-resampled: each sample once per epoch across ranks × workers (the last partial
    batch kept when ``training=False``). Resampled (``data.resampled`` and training):
    every rank yields exactly ``samples_per_epoch / (world × batch_size)`` batches.
    ``reports``: a worker that made no batch yields a :func:`skip_report` dict (key
    ``__report__``) so the caller learns which shards could not be read. Training batches
    carry ``__position__``; ``positions`` and ``worker_offset`` (see :class:`ClipDataset`)
    continue an epoch from them without decoding what came before.
    """
    d = cfg.data
    split_cfg = _split_cfg(cfg, split)
    if not list(split_cfg.urls):
        raise UserError(f"data.{split}.urls is empty; give shard specs (e.g. data.{split}.urls=[shards/{{000..009}}.tar])")
    shards = parse_specs(list(split_cfg.urls), allow_pipe=bool(d.allow_pipe))
    register_webdataset_handlers()
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_name(cfg))
    rank, world = dist.rank(), dist.world_size()
    qa = bool(cfg.qa.enabled)
    dataset = ClipDataset(cfg, shards, training=training, epoch=epoch, num_frames=num_frames, tokenizer=tokenizer,
                          rank=rank, world=world, qa=qa, qa_vocab=loader_vocab(cfg, training) if qa else None,
                          reports=reports, positions=positions, worker_offset=worker_offset)
    num_workers = resolve_num_workers(d.num_workers)
    if not dataset.resampled and splits_samples(len(shards.urls), world, num_workers):
        log_sample_split(split, len(shards.urls), world, num_workers)
    # batches bound for a GPU: page-locked (the host-to-device copy can overlap compute)
    # and more of them queued per worker
    to_gpu = str(cfg.run.device) != "cpu" and torch.cuda.is_available()
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=to_gpu,
        prefetch_factor=(4 if to_gpu else 2) if num_workers > 0 else None,
        # the loader's own seed comes from a private generator, not the global torch RNG: a
        # resumed run opens its loader after restoring that RNG, and must not draw from it
        generator=torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + epoch),
    )
    if dataset.spec.decode_device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("data.decode_device=cuda: no GPU is visible; use data.decode_device=cpu")
        loader = loader.map(BatchJpegDecoder(dataset.spec.size, torch.device("cuda", dist.local_rank())))
    if dataset.resampled:
        n = epoch_size(split_cfg, allow_pipe=bool(d.allow_pipe), timeout=float(d.read_timeout_s))
        if not n:
            raise UserError(
                f"data.resampled needs an epoch length: set data.{split}.samples_per_epoch or put sizes.json beside the shards"
            )
        batches = max(1, n // (world * int(d.batch_size)))
        loader = loader.with_epoch(batches)
        loader.batches_per_epoch = batches
    return loader


# ----------------------------------------------------------------------- inspect
def inspect_samples(urls: Sequence[str], cfg=None, *, limit: int = 0, training: bool = False, emit=None,
                    region_shape: bool = True) -> dict[str, Any]:
    """Stream and decode samples as training would; ``emit(line)`` gets one dict per good
    sample (key, caption preview, shape, decode ms). Returns the summary (``samples``,
    ``skipped``, ``shards``, ...). ``region_shape=False``: region samples are held to
    the first one's K and F instead of the config's."""
    stream = iter_samples(urls, cfg, training=training, region_shape=region_shape)
    n, ms = 0, 0.0
    start = time.perf_counter()
    for s in stream:
        n += 1
        ms += s["decode_ms"]
        if emit is not None:
            line: dict[str, Any] = {"key": preview(s["__key__"]), "url": preview(s["__url__"]),
                                    "caption": preview(s["caption"]),
                                    "captions": len(s["captions"]), "media": s["media"]}
            if "frames" in s:
                line["frames"] = list(s["frames"].shape)
            else:
                line["regions"] = list(s["region_feats"].shape)
                line["real_regions"] = int(s["region_mask"].sum())
            line["decode_ms"] = round(s["decode_ms"], 2)
            emit(line)
        if limit and n >= limit:
            break
    return {
        "samples": n,
        "skipped": stream.skipped,
        "shards": stream.num_shards,
        "decode_ms_mean": round(ms / n, 2) if n else None,
        "seconds": round(time.perf_counter() - start, 3),
        "frames": stream.spec.num_frames,
        "size": stream.spec.size,
        "backend": stream.spec.backend,
        "captions_cut": stream.counter.captions_cut,
        "bad": [{k: preview(str(v)) for k, v in r.items()} for r in stream.bad[:20]],
    }


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters for printing (``…`` and the full length appended)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"
