"""``regionvlp bench train``: training-step throughput with and without the data loader.

Two variants of the same DeepSpeed training step (batch transform → forward →
backward → optimizer step), on one device, in one run:

- ``memory`` (the baseline): one batch held in memory is trained on again and again,
  so the figure is the model's own speed;
- ``loader``: batches come from :func:`regionvlp.data.build_loader` (decode, sample,
  tokenize), so ``loader_per_s / memory_per_s`` is the cost of feeding the model and
  ``data_wait_frac`` the share of wall time spent waiting for the next batch.

``--from region_shards`` (detector pathway) adds ``region_shards``: the same clips run
through ``regions extract`` first, then batches of their region shards from the loader
(no detector in the step), against ``loader`` (the in-loop detector on the frames) as
its baseline: ``region_shards_vs_in_loop`` and each one's ``data_wait_frac``.

Peak memory is CUDA max-allocated on GPU, the process max resident set on CPU.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from regionvlp import dist, pathways
from regionvlp.config import load_config
from regionvlp.data import build_loader
from regionvlp.data.loader import resolve_num_workers
from regionvlp.data.synth import synth
from regionvlp.detector.extract import extract_regions
from regionvlp.errors import UserError
from regionvlp.model import build_batch_transform, build_model, prepare_batch
from regionvlp.runtime import device_name, get_autocast, peak_bytes, resolve_device, synchronize
from regionvlp.train import engine as E

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def default_bench_config(regions: str, device: torch.device) -> Path:
    name = f"tiny/{regions}.yaml" if device.type == "cpu" else f"pretrain_{regions}.yaml"
    path = CONFIGS / name
    if not path.is_file():
        raise UserError(f"no default bench config at {path}; pass --config")
    return path


def bench_overrides(regions: str, batch: int | None, frames: int | None, size: int | None,
                    dtype: str) -> list[str]:
    """The config overrides the benchmark's flags stand for."""
    ov = [f"model.regions={regions}", "train.max_steps=1000000", "optim.warmup_steps=0"]
    flags = {"data.batch_size": batch, "data.num_frames": frames, "data.size": size}
    own_size = pathways.get(regions).img_size  # the pathway's own input side follows --size
    if own_size:
        flags[own_size] = size
    ov += [f"{key}={value}" for key, value in flags.items() if value]
    return ov + [f"deepspeed.bf16.enabled={dtype == 'bf16'}"]


def synth_shards(folder: str, clips: int, size: int | None) -> list[str]:
    """A synthetic training shard set of ``clips`` clips in ``folder``; the shard paths."""
    synth(folder, videos=clips, seed=0, val_videos=1, size=max(64, size or 64), frames=16, fps=8,
          shard_size=max(4, clips // 4), workers=1, compositional=False)
    return [str(p) for p in sorted((Path(folder) / "train").glob("*.tar"))]


@dataclass
class Timing:
    """Wall and process-CPU seconds of ``steps`` timed steps, and the loader wait in them."""

    seconds: float
    cpu_seconds: float
    wait: float = 0.0


def time_steps(step: Callable[[dict[str, Any]], None], batches: Callable[[], dict[str, Any]], *, steps: int,
               warmup: int, device: torch.device) -> Timing:
    """``warmup`` untimed then ``steps`` timed training steps on ``batches()``."""
    for _ in range(warmup):
        step(batches())
    synchronize(device)
    wait, t0, c0 = 0.0, time.perf_counter(), time.process_time()
    for _ in range(steps):
        tw = time.perf_counter()
        b = batches()
        wait += time.perf_counter() - tw
        step(b)
    synchronize(device)
    return Timing(time.perf_counter() - t0, time.process_time() - c0, wait)


def training_step(cfg: Any, device: torch.device) -> tuple[Callable[[dict[str, Any]], None], Any, dict[str, Any]]:
    """``(step(batch), engine, ds_config)``: one DeepSpeed training step of ``cfg``'s model."""
    dist.init_distributed()
    torch.manual_seed(int(cfg.seed))
    extractor = build_batch_transform(cfg)
    if extractor is not None:
        extractor.to(device)
    eng, _, _, ds = E.initialize(build_model(cfg), cfg)
    dtype = E.engine_dtype(ds)

    def step(batch: dict[str, Any]) -> None:
        with get_autocast(dtype, device.type)():
            out = eng(prepare_batch(batch, extractor, device, dtype))
        eng.backward(out["loss"])
        eng.step()

    return step, eng, ds


FROM = ("frames", "region_shards")


def region_shard_variant(cfg: Any, urls: Sequence[str], out: Path, step: Callable[[dict[str, Any]], None],
                         dev: torch.device, *, steps: int, warmup: int, in_loop: Timing, bsz: int) -> dict[str, Any]:
    """Train steps on the region shards of ``urls`` (extracted here, on ``dev``) against the
    in-loop detector's ``in_loop`` timing of the same step on the same clips."""
    t0 = time.perf_counter()
    summary = extract_regions(cfg, urls, out, device=str(dev), progress=False)
    extract_s = time.perf_counter() - t0
    region_cfg = cfg.copy()
    region_cfg.data.train.urls = [str(p) for p in sorted(out.glob("*.tar"))]
    region_it = iter(build_loader(region_cfg, "train", training=True))
    shards = time_steps(step, lambda: next(region_it), steps=steps, warmup=warmup, device=dev)
    shard_ps, loop_ps = bsz * steps / shards.seconds, bsz * steps / in_loop.seconds
    return {"from": "region_shards", "region_shards_per_s": shard_ps, "in_loop_per_s": loop_ps,
            "region_shards_vs_in_loop": shard_ps / loop_ps, "region_shards_data_wait_frac": shards.wait / shards.seconds,
            "in_loop_data_wait_frac": in_loop.wait / in_loop.seconds,
            "region_shards_cpu_s_per_step": shards.cpu_seconds / steps,
            "extract_clips": summary["samples"], "extract_seconds": round(extract_s, 2)}


def bench_train(config: str | None = None, *, regions: str = "detector", device: str = "auto",
                batch: int | None = None, frames: int | None = None, size: int | None = None,
                steps: int = 5, warmup: int = 2, dtype: str = "auto", urls: Sequence[str] | None = None,
                overrides: Sequence[str] = (), source: str = "frames") -> dict[str, Any]:
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible; use --device cpu")
    dtype = ("bf16" if dev.type == "cuda" else "fp32") if dtype == "auto" else dtype
    config_path = str(config or default_bench_config(regions, dev))
    if source not in FROM or (source == "region_shards" and regions != "detector"):
        raise UserError(f"bench train --from {source}: region shards feed the detector pathway only")
    with tempfile.TemporaryDirectory(prefix="regionvlp-bench-train-") as tmp:
        urls = list(urls or synth_shards(tmp, max(8, 2 * (batch or 8) * (steps + warmup)), size))
        ov = bench_overrides(regions, batch, frames, size, dtype)
        ov.append("data.train.urls=[" + ",".join(f'"{u}"' for u in urls) + "]")
        cfg = load_config(config_path, [*ov, *overrides])
        cfg.data.resampled = True
        cfg.data.train.samples_per_epoch = 10**9  # the loader variant never runs dry
        step, eng, ds = training_step(cfg, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        loader_it = iter(build_loader(cfg, "train", training=True))
        first = next(loader_it)
        memory = time_steps(step, lambda: first, steps=steps, warmup=warmup, device=dev)  # baseline
        loader = time_steps(step, lambda: next(loader_it), steps=steps, warmup=warmup, device=dev)
        bsz = len(first["__key__"])
        extra = region_shard_variant(cfg, urls, Path(tmp) / "regions", step, dev, steps=steps, warmup=warmup,
                                     in_loop=loader, bsz=bsz) if source == "region_shards" else {}
        peak = peak_bytes(dev)
    mem_ps, load_ps = bsz * steps / memory.seconds, bsz * steps / loader.seconds
    k = pathways.of(cfg).regions_per_frame(cfg)
    return {
        "bench": "train",
        "device": device_name(dev),
        "dtype": dtype,
        "regions": regions,
        "batch": bsz,
        "frames": int(cfg.data.num_frames),
        "size": int(cfg.data.size),
        "num_regions": k,
        "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)),
        "num_workers": resolve_num_workers(cfg.data.num_workers),
        "steps": steps,
        "baseline": "memory",
        "memory_per_s": mem_ps,
        "loader_per_s": load_ps,
        "loader_vs_memory": load_ps / mem_ps,
        "data_wait_frac": loader.wait / loader.seconds,
        "memory_peak_bytes": peak,
        # this process's CPU seconds per step (on a shared CPU box, steadier than wall time)
        "memory_cpu_s_per_step": memory.cpu_seconds / steps,
        "loader_cpu_s_per_step": loader.cpu_seconds / steps,
        "trainable_params": sum(p.numel() for p in eng.module.parameters() if p.requires_grad),
        "config": config_path,
    } | extra
