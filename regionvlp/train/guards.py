"""What keeps a long run alive and its weights sane.

- :class:`StopFlag`: SIGTERM / SIGINT → finish the step, checkpoint, exit cleanly.
- :class:`NonFiniteGuard`: a non-finite loss or gradient norm skips the step (no weight
  moves, the schedule stays, :func:`regionvlp.train.optimizer.skip_next_step`); M in a
  row abort.
- :func:`floor_parameter_`: a parameter (the learnable temperature) clamped from below
  after a step, DeepSpeed's fp32 master copy included.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from regionvlp.errors import UserError


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
    the module's copy and, where DeepSpeed keeps one, the fp32 master copy, through
    DeepSpeed's public accessors. ZeRO-3: this rank's partition (no collective); ZeRO 1-2
    / bf16 optimizer: the full master read (one all-reduce of the parameter over the data
    parallel group, so every rank calls it) and written back (each rank its fragment).
    No host sync."""
    param.data.clamp_(min=low)
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)

    if hasattr(param, "ds_id"):  # ZeRO-3
        param.ds_tensor.data.clamp_(min=low)
        master = safe_get_local_fp32_param(param)
        if master is not None:
            safe_set_local_fp32_param(param, master.clamp(min=low))
        return
    master = safe_get_full_fp32_param(param)  # None: DeepSpeed keeps no fp32 copy (stage 0, fp32)
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(min=low))


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
