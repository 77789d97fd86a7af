"""``bench data``'s region-shard variants: region samples per core through the loader.

Region shards are made from the same clips with ``regions extract`` (a random-init
``fasterrcnn_tiny``, K = 30, F = 1024: what is timed is the read path, whose cost depends
on bytes and shapes, not on what the features say), one with 1 frame per clip
(``region_shard``), one with 8 (``region_shard_8f``), and the 1-frame regions written as
the old ``regions.npz`` (``region_npz``, the baseline of the format). Each shard holds
``samples`` copies of the clips' samples (``region_int8``: the same regions stored int8,
bytes ratio and feature cosine to fp16); a timed pass reads it as a loader worker does:
tar bytes -> grouped sample (json, txt, regions) -> decoded region tensors -> collated
batches of ``batch`` (no tokenizer: the text side is the same for every variant). Each
stage is also timed alone (``region_stage_us``, µs of CPU per sample).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from regionvlp.bench.common import interleaved_times
from regionvlp.config import load_config
from regionvlp.data.loader import batched, collate
from regionvlp.data.output import SampleTarWriter
from regionvlp.data.reader import tar_samples
from regionvlp.data.regions import NPZ_EXT, REGION_EXT, decode_regions, region_bytes, regions_npz
from regionvlp.data.samples import decode_sample, decode_spec, decoded
from regionvlp.data.skips import SkipCounter
from regionvlp.detector.extract import extract_regions


REGION_VARIANTS = {"region_shard": 1, "region_shard_8f": 8, "region_npz": 1}  # name -> stored frames


def _bench_cfg(size: int, frames: int) -> Any:
    return load_config(None, ["model.regions=detector", "model.detector.arch=fasterrcnn_tiny",
                              "model.detector.weights=none", "model.detector.num_regions=30",
                              f"model.detector.min_size={size}", f"model.detector.max_size={size}",
                              "model.region_transformer.feature_dim=1024", f"data.size={size}",
                              f"data.num_frames={frames}", "data.eval_sampling=uniform", "run.device=cpu",
                              "model.detector.autocast=none", "model.detector.channels_last=false"])


def _extracted(videos: list[bytes], root: Path, size: int, frames: int) -> list[dict[str, Any]]:
    """The clips' region samples (raw members) as ``regions extract`` writes them."""
    with SampleTarWriter(root / "clips.tar") as sink:
        for i, v in enumerate(videos):
            sink.write({"__key__": f"clip{i}", "mp4": v, "txt": "a clip for the benchmark"})
    out = root / f"regions_{frames}f"
    summary = extract_regions(_bench_cfg(size, frames), [str(root / "clips.tar")], out, batch_size=len(videos),
                              progress=False, keep_frames=frames)
    samples = list(tar_samples([str(out / "clips.tar")], SkipCounter()))
    if not samples:
        raise RuntimeError(f"bench data: regions extract wrote no region sample ({summary['skipped']})")
    return samples


def _as_npz(sample: dict[str, Any]) -> dict[str, Any]:
    regions = decode_regions(sample[REGION_EXT])
    out = {k: v for k, v in sample.items() if k != REGION_EXT}
    return out | {NPZ_EXT: regions_npz(regions)}


def int8_loss(samples: list[dict[str, Any]]) -> dict[str, float]:
    """int8 (per-region scale) against the stored fp16 regions of ``samples``: bytes
    ratio of the member and the cosine of each real region's features."""
    from regionvlp.data.regions import widen_regions

    ratios, cosines = [], []
    for s in samples:
        ref = decode_regions(s[REGION_EXT])
        q = region_bytes(ref, "int8")
        wide = widen_regions(decode_regions(q), None)
        real = ref["region_mask"] if ref["region_mask"].any() else torch.ones_like(ref["region_mask"])  # [T, K]
        cosines.append(torch.nn.functional.cosine_similarity(wide["region_feats"][real],
                                                             ref["region_feats"][real].float(), dim=-1))
        ratios.append(len(q) / len(s[REGION_EXT]))
    cos = torch.cat(cosines)
    return {"int8_bytes_ratio": round(max(ratios), 4), "int8_cosine_min": round(float(cos.min()), 6),
            "int8_cosine_mean": round(float(cos.mean()), 6), "int8_regions": int(cos.numel())}


def _shard(path: Path, samples: list[dict[str, Any]], count: int) -> Path:
    with SampleTarWriter(path) as sink:
        for i in range(count):
            s = samples[i % len(samples)]
            sink.write({"__key__": f"s{i:06d}", **{k: v for k, v in s.items() if not k.startswith("__")}})
    return path


def _reader(path: Path, size: int, frames: int, batch: int, sink: dict[str, int]) -> Callable[[], None]:
    spec = decode_spec(_bench_cfg(size, frames), training=True)

    def step() -> None:
        counter = SkipCounter()
        stream = decoded(tar_samples([str(path)], counter), spec, counter, random.Random(0))
        for b in batched(stream, batch, drop_last=False, counter=counter, tokenizer=None, max_words=0):
            if "region_feats" not in b:
                continue
            sink["clips"] = sink.get("clips", 0) + len(b["__key__"])
            sink["host_bytes"] = sum(v.nbytes for k, v in b.items() if k.startswith("region_")
                                     and isinstance(v, torch.Tensor)) // len(b["__key__"])
        if counter.skipped:
            raise RuntimeError(f"bench data: region samples skipped: {counter.skipped}")
    return step


def _cpu_seconds(fn: Callable[[], None]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def stage_times(path: Path, size: int, frames: int, batch: int, repeats: int) -> dict[str, float]:
    """µs of CPU per sample in each stage of the loader path over the shard at ``path``,
    best of ``repeats``: reading the tar (``tar_samples``: tar bytes -> grouped raw
    samples), ``decode_sample`` of those samples held in memory, ``collate`` of the
    decoded ones in batches of ``batch``."""
    spec = decode_spec(_bench_cfg(size, frames), training=True)
    rng = random.Random(0)
    raws = list(tar_samples([str(path)], SkipCounter()))
    decs = [decode_sample(r, spec, rng) for r in raws]

    def tar() -> None:
        for _ in tar_samples([str(path)], SkipCounter()):
            pass

    def decode() -> None:
        for r in raws:
            decode_sample(r, spec, rng)

    def collate_all() -> None:
        for i in range(0, len(decs), batch):
            collate(decs[i : i + batch], None, 0)

    return {name: round(min(_cpu_seconds(fn) for _ in range(max(1, repeats))) / len(raws) * 1e6, 1)
            for name, fn in (("tar", tar), ("decode_sample", decode), ("collate", collate_all))}


def region_steps(videos: list[bytes], root: Path, *, size: int, samples: int, batch: int,
                 variants: Sequence[str] = tuple(REGION_VARIANTS),
                 ) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, int]]]:
    """One timed pass per variant (of ``variants``) over its shard of ``samples`` region
    samples, and per variant what a pass saw: clips, stored bytes of the region member,
    host bytes of one collated sample's region tensors."""
    extracted = {n: _extracted(videos, root, size, n) for n in sorted({REGION_VARIANTS[v] for v in variants})}
    steps, seen = {}, {}
    for name in variants:
        frames = REGION_VARIANTS[name]
        raw = extracted[frames] if name != "region_npz" else [_as_npz(s) for s in extracted[frames]]
        member = NPZ_EXT if name == "region_npz" else REGION_EXT
        seen[name] = {"stored_bytes": sum(len(s[member]) for s in raw) // len(raw), "frames": frames}
        path = _shard(root / f"{name}.tar", raw, samples)
        seen[name]["shard_bytes_per_sample"] = path.stat().st_size // samples
        steps[name] = _reader(path, size, frames, batch, seen[name])
        seen[name]["path"] = path
    seen["int8"] = int8_loss([s for group in extracted.values() for s in group])
    return steps, seen


def bench_region_shards(videos: list[bytes], *, size: int, repeats: int, samples: int = 512,
                        batch: int = 64, variants: Sequence[str] = tuple(REGION_VARIANTS)) -> dict[str, Any]:
    """Clips per CPU-second of each region variant (the caller pins the process) and the
    bytes per sample, stored vs on the host after collate; ``cores_per_gpu_at_10000``;
    ``region_stage_us``: where a sample's time goes (:func:`stage_times`).
    ``variants``: the ones to run (``region_speedup`` needs ``region_npz`` among them)."""
    with tempfile.TemporaryDirectory(prefix="bench_regions_") as tmp:
        steps, seen = region_steps(videos, Path(tmp), size=size, samples=samples, batch=batch, variants=variants)
        for step in steps.values():  # warm-up: imports, page cache
            step()
        times = interleaved_times(steps, torch.device("cpu"), repeats)
        stages = {name: stage_times(seen[name]["path"], size, REGION_VARIANTS[name], batch, repeats) for name in steps}
    result: dict[str, Any] = {"region_samples": samples, "region_batch": batch, "region_baseline": "region_npz",
                              "region_source": "regions extract, random-init fasterrcnn_tiny, K=30, F=1024, fp16"}
    per_s = {}
    for name, t in times.items():
        per_s[name] = samples / max(t["cpu_seconds"], 1e-9)
        result[f"{name}_per_s"] = round(per_s[name], 1)
        result[f"{name}_wall_per_s"] = round(samples / max(t["seconds"], 1e-9), 1)
        result[f"{name}_bytes"] = {k: v for k, v in seen[name].items() if k not in ("clips", "path")}
        if seen[name]["clips"] != samples * (repeats + 1):
            raise RuntimeError(f"bench data: {name} read {seen[name]['clips']} clips, not {samples} per pass")
    result["region_stage_us"] = stages
    result["region_int8"] = seen["int8"]
    if "region_npz" in per_s:
        result["region_speedup"] = {k: round(per_s[k] / per_s["region_npz"], 2) for k in per_s if k != "region_npz"}
    result["cores_per_gpu_at_10000"] = {k: float(f"{10000 / v:.4g}") for k, v in per_s.items()}
    return result
