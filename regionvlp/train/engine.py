"""DeepSpeed engine: optimizer parameter groups, LR schedule, initialisation, checkpoints.

Everything here takes a plain ``nn.Module`` and the run config, so it is tested with
toy modules; :mod:`regionvlp.train.loop` wires it to the dual encoder and the data.

- :func:`param_groups`: AdamW groups, no weight decay on biases / norms / embeddings /
  temperature, a learning-rate multiplier per tower (``text_tower.*`` vs the rest).
- :func:`schedule_for`: the config's warmup + cosine (:class:`regionvlp.optim.WarmupCosine`).
- :func:`deepspeed_config`: the ``deepspeed:`` section completed from the run config
  (micro batch, accumulation, clipping set explicitly).
- :func:`initialize`: ``deepspeed.initialize`` with a torch AdamW and a LambdaLR, both of
  which DeepSpeed steps and checkpoints.
- :class:`Checkpointer`: ``save_checkpoint`` on every rank with client state, keep the
  last K, a manifest of what was written (:mod:`.manifest`), resume only from those.
- :class:`StopFlag`: SIGTERM / SIGINT → finish the step, checkpoint, exit cleanly.
- :class:`NonFiniteGuard`: a non-finite loss or gradient norm skips the step (no weight
  moves, the schedule stays, :func:`skip_next_step`); M in a row abort.
- :func:`rebuild_schedule`: on resume, a changed horizon / LR / warmup / min-LR ratio
  gives the schedule the config defines from the current step on.
"""

from __future__ import annotations

import math
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
from regionvlp.train import manifest


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
    if name.startswith("qa_head."):
        return "head"
    return "video"


def tower_lr(tower: str, optim: Any) -> float:
    """The base LR of a tower's groups: ``optim.lr`` times the tower's multiplier (the
    QA head's: ``optim.head_lr_mult``)."""
    mults = {"text": float(optim.text_lr_mult), "video": float(optim.video_lr_mult), "loss": 1.0,
             "head": float(optim.head_lr_mult)}
    return float(optim.lr) * mults[tower]


def param_groups(model: nn.Module, optim: Any) -> list[dict[str, Any]]:
    """AdamW groups by (tower, decay); ``lr`` already multiplied by the tower's multiplier.
    Only parameters with ``requires_grad`` go in."""
    skip = no_decay_names(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower, decay = _tower(name), name not in skip
        key = (tower, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": tower_lr(tower, optim),
                           "weight_decay": float(optim.weight_decay) if decay else 0.0,
                           "group": f"{tower}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    if not groups:
        raise UserError("the model has no trainable parameters; check the freeze settings in the config")
    return [groups[k] for k in sorted(groups)]


def schedule_for(cfg: Any) -> WarmupCosine:
    """The config's warmup + cosine schedule (a picklable LambdaLR callable)."""
    return WarmupCosine(int(cfg.optim.warmup_steps), int(cfg.train.max_steps), float(cfg.optim.min_lr_ratio))


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step`` can be turned into a no-op (:func:`skip_next_step`): the
    engine still runs its whole step (counters, buffers, zero_grad) but no weight moves."""

    skip_next = False  # held for the whole engine step (ZeRO steps one group at a time)

    def step(self, closure: Any = None) -> Any:
        if self.skip_next:
            return None
        return super().step(closure)


class SkippableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose next ``step`` can be skipped, so a skipped optimizer step does not
    advance the schedule either."""

    skip_next = False

    def step(self, epoch: Any = None) -> None:
        if self.skip_next:
            return
        super().step(epoch)


def build_optimizer(model: nn.Module, cfg: Any) -> tuple[SkippableAdamW, SkippableLambdaLR]:
    groups = param_groups(model, cfg.optim)
    opt = SkippableAdamW(groups, lr=float(cfg.optim.lr), betas=tuple(float(b) for b in cfg.optim.betas),
                         eps=float(cfg.optim.eps), weight_decay=float(cfg.optim.weight_decay))
    return opt, SkippableLambdaLR(opt, schedule_for(cfg))


def skip_next_step(opt: Any, sched: Any) -> None:
    """The next engine step applies no update and leaves the schedule where it is."""
    opt.skip_next = True
    sched.skip_next = True


def clear_skip(opt: Any, sched: Any) -> None:
    """End the skip after the engine step (always called: the flags are not reset by the
    skipped calls, since ZeRO calls the optimizer once per parameter group)."""
    opt.skip_next = False
    sched.skip_next = False


# ------------------------------------------------------------ schedule on resume
def group_tower(group: dict[str, Any]) -> str:
    """The tower of an optimizer group named ``<tower>_decay`` / ``<tower>_no_decay``."""
    return str(group.get("group", "video_decay")).split("_")[0]


def schedule_changes(sched: Any, cfg: Any) -> list[str]:
    """What the config changed against a loaded schedule (``"key old → new"``; empty: none)."""
    old, new = sched.lr_lambdas[0], schedule_for(cfg)
    changes = [f"{key} {getattr(old, attr)} → {getattr(new, attr)}"
               for key, attr in (("train.max_steps", "max_steps"), ("optim.warmup_steps", "warmup_steps"),
                                 ("optim.min_lr_ratio", "min_lr_ratio"))
               if not math.isclose(float(getattr(old, attr)), float(getattr(new, attr)), rel_tol=1e-12)]
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        want = tower_lr(group_tower(group), cfg.optim)
        if not math.isclose(base, want, rel_tol=1e-12):
            changes.append(f"optim.lr ({group.get('group', '?')}) {base:g} → {want:g}")
    return changes


def rebuild_schedule(sched: Any, cfg: Any) -> list[str]:
    """After a resume: when the config's horizon, LR, warmup or min-LR ratio differ from
    the checkpoint's, the schedule from the current step on is the one the config defines
    (the LR at step s is what a run started with this config would use at s). Unchanged:
    nothing is touched (bit-exact resume). Returns what changed."""
    changes = schedule_changes(sched, cfg)
    if not changes:
        return []
    fn = schedule_for(cfg)
    sched.lr_lambdas = [fn] * len(sched.optimizer.param_groups)
    sched.base_lrs = [tower_lr(group_tower(g), cfg.optim) for g in sched.optimizer.param_groups]
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]  # what get_last_lr() reports
    return changes


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


def step_lrs(sched: Any, step: int) -> dict[str, float]:
    """Per group, the LR optimizer step ``step`` (1-based) ran with."""
    groups = sched.optimizer.param_groups
    return {g.get("group", str(i)): float(base * fn(step - 1))
            for i, (g, base, fn) in enumerate(zip(groups, sched.base_lrs, sched.lr_lambdas))}


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
            old = [t for t in list_tags(self.dir) if t != tag]
            keep = (old + [tag])[-self.keep_last:]
            write_manifest(self.dir / tag)  # the folder's files and their SHA-256
            manifest.record(self.dir, tag, keep)  # and that this run wrote it; before the done marker
            (self.dir / tag / "client_state.done").write_text(str(step))
            for stale in old:
                if stale not in keep:
                    shutil.rmtree(self.dir / stale, ignore_errors=True)
        barrier()
        return self.dir / tag

    def set_aside(self, from_step: int) -> list[str]:
        """Rename the checkpoints of step >= ``from_step`` to ``stepNNNNNNNN.nonfinite``
        (rank 0), so ``train.resume=auto`` continues from the newest one whose weights still
        gave a finite loss. Returns the tags set aside."""
        bad = [t for t in list_tags(self.dir) if int(t[4:]) >= from_step]
        if dist.is_main() and bad:
            manifest.forget(self.dir, bad)
            for tag in bad:
                shutil.rmtree(self.dir / f"{tag}.nonfinite", ignore_errors=True)  # from an earlier abort
                (self.dir / tag).rename(self.dir / f"{tag}.nonfinite")
        barrier()
        return bad

    def check(self, where: tuple[Path, str]) -> None:
        """Refuse (on every rank, with rank 0's message) a folder this run did not write, or
        one changed since: DeepSpeed's load unpickles its files (see
        :mod:`regionvlp.train.manifest`)."""
        problem = None
        if dist.is_main():
            try:
                check_manifest(Path(where[0]) / where[1], self.dir)  # in this run's folder, files unchanged
                manifest.check(self.dir, where[1])  # and saved by this run, not copied in
            except UserError as err:
                problem = str(err)
        problem = dist.gather_objects(problem)[0] if dist.gather_active() else problem
        if problem:
            raise UserError(problem)

    def load(self, engine: Any, where: tuple[Path, str]) -> dict[str, Any]:
        """Engine, optimizer and schedule state from a checkpoint this run wrote."""
        self.check(where)
        load_dir, tag = where
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


def grad_norm_is_finite(module: nn.Module) -> torch.Tensor:
    """A 0-d bool tensor on the device (no host sync): the L2 norm of the gradients this
    rank holds in ``module`` is finite (True when it holds none: under ZeRO 1-2
    DeepSpeed keeps them partitioned and runs its own overflow check, which
    ``engine.was_step_applied()`` reports)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None and p.grad.numel()]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.isfinite(torch.linalg.vector_norm(torch.stack(norms)))


def weights_are_finite(module: nn.Module) -> bool:
    """Every weight this rank holds is finite (one max-abs pass; reads one value)."""
    params = [p.detach() for p in module.parameters() if p.numel()]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params, float("inf")))).all())


@torch.no_grad()
def floor_parameter_(param: nn.Parameter, low: float) -> None:
    """``param >= low`` in place, after an optimizer step (as CLIP clamps its logit scale):
    the module's copy and, where DeepSpeed keeps one, this rank's piece of the fp32 master
    copy (ZeRO 1-2 / bf16 optimizer: the parameter's fragment; ZeRO-3: its partition). No
    collective, no host sync."""
    param.data.clamp_(min=low)
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        param.ds_tensor.data.clamp_(min=low)
        master = safe_get_local_fp32_param(param)
        if master is not None:
            safe_set_local_fp32_param(param, master.clamp(min=low))
    mapping = getattr(param, "_hp_mapping", None)  # DeepSpeed's link to the fp32 fragment
    if mapping is not None:
        mapping.get_hp_fragment().clamp_(min=low)


@dataclass
class NonFiniteGuard:
    """Counts skipped non-finite steps; raises after ``max_in_a_row`` consecutive ones."""

    max_in_a_row: int
    in_a_row: int = 0
    total: int = 0
    steps: list[int] = field(default_factory=list)

    @property
    def first_of_streak(self) -> int:
        """The step of the first non-finite result of the current streak."""
        return self.steps[-self.in_a_row] if self.in_a_row else -1

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
                f"{self.in_a_row} non-finite steps in a row (loss or gradient norm; last at step {step}); lower optim.lr, "
                f"raise optim.warmup_steps or use bf16/fp32, then resume with train.resume=auto (it "
                f"continues from the newest checkpoint before step {self.first_of_streak}; later ones "
                f"are kept aside as stepNNNNNNNN.nonfinite)")
        return False
