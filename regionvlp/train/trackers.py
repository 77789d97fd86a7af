"""Experiment trackers beside ``metrics.jsonl`` (``run.report_to``): TensorBoard and
Weights & Biases behind one small interface. Rank 0 only; the caller decides.

W&B goes through its own ``wandb`` package (``pip install 'regionvlp[wandb]'``); the
run id is kept in ``RUN_DIR/wandb_run_id`` so a resumed run continues the same W&B run
(``wandb.init(id=…, resume="allow")``). ``WANDB_MODE=offline`` and ``WANDB_DIR`` work
as W&B documents them; without ``WANDB_DIR`` its files go under the run folder.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Protocol, Sequence

from regionvlp.errors import UserError

log = logging.getLogger("regionvlp.train")
WANDB_ID = "wandb_run_id"


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_report_to(names: Sequence[str]) -> None:
    """Every rank, before training: a tracker whose package is missing is one clear error."""
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError("run.report_to names wandb but the wandb package is not installed: "
                        "pip install 'regionvlp[wandb]' (or drop wandb from run.report_to)")


class TensorBoardTracker:
    """``RUN_DIR/tensorboard``; on resume the events after the checkpoint's step are purged."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k.replace(".", "/"), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per regionvlp run: its id in ``RUN_DIR/wandb_run_id``, reused on resume;
    the run's config and protocol in the W&B config."""

    def __init__(self, run_dir: Path, resume_step: int | None, name: str, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / WANDB_ID
        run_id = id_file.read_text(errors="replace")[:65].strip() if resume_step is not None and id_file.is_file() else ""
        if not re.fullmatch(r"[a-z0-9]{1,64}", run_id):  # a fresh run (or a file that is not an id)
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=name, id=run_id, resume="allow", config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir),
                              settings=wandb.Settings(console="off"))  # stdout stays the JSON line's

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: Sequence[str], run_dir: Path, resume_step: int | None, name: str,
                  config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``names`` asks for. TensorBoard failing to start is a warning (JSONL is
    still written); W&B failing is an error, since it was asked for by name."""
    check_report_to(names)
    out: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            try:
                out.append(TensorBoardTracker(run_dir, resume_step))
            except Exception as err:  # tensorboard missing/broken
                log.warning("tensorboard disabled: %s", err)
        elif tracker == "wandb":
            out.append(WandbTracker(run_dir, resume_step, name, config))
    return out


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, ``step`` left out."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def protocol_of(cfg: Any, world: int, zero_stage: int, dtype: str) -> dict[str, Any]:
    """How the run trains, in one flat record for a tracker's config: pathway, ranks,
    global batch, steps, clip shape, seed, ZeRO stage, dtype and the training shards."""
    batch, accum = int(cfg.data.batch_size), int(cfg.train.grad_accum)
    return {"pathway": str(cfg.model.regions), "world_size": world, "batch_per_rank": batch, "grad_accum": accum,
            "global_batch": batch * world * accum, "max_steps": int(cfg.train.max_steps),
            "num_frames": int(cfg.data.num_frames), "size": int(cfg.data.size), "seed": int(cfg.seed),
            "zero_stage": zero_stage, "dtype": dtype, "train_urls": [str(u) for u in cfg.data.train.urls]}
