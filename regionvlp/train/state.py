"""What a run carries across a restart: the train state, every rank's RNG state, and
the metrics log (``metrics.jsonl`` + TensorBoard on rank 0)."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("regionvlp.train")



@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed from this epoch's loader (this rank)
    samples: int = 0  # clips trained on, all ranks
    nonfinite: int = 0  # micro-batches skipped for a non-finite loss
    skipped: dict[str, int] = field(default_factory=dict)  # data skips by reason, this rank
    recent_losses: list[float] = field(default_factory=list)  # last 5 step losses
    first_losses: list[float] = field(default_factory=list)  # first 5 step losses
    last_val: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0  # training seconds, summed over resumed segments




class MetricsLog:
    """Rank 0: metrics.jsonl + TensorBoard in the run dir. Other ranks: no-op."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # the loss curve continues from the checkpoint: drop what came after it
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except Exception as err:  # tensorboard missing/broken: JSONL still written
            log.warning("tensorboard disabled: %s", err)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()




def rng_state() -> dict[str, Any]:
    """This process's torch / python / numpy (and CUDA) RNG states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def mean_finite(xs: list[float]) -> float | None:
    """Mean of the finite values (None when there is none)."""
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def write_rng(tag_dir: Path, rank: int) -> None:
    """This rank's RNG state into checkpoint folder ``tag_dir``."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")


def read_rng(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state from checkpoint folder ``tag_dir`` (None when absent)."""
    path = tag_dir / f"rng_rank{rank}.pt"
    return torch.load(path, weights_only=False) if path.exists() else None
