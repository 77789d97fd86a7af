"""``regionvlp bench synth``: clips/s that ``regionvlp synth`` writes, serial vs workers."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Any

from regionvlp.runtime import cpu_seconds
from pathlib import Path
from regionvlp.data.synth import clip_sample, render_clip, synth

def bench_synth(*, clips: int = 200, size: int = 128, frames: int = 16, fps: int = 8, workers: int = 2,
                seed: int = 0) -> dict[str, Any]:
    """Clips/s that ``regionvlp synth`` writes (render + H.264 encode + tar) with one
    process (baseline ``serial``) and with ``workers`` processes, plus where a clip's
    time goes (render vs encode, one process)."""
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
            cpu0, start = cpu_seconds(), time.perf_counter()
            out = synth(Path(tmp) / name, videos=clips, val_videos=0, seed=seed, size=size, frames=frames,
                        fps=fps, shard_size=100, workers=w, progress=False)
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
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
