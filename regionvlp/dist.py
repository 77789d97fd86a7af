"""Rank and world size, whether or not torch.distributed is initialised.

Launchers (deepspeed, torchrun) set RANK / WORLD_SIZE / LOCAL_RANK before the process
starts; the data pipeline needs them before any process group exists.
"""

from __future__ import annotations

import os


def _initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """RANK from the environment when set (launchers set it, and it agrees with their
    group), else the process group's rank, else 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return 0


def world_size() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


# ------------------------------------------------------------------ collectives
# Used by the losses to make negatives batch-global. All are no-ops without an
# initialised process group of more than one rank.
def gather_active() -> bool:
    """True when a process group with more than one rank is running."""
    return _initialized() and world_size() > 1


def all_sizes(n: int) -> list[int]:
    """Every rank's value of ``n`` (e.g. its local batch size), in rank order."""
    return [v[0] for v in all_gather_ints([n])]


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), in rank order."""
    if not gather_active():
        return [list(values)]
    import torch
    import torch.distributed as dist

    local = torch.tensor(values, dtype=torch.long, device=_collective_device())
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [[int(x) for x in o.tolist()] for o in out]


def _collective_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_cat(t, sizes: list[int]):
    """Concatenate every rank's ``t`` along dim 0; local sizes may differ (padded to the max)."""
    import torch
    import torch.distributed as dist

    if t.dtype == torch.bool:  # not every backend gathers bool
        return _all_gather_cat(t.to(torch.uint8), sizes).bool()
    longest = max(sizes)
    if t.shape[0] < longest:
        pad = t.new_zeros((longest - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad])
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _make_gather_fn():
    import torch
    import torch.distributed as dist

    class _GatherWithGrad(torch.autograd.Function):
        """all_gather forward; backward sums the global gradient over ranks (every rank's
        loss may use every row) and returns this rank's own slice."""

        @staticmethod
        def forward(ctx, t, sizes):
            ctx.sizes = sizes
            ctx.first = sum(sizes[: dist.get_rank()])
            return _all_gather_cat(t, sizes)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            n = ctx.sizes[dist.get_rank()]
            return grad[ctx.first : ctx.first + n], None

    return _GatherWithGrad


_GATHER_FN = None


def gather_with_grad(t, sizes: list[int] | None = None):
    """``t`` [b, ...] from every rank concatenated to [B, ...] (rank order).

    The gradient flows back into each rank's own slice: backward all-reduces (sums)
    the gradient of the gathered tensor, so a row receives the gradient of every
    rank's loss terms that used it. Unequal local sizes are allowed. Identity when
    not distributed. ``sizes`` (every rank's local size, from :func:`all_sizes`)
    saves one small collective when the caller already has them.
    """
    global _GATHER_FN
    if not gather_active():
        return t
    if _GATHER_FN is None:
        _GATHER_FN = _make_gather_fn()
    return _GATHER_FN.apply(t, sizes or all_sizes(t.shape[0]))


def gather_nograd(t, sizes: list[int] | None = None):
    """Like :func:`gather_with_grad` without autograd (masks, labels)."""
    if not gather_active():
        return t
    import torch

    with torch.no_grad():
        return _all_gather_cat(t, sizes or all_sizes(t.shape[0]))


def all_reduce_sum(t):
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself is left alone)."""
    if not gather_active():
        return t
    import torch.distributed as dist

    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
