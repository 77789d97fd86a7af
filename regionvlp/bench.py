"""``regionvlp bench …``: measurements printed as JSON.

Every benchmark states the device, dtype and sizes it ran with and measures its
baseline in the same run; a speed claim is a ratio against that baseline. Each
benchmark is a plain function ``bench_<name>(...) -> dict`` here; the CLI parsers live
in ``regionvlp/cli.py`` (``_BENCH_BUILDERS``).
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, iters: int = 3) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
