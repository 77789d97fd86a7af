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
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0
