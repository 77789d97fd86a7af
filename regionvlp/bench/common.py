"""Timing helpers shared by the benchmarks.

Every benchmark (one module per ``regionvlp bench`` subcommand in this package) states
the device, dtype and sizes it ran with and measures its baseline in the same run; a
speed claim is a ratio against that baseline. Each is a plain function
``bench_<name>(...) -> dict``; the CLI parsers live in ``regionvlp/cli/bench.py``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from regionvlp.runtime import synchronize

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


def interleaved_times(steps: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per call of each step. The variants alternate
    call by call, so drift in clocks or in the load of a shared machine hits all alike;
    CPU seconds are the steadier figure on a loaded box."""
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {name: {"seconds": med(wall[name]), "cpu_seconds": med(cpu[name])} for name in steps}
