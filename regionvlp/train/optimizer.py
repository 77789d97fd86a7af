"""The trainer's optimizer and learning-rate schedule, built from the run config.

- :func:`param_groups`: AdamW groups, no weight decay on biases / norms / embeddings /
  temperature, a learning-rate multiplier per tower (``text_tower.*`` vs the rest).
- :func:`schedule_for`: the config's warmup + cosine (:class:`regionvlp.optim.WarmupCosine`).
- :func:`build_optimizer`: a torch AdamW and a LambdaLR whose next step can be skipped
  (:func:`skip_next_step`, for a non-finite step), both of which DeepSpeed steps and
  checkpoints.
- :func:`rebuild_schedule`: on resume, a changed horizon / LR / warmup / min-LR ratio
  gives the schedule the config defines from the current step on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from regionvlp.errors import UserError
from regionvlp.optim import WarmupCosine, no_decay_names


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



def step_lrs(sched: Any, step: int) -> dict[str, float]:
    """Per group, the LR optimizer step ``step`` (1-based) ran with."""
    groups = sched.optimizer.param_groups
    return {g.get("group", str(i)): float(base * fn(step - 1))
            for i, (g, base, fn) in enumerate(zip(groups, sched.base_lrs, sched.lr_lambdas))}

