"""The training batches: epochs, the frame curriculum, the agreement between ranks
that keeps every rank on the same number of steps, and the loader position a checkpoint
holds (``loader_rank{R}.json``: every consumer's position after its last batch used)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from regionvlp import dist
from regionvlp.data import build_loader, epoch_size
from regionvlp.data.consumer import check_position
from regionvlp.data.loader import resolve_num_workers
from regionvlp.data.sources import describe_unreadable, parse_specs
from regionvlp.errors import UserError
from regionvlp.runtime import add_counts
from regionvlp.train.state import TrainState


log = logging.getLogger("regionvlp.train")
MAX_POSITION_BYTES = 64 << 20  # a loader_rank*.json larger than this is not read


def frames_at(step: int, curriculum: Any, default: int) -> int:
    """T at ``step`` from ``[[start_step, T], ...]`` (the last entry that has started)."""
    frames = default
    for start, t in sorted((int(s), int(t)) for s, t in curriculum or []):
        if step >= start:
            frames = t
    return frames


def steps_per_epoch(cfg: Any, world: int) -> int | None:
    """Micro-batches per rank per epoch from samples_per_epoch / sizes.json (None: unknown)."""
    n = epoch_size(cfg.data.train, allow_pipe=bool(cfg.data.allow_pipe), timeout=float(cfg.data.read_timeout_s))
    if not n:
        return None
    per = n // (int(cfg.data.batch_size) * world)
    if per < 1:
        raise UserError(f"an epoch of {n} samples is smaller than one batch on every rank "
                        f"(data.batch_size={cfg.data.batch_size} x {world} ranks); lower data.batch_size")
    return per


@dataclass
class LoaderPosition:
    """Where this rank's loader stands: the position after the last batch used from each
    consumer (DataLoader worker), and the consumer whose batch is due next."""

    epoch: int = 0
    batch_in_epoch: int = 0
    world: int = 1
    num_workers: int = 1
    next_worker: int = 0
    workers: dict[int, dict] = field(default_factory=dict)

    def note(self, pos: dict[str, Any], batch_in_epoch: int) -> None:
        """A batch was used: its consumer's position moves on, the next consumer is due."""
        worker = int(pos["worker"])
        self.workers[worker] = pos
        self.next_worker = (worker + 1) % self.num_workers
        self.batch_in_epoch = batch_in_epoch

    def fits(self, state: TrainState, world: int, num_workers: int) -> bool:
        """Whether it describes the train state's place with this many ranks and workers."""
        return (self.epoch, self.batch_in_epoch, self.world, self.num_workers) == (
            state.epoch, state.batch_in_epoch, world, num_workers)


def write_loader_position(tag_dir: Path, rank: int, position: LoaderPosition) -> None:
    """This rank's loader position into checkpoint folder ``tag_dir`` (JSON)."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / f"loader_rank{rank}.json").write_text(json.dumps(asdict(position)))


def read_loader_position(tag_dir: Path, rank: int) -> LoaderPosition | None:
    """This rank's loader position from ``tag_dir``; None when absent, too large or
    malformed (a malformed one with a warning saying what is wrong in it)."""
    path = tag_dir / f"loader_rank{rank}.json"
    try:
        if path.stat().st_size > MAX_POSITION_BYTES:
            return None
        raw = json.loads(path.read_text())
        pos = LoaderPosition(**{k: raw[k] for k in ("epoch", "batch_in_epoch", "world", "num_workers", "next_worker")})
        pos.workers = {int(w): check_position(v) for w, v in raw["workers"].items()}
        return pos
    except OSError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s ignored: %s", path, " ".join(f"{type(err).__name__}: {err}".split())[:200])
        return None


def consumers_per_rank(cfg: Any) -> int:
    """DataLoader workers per rank (the main process counts as one; ``auto`` resolved)."""
    return max(1, resolve_num_workers(cfg.data.num_workers))


class BatchFeed:
    """Micro-batches from ``data.train`` for the loop. Every rank runs the same number of
    micro-batches and all roll over to the next epoch together, with no collective of
    their own in steady state:

    - the first micro-batch of each opened loader is agreed explicitly (one all-reduce:
      do all ranks have one? else all roll over);
    - after that, a rank whose loader runs dry sets :attr:`ended` and gets its last
      batch again (the loop runs it, then discards the step); the loop's one per-step
      collective tells every rank, and all call :meth:`roll_over`;
    - an epoch budget from ``samples_per_epoch`` / ``sizes.json`` is the same on every
      rank, so reaching it rolls over without any agreement.

    The position in the epoch (micro-batches handed out, ``batch_in_epoch``) lives in the
    train state and each consumer's loader position in :attr:`position` (written beside
    each checkpoint), so a resumed run continues where it stopped without decoding."""

    def __init__(self, cfg: Any, state: TrainState, device: torch.device, resumed_from: str | None = None) -> None:
        self.cfg, self.state, self.device = cfg, state, device
        self.world = dist.world_size()
        self.per_epoch = steps_per_epoch(cfg, self.world)
        self.position = self.fresh_position()
        if resumed_from is not None and state.batch_in_epoch > 0:
            saved = read_loader_position(Path(resumed_from), dist.rank())
            if saved is not None and saved.fits(state, self.world, consumers_per_rank(cfg)):
                self.position = saved
            elif dist.is_main():
                log.warning("the checkpoint holds no loader position for %d ranks x %d workers: replaying %d "
                            "micro-batches to reach it", self.world, consumers_per_rank(cfg), state.batch_in_epoch)
        self.frames: int | None = None  # T of the open loader
        self.stream: Iterator[dict[str, Any]] | None = None
        self.last_batch: dict[str, Any] = {}
        self.unreadable: dict[str, str] = {}  # shard URL -> error, from workers that made no batch (this epoch)
        self.ended = False  # this rank's loader ran dry since the last roll-over
        self.agree_next = True  # the next micro-batch is the first of an opened loader

    def follow_curriculum(self) -> bool:
        """Open the loader for the step's frame count when it changed (the first call
        included); True when a loader was (re)opened at the saved position."""
        frames = frames_at(self.state.step, self.cfg.train.frame_curriculum, int(self.cfg.data.num_frames))
        if frames == self.frames:
            return False
        self.frames = frames
        self.stream = self.open_epoch()
        self.agree_next = True
        return True

    def fresh_position(self) -> LoaderPosition:
        return LoaderPosition(epoch=self.state.epoch, batch_in_epoch=0, world=self.world,
                              num_workers=consumers_per_rank(self.cfg))

    def open_epoch(self) -> Iterator[dict[str, Any]]:
        """The epoch's loader at the train state's place in it: every consumer opened at
        its saved position (no decoding), or, without positions (an older checkpoint),
        the micro-batches before it replayed."""
        at = self.state.batch_in_epoch
        known = self.position.batch_in_epoch == at and self.position.epoch == self.state.epoch
        loader = build_loader(self.cfg, "train", training=True, epoch=self.state.epoch, num_frames=self.frames,
                              reports=True, positions=self.position.workers if known else None,
                              worker_offset=self.position.next_worker if known else 0)
        self.unreadable = {}
        stream = iter(loader)
        for _ in range(0 if known else at):
            if next(stream, None) is None:
                break
        return stream

    def roll_over(self) -> None:
        """Every rank starts the next epoch (called on all ranks together)."""
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.position = self.fresh_position()
        self.stream = self.open_epoch()
        self.ended, self.agree_next = False, True

    def fetch(self) -> dict[str, Any] | None:
        """This rank's next batch of the epoch (None: dry or at the epoch budget)."""
        if self.stream is None or (self.per_epoch is not None and self.state.batch_in_epoch >= self.per_epoch):
            return None
        return self.pull()

    def next_batch(self) -> tuple[dict[str, Any], float]:
        """The next micro-batch and the seconds waited for it (see the class docstring)."""
        t0 = time.perf_counter()
        if self.ended:  # the rest of this step runs on the last batch too
            return self.last_batch, 0.0
        if self.per_epoch is not None and self.state.batch_in_epoch >= self.per_epoch:
            self.roll_over()  # the same budget on every rank: no agreement needed
        batch = self.agreed_first() if self.agree_next else self.fetch()
        if batch is None:  # dry after the first batch: run the last one again, the loop discards the step
            self.ended = True
            return self.last_batch, time.perf_counter() - t0
        self.state.batch_in_epoch += 1
        if "__position__" in batch:
            self.position.note(batch["__position__"], self.state.batch_in_epoch)
        self.last_batch = batch
        return batch, time.perf_counter() - t0

    def agreed_first(self) -> dict[str, Any]:
        """The first batch of an opened loader, once every rank has one (one all-reduce per
        try); ranks roll over together while any has none."""
        empty_epochs = 0
        while True:
            batch = self.fetch()
            if not dist.any_rank(batch is None, self.device):
                self.agree_next = False
                return batch
            if self.state.batch_in_epoch == 0:
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise UserError(self.no_batch_message())
            self.roll_over()

    def pull(self) -> dict[str, Any] | None:
        """The loader's next batch (None at the end); the skip reports of workers that
        made no batch are counted on the way."""
        while True:
            batch = next(self.stream, None)
            if batch is None or not batch.get("__report__"):
                return batch
            add_counts(self.state.skipped, batch["skipped"])
            for url in batch["unreadable"]:
                self.unreadable.setdefault(url, batch["detail"])

    def no_batch_message(self) -> str:
        """Why an epoch gave no batch (collective: every rank calls it together): the
        unreadable shards of all ranks by source and endpoint, else the batch size."""
        seen: dict[str, str] = {}
        for part in dist.gather_objects(self.unreadable):
            seen.update(part)
        if not seen:
            return ("the training shards gave no batch on some rank for a whole epoch; check data.train.urls "
                    "(`regionvlp shards check`) and data.batch_size")
        shards = parse_specs(list(self.cfg.data.train.urls), allow_pipe=bool(self.cfg.data.allow_pipe))
        last = next(iter(seen.values()))
        return (f"no training batch for a whole epoch: {describe_unreadable(shards, seen)} could not be read "
                f"(first error: {last}); check that the endpoint is up and reachable, then continue with "
                "train.resume=auto")
