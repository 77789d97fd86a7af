"""The training batches: epochs, the frame curriculum, and the agreement between ranks
that keeps every rank on the same number of steps."""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from regionvlp import dist
from regionvlp.data import build_loader, epoch_size
from regionvlp.errors import UserError
from regionvlp.train.state import TrainState


def frames_at(step: int, curriculum: Any, default: int) -> int:
    """T at ``step`` from ``[[start_step, T], ...]`` (the last entry that has started)."""
    frames = default
    for start, t in sorted((int(s), int(t)) for s, t in curriculum or []):
        if step >= start:
            frames = t
    return frames


def steps_per_epoch(cfg: Any, world: int) -> int | None:
    """Micro-batches per rank per epoch from samples_per_epoch / sizes.json (None: unknown)."""
    n = epoch_size(cfg.data.train, allow_pipe=bool(cfg.data.allow_pipe))
    if not n:
        return None
    per = n // (int(cfg.data.batch_size) * world)
    if per < 1:
        raise UserError(f"an epoch of {n} samples is smaller than one batch on every rank "
                        f"(data.batch_size={cfg.data.batch_size} x {world} ranks); lower data.batch_size")
    return per


class BatchFeed:
    """Micro-batches from ``data.train`` for the loop. All ranks roll over to the next
    epoch together (one agreement per micro-batch); the position in the epoch lives in
    the train state, so a resumed run continues where it stopped."""

    def __init__(self, cfg: Any, state: TrainState, device: torch.device) -> None:
        self.cfg, self.state, self.device = cfg, state, device
        self.per_epoch = steps_per_epoch(cfg, dist.world_size())
        self.frames: int | None = None  # T of the open loader
        self.stream: Iterator[dict[str, Any]] | None = None
        self.last_batch: dict[str, Any] = {}

    def follow_curriculum(self) -> bool:
        """Open the loader for the step's frame count when it changed (the first call
        included); True when a loader was (re)opened at the saved position."""
        frames = frames_at(self.state.step, self.cfg.train.frame_curriculum, int(self.cfg.data.num_frames))
        if frames == self.frames:
            return False
        self.frames = frames
        self.stream = self.open_epoch(replay=self.state.batch_in_epoch)
        return True

    def open_epoch(self, replay: int) -> Iterator[dict[str, Any]]:
        """The epoch's loader, ``replay`` micro-batches in (resume / curriculum switch)."""
        loader = build_loader(self.cfg, "train", training=True, epoch=self.state.epoch, num_frames=self.frames)
        stream = iter(loader)
        for _ in range(replay):
            if next(stream, None) is None:
                break
        return stream

    def next_batch(self) -> tuple[dict[str, Any], float]:
        """The next micro-batch and the seconds waited for it."""
        t0 = time.perf_counter()
        empty_epochs = 0
        while True:
            out_of_budget = self.per_epoch is not None and self.state.batch_in_epoch >= self.per_epoch
            batch = None if out_of_budget or self.stream is None else next(self.stream, None)
            if not dist.any_rank(batch is None, self.device):
                self.state.batch_in_epoch += 1
                self.last_batch = batch
                return batch, time.perf_counter() - t0
            if self.state.batch_in_epoch == 0:
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise UserError("the training shards gave no batch on some rank for a whole epoch; check "
                                    "data.train.urls (`regionvlp shards check`) and data.batch_size")
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.stream = self.open_epoch(replay=0)
