"""DeepSpeed engine: optimizer parameter groups, LR schedule, initialisation, checkpoints.

Everything here takes a plain ``nn.Module`` and the run config, so it is tested with
toy modules; :mod:`regionvlp.train.loop` wires it to the dual encoder and the data.

- :func:`param_groups`: AdamW groups, no weight decay on biases / norms / embeddings /
  temperature, a learning-rate multiplier per tower (``text_tower.*`` vs the rest).
- :func:`lr_lambda`: linear warmup then cosine to ``min_lr_ratio`` by optimizer steps.
- :func:`deepspeed_config`: the ``deepspeed:`` section completed from the run config
  (micro batch, accumulation, clipping set explicitly).
- :func:`initialize`: ``deepspeed.initialize`` with a torch AdamW and a LambdaLR, both of
  which DeepSpeed steps and checkpoints.
- :class:`Checkpointer`: ``save_checkpoint`` on every rank with client state, keep the
  last K, ``resume: auto | PATH``.
- :class:`StopFlag`: SIGTERM / SIGINT → finish the step, checkpoint, exit cleanly.
- :class:`NonFiniteGuard`: a non-finite loss skips the step; M in a row abort.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from regionvlp import dist
from regionvlp.checkpoint import check_manifest, list_tags, tag_for, write_manifest
from regionvlp.config import to_container
from regionvlp.errors import UserError
from regionvlp.optim import WarmupCosine, no_decay_names


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.initialized():
        torch.distributed.barrier()


# -------------------------------------------------------------- optimizer groups
def _tower(name: str) -> str:
    if name.startswith("text_tower.") or name.startswith("text."):
        return "text"
    if name.startswith("loss."):
        return "loss"
    return "video"


def param_groups(model: nn.Module, optim: Any) -> list[dict[str, Any]]:
    """AdamW groups by (tower, decay); ``lr`` already multiplied by the tower's multiplier.
    Only parameters with ``requires_grad`` go in."""
    mults = {"text": float(optim.text_lr_mult), "video": float(optim.video_lr_mult), "loss": 1.0}
    skip = no_decay_names(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower, decay = _tower(name), name not in skip
        key = (tower, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": float(optim.lr) * mults[tower],
                           "weight_decay": float(optim.weight_decay) if decay else 0.0,
                           "group": f"{tower}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    if not groups:
        raise UserError("the model has no trainable parameters; check the freeze settings in the config")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: Any) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, cfg.optim)
    opt = torch.optim.AdamW(groups, lr=float(cfg.optim.lr), betas=tuple(float(b) for b in cfg.optim.betas),
                            eps=float(cfg.optim.eps), weight_decay=float(cfg.optim.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, WarmupCosine(int(cfg.optim.warmup_steps), int(cfg.train.max_steps), float(cfg.optim.min_lr_ratio)))
    return opt, sched


# -------------------------------------------------------------- deepspeed config
def deepspeed_config(cfg: Any) -> dict[str, Any]:
    """The config's ``deepspeed:`` section completed with the keys the run config owns.

    ``train_micro_batch_size_per_gpu`` = data.batch_size, ``gradient_accumulation_steps``
    = train.grad_accum and ``gradient_clipping`` = optim.grad_clip are always set; the
    section may repeat them only with the same value.
    """
    ds = dict(to_container(cfg.deepspeed)) if cfg.deepspeed else {}
    owned = {"train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
             "gradient_accumulation_steps": int(cfg.train.grad_accum),
             "gradient_clipping": float(cfg.optim.grad_clip)}
    where = {"train_micro_batch_size_per_gpu": "data.batch_size",
             "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.grad_clip"}
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise UserError(f"deepspeed.{key}={ds[key]} disagrees with {where[key]}={value}; "
                            f"set it through {where[key]} and drop it from the deepspeed section")
        ds[key] = value
    if "train_batch_size" in ds:
        raise UserError("deepspeed.train_batch_size is derived (data.batch_size x train.grad_accum x ranks); "
                        "remove it from the deepspeed section")
    if "optimizer" in ds or "scheduler" in ds:
        raise UserError("deepspeed.optimizer / deepspeed.scheduler are not used: the optimizer and schedule "
                        "come from the optim: section; remove them from the deepspeed section")
    ds.setdefault("zero_optimization", {"stage": 0})
    stage = int(ds["zero_optimization"].get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.zero_optimization.stage={stage}; choose 0, 1, 2 or 3")
    if stage > 0:
        ds["zero_allow_untested_optimizer"] = True  # torch AdamW is fine with ZeRO 1-3
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise UserError("deepspeed.fp16.enabled needs a GPU; on CPU use bf16.enabled=true or fp32")
    ds.setdefault("steps_per_print", 10**9)  # our own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def engine_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def initialize(model: nn.Module, cfg: Any) -> tuple[Any, torch.optim.Optimizer, Any, dict[str, Any]]:
    """``deepspeed.initialize`` on the trainable parameters with AdamW + warmup/cosine.

    Returns ``(engine, optimizer, scheduler, ds_config)``; DeepSpeed steps the scheduler
    at each accumulation boundary and stores both in its checkpoints.
    """
    dist.init_distributed()
    import deepspeed  # heavy; imported by the runs that train, after the accelerator env is set

    ds = deepspeed_config(cfg)
    opt, sched = build_optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                           config=ds, dist_init_required=False)
    return engine, optimizer, scheduler, ds


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("group", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


# ------------------------------------------------------------------ checkpoints
class Checkpointer:
    """DeepSpeed checkpoints under ``run_dir/checkpoints/stepNNNNNNNN``, newest K kept.

    Every rank must call :meth:`save` (DeepSpeed writes per-rank optimizer shards).
    ``client_state.done`` marks a checkpoint whose every file is written, so a run
    killed mid-save never resumes from a torn checkpoint.
    """

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
        barrier()
        if dist.is_main():
            write_manifest(self.dir / tag)  # resume trusts only files listed here
            (self.dir / tag / "client_state.done").write_text(str(step))
            for old in list_tags(self.dir)[:-self.keep_last]:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        barrier()
        return self.dir / tag

    def load(self, engine: Any, where: tuple[Path, str]) -> dict[str, Any]:
        load_dir, tag = where
        check_manifest(Path(load_dir) / tag, self.dir)  # DeepSpeed (and the RNG file) unpickle freely
        path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"could not load checkpoint {load_dir}/{tag}; pass train.resume=none to start over")
        return client or {}


# ------------------------------------------------------------ signals, failures
class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and returns.

    A second signal restores the default handler's behaviour (immediate exit)."""

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._signals = tuple(signals)

    def __enter__(self) -> "StopFlag":
        for sig in self._signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up waiting
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


class NonFiniteLossError(UserError):
    pass


@dataclass
class NonFiniteGuard:
    """Counts skipped non-finite steps; raises after ``max_in_a_row`` consecutive ones."""

    max_in_a_row: int
    in_a_row: int = 0
    total: int = 0
    steps: list[int] = field(default_factory=list)

    def check(self, finite: bool, step: int) -> bool:
        """Returns True when the step may proceed."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        self.steps.append(step)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row (last at step {step}); lower optim.lr, "
                f"raise optim.warmup_steps or use bf16/fp32, then resume with train.resume=auto")
        return False
