"""``regionvlp bench train``: training-step throughput with and without the data loader.

Two variants of the same DeepSpeed training step (batch transform → forward →
backward → optimizer step), on one device, in one run:

- ``memory`` (the baseline): one batch held in memory is trained on again and again,
  so the figure is the model's own speed;
- ``loader``: batches come from :func:`regionvlp.data.build_loader` (decode, sample,
  tokenize), so ``loader_per_s / memory_per_s`` is the cost of feeding the model and
  ``data_wait_frac`` the share of wall time spent waiting for the next batch.

Peak memory is CUDA max-allocated on GPU, the process max resident set on CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from regionvlp.engine import setup_accelerator_env

setup_accelerator_env()

import torch  # noqa: E402

from regionvlp.errors import UserError  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _default_config(regions: str, device: torch.device) -> Path:
    name = f"tiny/{regions}.yaml" if device.type == "cpu" else f"pretrain_{regions}.yaml"
    path = CONFIGS / name
    if not path.is_file():
        raise UserError(f"no default bench config at {path}; pass --config")
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(config: str | None = None, *, regions: str = "detector", device: str = "auto",
                batch: int | None = None, frames: int | None = None, size: int | None = None,
                steps: int = 5, warmup: int = 2, dtype: str = "auto", urls: Sequence[str] | None = None,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    from regionvlp import engine as E
    from regionvlp.bench import device_name, resolve_device
    from regionvlp.config import load_config
    from regionvlp.data import build_loader
    from regionvlp.data.pipeline import resolve_num_workers
    from regionvlp.model import build_batch_transform, build_model, prepare_batch
    from regionvlp.train import autocast_for, to_device

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible; use --device cpu")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    ov = [f"model.regions={regions}", "train.max_steps=1000000", "optim.warmup_steps=0"]
    if batch:
        ov.append(f"data.batch_size={batch}")
    if frames:
        ov.append(f"data.num_frames={frames}")
    if size:
        ov += [f"data.size={size}"]
        if regions == "learned":
            ov.append(f"model.learner.img_size={size}")
    ov += [f"deepspeed.bf16.enabled={dtype == 'bf16'}"]
    tmp = None
    if not urls:
        from regionvlp.data.synth import synth

        tmp = tempfile.TemporaryDirectory(prefix="regionvlp-bench-train-")
        n = max(8, 2 * (batch or 8) * (steps + warmup))
        synth(tmp.name, videos=n, seed=0, val_videos=1, size=max(64, size or 64), frames=16, fps=8,
              shard_size=max(4, n // 4), workers=1, compositional=False)
        urls = [str(p) for p in sorted((Path(tmp.name) / "train").glob("*.tar"))]
    ov.append("data.train.urls=[" + ",".join(f'"{u}"' for u in urls) + "]")
    cfg = load_config(config or _default_config(regions, dev), [*ov, *overrides])
    cfg.data.resampled = True
    cfg.data.train.samples_per_epoch = 10**9  # the loader variant never runs dry

    E.init_distributed()
    torch.manual_seed(int(cfg.seed))
    transform = build_batch_transform(cfg)
    if transform is not None:
        transform.to(dev)
    model = build_model(cfg)
    eng, _, _, ds = E.initialize(model, cfg)
    tdtype = E.engine_dtype(ds)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step(b: dict[str, Any]) -> None:
        b = to_device(b, dev, tdtype)
        b = to_device(prepare_batch(b, transform), dev, tdtype)
        with autocast_for(dev, tdtype):
            out = eng(b)
        eng.backward(out["loss"])
        eng.step()

    loader_it = iter(build_loader(cfg, "train", training=True))
    first = next(loader_it)
    bsz = len(first["__key__"])

    # baseline: the same batch from memory
    for _ in range(warmup):
        step(first)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(first)
    _sync(dev)
    mem_s, mem_cpu = time.perf_counter() - t0, time.process_time() - c0

    # the real loader
    for _ in range(warmup):
        step(next(loader_it))
    _sync(dev)
    wait = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        tw = time.perf_counter()
        b = next(loader_it)
        wait += time.perf_counter() - tw
        step(b)
    _sync(dev)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
    else:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    if tmp is not None:
        tmp.cleanup()
    mem_ps, load_ps = bsz * steps / mem_s, bsz * steps / load_s
    k = int(cfg.model.detector.num_regions) if regions == "detector" else int(cfg.model.learner.num_regions)
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
        "data_wait_frac": wait / load_s,
        "memory_peak_bytes": peak,
        # this process's CPU seconds per step (on a shared CPU box, steadier than wall time)
        "memory_cpu_s_per_step": mem_cpu / steps,
        "loader_cpu_s_per_step": load_cpu / steps,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "config": str(config or _default_config(regions, dev)),
    }
