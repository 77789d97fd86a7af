"""Rank and world size, the process group, and every collective the package uses.

Launchers (deepspeed, torchrun) set RANK / WORLD_SIZE / LOCAL_RANK before the process
starts; the data pipeline needs them before any process group exists. The collectives
are no-ops without an initialised process group of more than one rank.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist

from regionvlp.runtime import add_counts


def initialized() -> bool:
    """True when a torch.distributed process group exists in this process."""
    return tdist.is_available() and tdist.is_initialized()


def _from_env_or_group(var: str, from_group: Callable[[], int], default: int) -> int:
    if var in os.environ:
        return int(os.environ[var])
    return from_group() if initialized() else default


def rank() -> int:
    """RANK from the environment when set (launchers set it, and it agrees with their
    group), else the process group's rank, else 0."""
    return _from_env_or_group("RANK", tdist.get_rank, 0)


def world_size() -> int:
    """WORLD_SIZE from the environment when set, else the process group's size, else 1."""
    return _from_env_or_group("WORLD_SIZE", tdist.get_world_size, 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


# ---------------------------------------------------------------- process group
def setup_accelerator_env() -> None:
    """Before ``import deepspeed``: pick DeepSpeed's CPU accelerator when no GPU is
    present. Called right before each deepspeed import, never at module import."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def free_port() -> int:
    """A free TCP port on loopback (for a 1-process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_S = 600.0  # run.collective_timeout_s: torch's own NCCL default


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """A process group for every run: the launcher's env vars, or a 1-process group on
    loopback. A collective that waits ``timeout_s`` for a rank that is gone fails (so a
    run whose peer node died exits instead of hanging)."""
    setup_accelerator_env()
    import deepspeed  # heavy; only runs that train need it

    if initialized():  # a group from an earlier run in this process: DeepSpeed reads the env
        os.environ.setdefault("RANK", str(tdist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(tdist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=float(timeout_s)))


GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """:func:`init_distributed` for one run. Without a launcher this starts a 1-process
    group and sets RANK / WORLD_SIZE / MASTER_* for it; afterwards those env vars are
    restored, so later code in the process (a data loader simulating ranks, a library
    caller) sees the real environment. The group itself stays: DeepSpeed caches its
    groups per process, so a later run in the same process reuses it."""
    saved = {key: os.environ.get(key) for key in GROUP_ENV}
    init_distributed(timeout_s)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_launched_group() -> bool:
    """A plain process group (no DeepSpeed) when a launcher started several processes
    (evaluation); False when there is one process or a group exists already."""
    if initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    return True


def destroy_group(wait: bool = False) -> None:
    """End this process's group (after a :func:`barrier` when ``wait``); no-op without one."""
    if initialized():
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()


# ------------------------------------------------------------------ collectives
def gather_active() -> bool:
    """True when a process group with more than one rank is running (the group's own
    size: a data loader may simulate ranks through WORLD_SIZE without a group)."""
    return initialized() and tdist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where collective buffers live: the current GPU under NCCL, else the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sizes(n: int) -> list[int]:
    """Every rank's value of ``n`` (e.g. its local batch size), in rank order."""
    return [v[0] for v in all_gather_ints([n])]


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), in rank order."""
    if not gather_active():
        return [list(values)]
    local = torch.tensor(values, dtype=torch.long, device=collective_device())
    out = [torch.zeros_like(local) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, local)
    return [[int(x) for x in o.tolist()] for o in out]


def all_gather_cat(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``t`` [n_r, ...] concatenated along dim 0 in rank order; ``sizes`` are
    the n_r (they may differ, 0 included: padded to the max for the collective)."""
    if t.dtype == torch.bool:  # not every backend gathers bool
        return all_gather_cat(t.to(torch.uint8), sizes).bool()
    longest = max(sizes)
    if t.shape[0] < longest:
        pad = t.new_zeros((longest - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad])
    parts = [torch.empty_like(t) for _ in sizes]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the global gradient over ranks (every rank's
    loss may use every row) and returns this rank's own slice."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.first = sum(sizes[: tdist.get_rank()])
        return all_gather_cat(t, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        n = ctx.sizes[tdist.get_rank()]
        return grad[ctx.first : ctx.first + n], None


def gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """``t`` [b, ...] from every rank concatenated to [B, ...] (rank order).

    The gradient flows back into each rank's own slice: backward all-reduces (sums)
    the gradient of the gathered tensor, so a row receives the gradient of every
    rank's loss terms that used it. Unequal local sizes are allowed. Identity when
    not distributed. ``sizes`` (every rank's local size, from :func:`all_sizes`)
    saves one small collective when the caller already has them.
    """
    if not gather_active():
        return t
    return GatherWithGrad.apply(t, sizes or all_sizes(t.shape[0]))


def gather_nograd(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Like :func:`gather_with_grad` without autograd (masks, labels, eval embeddings).
    The buffers go through :func:`collective_device`; the result is on ``t``'s device."""
    if not gather_active():
        return t
    with torch.no_grad():
        out = all_gather_cat(t.to(collective_device()), sizes or all_sizes(t.shape[0]))
    return out.to(t.device)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if initialized():
        tdist.barrier()


def group_rank_and_size() -> tuple[int, int]:
    """This process's rank and the group's size when a group of more than one rank runs,
    else ``(0, 1)`` (the group's own numbers, not the launcher's environment)."""
    if not gather_active():
        return 0, 1
    return tdist.get_rank(), tdist.get_world_size()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` replaced in place by rank ``src``'s ``t`` (no-op on one rank); returns ``t``."""
    if gather_active():
        tdist.broadcast(t, src=src)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` replaced in place by its sum over ranks (no-op on one rank); returns ``t``."""
    if gather_active():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a small picklable object from our own ranks)."""
    if not gather_active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` (picklable objects from our own ranks);
    ``[obj]`` on 1 rank."""
    if not gather_active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself is left alone)."""
    if not gather_active():
        return t
    out = t.clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce)."""
    if not gather_active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums of every rank's ``counts`` (e.g. data skips by reason)."""
    total: dict[str, int] = {}
    for c in gather_objects(dict(counts)):
        add_counts(total, c)
    return total
