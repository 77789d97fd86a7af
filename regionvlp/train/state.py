"""What a run carries across a restart: the train state, every rank's RNG state, and
the metrics log (``metrics.jsonl`` + TensorBoard on rank 0)."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from regionvlp.errors import UserError
from regionvlp.train.trackers import Tracker, open_trackers, scalars_of

log = logging.getLogger("regionvlp.train")
TRAIN_STATE = "train_state.json"

@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed from this epoch's loader (this rank)
    samples: int = 0  # clips trained on, all ranks
    nonfinite: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    skipped: dict[str, int] = field(default_factory=dict)  # data skips by reason, this rank
    recent_losses: list[float] = field(default_factory=list)  # last 5 step losses
    first_losses: list[float] = field(default_factory=list)  # first 5 step losses
    last_val: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0  # training seconds, summed over resumed segments




class MetricsLog:
    """Rank 0: metrics.jsonl + the ``run.report_to`` trackers (TensorBoard, W&B) in the
    run dir. Other ranks: no-op."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None, report_to: Sequence[str] = (),
                 name: str = "regionvlp", config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self.cut_back(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.trackers = open_trackers(report_to, run_dir, resume_step, name, config or {})

    def cut_back(self, resume_step: int) -> None:
        """The loss curve continues from the checkpoint: drop the records after it, and a
        line a kill cut off mid-write (logged once)."""
        keep, broken = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                broken += 1
                continue
            if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                keep.append(line)
        if broken:
            log.warning("%s: dropped %d unreadable line(s) (cut off by a kill mid-write)", self.path, broken)
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(scalars, int(record["step"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


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
    """This rank's RNG state into checkpoint folder ``tag_dir`` as
    ``rng_rank{rank}.safetensors``: the torch / CUDA / numpy key arrays as tensors, the
    Python state and numpy's scalars as JSON metadata. Nothing is pickled."""
    from safetensors.torch import save_file

    state = rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"], "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if "cuda" in state:
        tensors["cuda"] = state["cuda"].cpu()
    version, internal, gauss = state["python"]
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}
    tag_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tag_dir / f"rng_rank{rank}.safetensors"), metadata=meta)


def read_rng(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state from checkpoint folder ``tag_dir`` (None when absent). An old
    pickled ``rng_rank{rank}.pt`` is read only with ``torch.load(weights_only=True)``;
    what that refuses is one clear error, and nothing in the file runs."""
    path = tag_dir / f"rng_rank{rank}.safetensors"
    if path.exists():
        return rng_from_safetensors(path)
    legacy = tag_dir / f"rng_rank{rank}.pt"
    if not legacy.exists():
        return None
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends: a pickle we do not run
        raise UserError(f"{legacy}: an old pickled RNG file that torch.load(weights_only=True) refuses "
                        f"({type(err).__name__}); it is never unpickled in full. Resume from a checkpoint "
                        "written by this version, or start over with train.resume=none") from None


def rng_from_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version, internal, gauss = json.loads(meta["python"])
        name, pos, has_gauss, cached = json.loads(meta["numpy"])
        state = {"torch": tensors["torch"], "python": (int(version), tuple(int(x) for x in internal), gauss),
                 "numpy": (str(name), tensors["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                           float(cached))}
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise UserError(f"{path}: not a regionvlp RNG state ({err}); resume with train.resume=none") from None
    if "cuda" in tensors:
        state["cuda"] = tensors["cuda"]
    return state


def write_train_state(tag_dir: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """The train state and the run's config as ``train_state.json`` (rank 0)."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / TRAIN_STATE).write_text(json.dumps({"train_state": state, "config": config}, indent=1))


def read_train_state(tag_dir: Path) -> TrainState:
    """The :class:`TrainState` of checkpoint folder ``tag_dir`` (JSON; unknown keys refused)."""
    path = tag_dir / TRAIN_STATE
    if not path.is_file():
        raise UserError(f"checkpoint {tag_dir} has no {TRAIN_STATE}; it was not written by this version of "
                        "regionvlp train")
    try:
        return TrainState(**json.loads(path.read_text())["train_state"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a regionvlp train state ({err}); resume with train.resume=none") from None
