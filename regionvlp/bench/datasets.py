"""``regionvlp bench datasets``: clips/s of ``datasets prepare`` against ``shards write``
(baseline) on the same clips. The adapter adds the parsing of the annotation files and
the matching of clips to files; everything else is the same writer, so the ratio should
stay near 1."""

from __future__ import annotations

import csv
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from regionvlp.data.datasets.prepare import prepare_dataset
from regionvlp.data.synth import clip_sample, render_clip
from regionvlp.data.writer import write_shards
from regionvlp.runtime import cpu_seconds


def msrvtt_layout(root: Path, clips: int, size: int) -> tuple[Path, Path, Path]:
    """``clips`` videos named as MSR-VTT names them (hard links of one synthetic H.264
    clip), its 1k-A csv, and the same clips as a ``video,caption`` manifest."""
    data = clip_sample(render_clip(0, "val", 0, size=size, frames=8), fps=8)["mp4"]
    videos = root / "videos"
    videos.mkdir(parents=True)
    (videos / "video0.mp4").write_bytes(data)
    for n in range(1, clips):
        os.link(videos / "video0.mp4", videos / f"video{n}.mp4")
    ann, manifest = root / "MSRVTT_JSFUSION_test.csv", root / "manifest.csv"
    with ann.open("w", newline="") as a, manifest.open("w", newline="") as m:
        wa, wm = csv.writer(a), csv.writer(m)
        wa.writerow(["", "key", "vid_key", "video_id", "sentence"])
        wm.writerow(["video", "caption"])
        for n in range(clips):
            wa.writerow([n, f"ret{n}", f"msr{n}", f"video{n}", f"a caption of clip {n}"])
            wm.writerow([f"videos/video{n}.mp4", f"a caption of clip {n}"])
    return videos, ann, manifest


def bench_datasets(*, clips: int = 1000, size: int = 64, repeats: int = 2, shard_size: int = 1000) -> dict[str, Any]:
    """Clips/s and CPU ms per clip of ``shards write`` (baseline) and ``datasets prepare
    msrvtt`` on the same ``clips`` clips, interleaved ``repeats`` times, best run each."""
    if clips < 1 or repeats < 1:
        raise ValueError("clips and repeats must be >= 1")
    result: dict[str, Any] = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                              "dtype": "h264 (copied, probed)", "clips": clips, "size": size, "repeats": repeats}
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_datasets_") as tmp:
        videos, ann, manifest = msrvtt_layout(Path(tmp), clips, size)
        runs: dict[str, Callable[[Path], int]] = {
            "shards_write": lambda out: write_shards(manifest, out, shard_size=shard_size, progress=False)["samples"],
            "datasets_prepare": lambda out: prepare_dataset("msrvtt", [ann], videos, out, shard_size=shard_size,
                                                            progress=False)["samples"],
        }
        for r in range(repeats):
            for name, run in runs.items():
                cpu0, start = cpu_seconds(), time.perf_counter()
                written = run(Path(tmp) / f"{name}_{r}")
                wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
                assert written == clips, (name, written)
                best[name] = min(best.get(name, (wall, cpu)), (wall, cpu))
    for name, (wall, cpu) in best.items():
        result[f"{name}_per_s"] = round(clips / wall, 2)
        result[f"{name}_cpu_ms_per_clip"] = round(1000 * cpu / clips, 3)
    result.update(baseline="shards_write", load_avg_1m=round(os.getloadavg()[0], 2),
                  ratio=round(result["datasets_prepare_per_s"] / result["shards_write_per_s"], 3))
    return result
