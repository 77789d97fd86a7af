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


# ------------------------------------------------------------------ bench synth
def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_synth(*, clips: int = 200, size: int = 128, frames: int = 16, fps: int = 8, workers: int = 2,
                seed: int = 0) -> dict[str, Any]:
    """Clips/s that ``regionvlp synth`` writes (render + H.264 encode + tar) with one
    process (baseline ``serial``) and with ``workers`` processes, plus where a clip's
    time goes (render vs encode, one process)."""
    import os
    import tempfile
    from pathlib import Path

    from regionvlp.data.synth import clip_sample, render_clip, synth

    if clips < 1 or workers < 1:
        raise ValueError("clips and workers must be >= 1")
    n_stage = min(clips, 50)
    start = time.perf_counter()
    rendered = [render_clip(seed, "train", i, size=size, frames=frames) for i in range(n_stage)]
    render_s = time.perf_counter() - start
    start = time.perf_counter()
    encoded = [clip_sample(c, fps) for c in rendered]
    encode_s = time.perf_counter() - start
    mp4_bytes = sum(len(s["mp4"]) for s in encoded) / n_stage
    result: dict[str, Any] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": "uint8 rgb24 -> h264 yuv420p",
        "size": size, "frames": frames, "fps": fps, "clips": clips, "workers": workers,
    }
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        for name, w in (("serial", 1), ("parallel", workers)):
            cpu0, start = _cpu_seconds(), time.perf_counter()
            out = synth(Path(tmp) / name, videos=clips, val_videos=0, seed=seed, size=size, frames=frames,
                        fps=fps, shard_size=100, workers=w, progress=False)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
            assert out["samples"] == clips, out
            result[f"{name}_per_s"] = round(clips / seconds, 2)
            # CPU time (this process + its workers): the figure a busy shared machine cannot skew
            result[f"{name}_cpu_ms_per_clip"] = round(1000 * cpu / clips, 2)
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result.update(
        baseline="serial",
        speedup=round(result["parallel_per_s"] / result["serial_per_s"], 2),
        render_per_s=round(n_stage / render_s, 2),
        encode_per_s=round(n_stage / encode_s, 2),
        mp4_kib_per_clip=round(mp4_bytes / 1024, 2),
    )
    return result
