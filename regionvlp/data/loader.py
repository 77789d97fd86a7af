"""The loader: a rank's worker dataset, batches and the DataLoader factory.

    shard list ─ shuffle (seed + epoch, same on every rank) ─ split by rank ─ split by worker
      └─ tar (retries, unreadable shard skipped) ─ sample shuffle buffer ─ decode ─ batch

Non-resampled: every shard goes to exactly one (rank, worker), so an epoch visits every
sample once across all ranks and workers; with fewer shards than ranks × workers every
worker reads all shards and keeps its share of the samples instead
(:mod:`regionvlp.data.consumer`). Resampled: each worker draws shards with replacement
(weighted by source) forever, and ``with_epoch`` cuts every rank's loader to the same
number of batches. Training batches carry their worker's position (``__position__``),
from which a loader continues an epoch without decoding what came before.

The tar reading is :mod:`regionvlp.data.reader`, the decoding
:mod:`regionvlp.data.samples`. Bad input never raises: it is skipped and counted by
reason (:data:`~regionvlp.data.skips.SKIP_REASONS`). Each batch carries ``skipped``, the
counts its worker gathered since its previous batch.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from regionvlp import dist
from regionvlp.data.consumer import (ReadCursor, SampleShare, ShuffleBuffer, WholeBlocks, check_position,
                                     consumer_count, position, resampled_shards, rng_from_json, shard_order,
                                     split_shards, splits_samples)
from regionvlp.data.jpeg_batch import BatchJpegDecoder, decode_clips
from regionvlp.data.qa import QAVocab, loader_vocab, qa_samples
from regionvlp.data.reader import ReadOptions, checked_position, read_refs, tar_samples
from regionvlp.data.regions import CLIP_TENSORS, uniform_regions
from regionvlp.data.samples import decode_spec, decoded
from regionvlp.data.skips import SkipCounter
from regionvlp.data.sources import DEFAULT_TIMEOUT, ShardList, parse_specs, read_sizes, register_webdataset_handlers
from regionvlp.data.text import load_tokenizer, tokenize, tokenizer_name
from regionvlp.errors import UserError


log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- batch
def collate(samples: list[dict[str, Any]], tokenizer, max_words: int) -> dict[str, Any]:
    """Decoded samples → the agreed batch dict (``frames`` [B,T,3,H,W] uint8 or
    ``region_*`` [B,T,K,...], ``input_ids``/``attention_mask`` [B,L])."""
    batch: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "__url__": [str(s.get("__url__", "")) for s in samples],  # keys repeat across shard sets; (url, key) does not
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
    uniform_regions(samples)
    for name in CLIP_TENSORS:  # region tensors in their stored dtypes (fp16 / int8): widened on the device
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
    shuffle buffer (training) → decode, from the epoch start or from a saved position.
    A saved position is first checked against the shards as they are now
    (:func:`~regionvlp.data.reader.checked_position`): a shard that changed since is
    read from its start, with a warning naming it."""

    def __init__(self, ds: ClipDataset, worker: int, num_workers: int, saved: Optional[dict] = None) -> None:
        self.ds, self.worker, self.num_workers = ds, worker, num_workers
        self.counter = SkipCounter()
        # distinct per (seed, epoch, rank, worker): sample shuffle, frame sampling, crops
        self.rng = random.Random(f"{int(ds.cfg.seed)}/{ds.epoch}/{ds.rank}/{worker}/samples")
        self.urls, self.share = ds.consumer_shards(worker, num_workers)
        if saved:
            saved = checked_position(check_position(saved), self.shard_url, ReadOptions.of(ds.cfg))
        self.cursor = ReadCursor.from_json(saved["cursor"]) if saved else ReadCursor()
        if self.share is not None:
            self.share.seen = self.cursor.seen
        self.shuffle = ShuffleBuffer(int(ds.cfg.data.shuffle_buffer) if ds.training else 0, self.rng)
        self.blocks = WholeBlocks(self.share) if self.share is not None and ds.training else None
        if saved:
            self.restore(saved)

    def shard_url(self, pos: int) -> Optional[str]:
        """The ``pos``-th shard of this consumer's sequence (redrawn when resampled); None
        past its end (a saved position from a longer shard list)."""
        if isinstance(self.urls, list):
            return self.urls[pos] if pos < len(self.urls) else None
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
        self.cursor.identities = {int(k): v for k, v in saved.get("shards", {}).items()}

    def samples(self) -> Iterator[dict[str, Any]]:
        max_fail = max(8, 3 * len(self.ds.shards.urls)) if self.ds.resampled else None
        raw = tar_samples(self.urls, self.counter, ReadOptions.of(self.ds.cfg), max_consecutive_failures=max_fail,
                          share=self.share, cursor=self.cursor)
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
    for worker, pos in (positions or {}).items():
        try:
            check_position(pos)
        except ValueError as err:
            raise UserError(f"data position of worker {worker}: {err}") from None
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


