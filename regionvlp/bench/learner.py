"""``regionvlp bench learner``: training-step throughput of the RegionLearner pathway
against the plain timm ViT of the same size (``baseline``), same batch, frames and
dtype, measured alternately in one run.

One step = forward, a scalar loss on the outputs, backward, AdamW step. The baseline
runs the same ViT (same name, img_size, depth) over the B·T frames and averages its
pooled features over time; the pathway runs the whole learned-regions video tower
(temporal embeddings, quantizer with EMA update, masks, aggregation, interaction,
heads). Throughput is clips per second. Because wall clock on a shared CPU box is
load-bound, the result also gives process CPU time per step and the matmul/conv/attention
GFLOPs of one step (``torch.utils.flop_counter``), which do not depend on load.

Settings default to the shipped pre-training config (``configs/pretrain_learned.yaml``:
its backbone, frames per clip, img_size, attention mode, codebook and regions), so the
ratio is that of what ships; every flag overrides one of them. Pretrained weights are
never loaded (speed does not depend on them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from regionvlp.bench.common import interleaved_times
from regionvlp.config import load_config
from regionvlp.errors import UserError
from regionvlp.region_learner import build_pathway
from regionvlp.runtime import device_name, get_autocast, resolve_device, synchronize


SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain_learned.yaml"
# CLI flag -> config key it overrides (None flags keep the config's value)
FLAG_KEYS = {
    "backbone": "model.learner.backbone", "img_size": "model.learner.img_size", "depth": "model.learner.depth",
    "frames": "data.num_frames", "codebook_size": "model.learner.codebook_size",
    "code_dim": "model.learner.code_dim", "num_regions": "model.learner.num_regions",
    "interaction_layers": "model.learner.interaction_layers",
    "divided_space_time": "model.learner.divided_space_time", "embed_dim": "model.embed_dim",
}


def _step_fn(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
             dtype: torch.dtype) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = get_autocast(dtype, device.type)  # fp32: autocast off

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def bench_config(config: str | Path | None = None, overrides: Sequence[str] = (), **flags: Any):
    """The run config the bench measures: ``config`` (default the shipped pre-training one),
    then every flag that is not None, random init, ``max_frames`` fitting the clip."""
    unknown = sorted(set(flags) - set(FLAG_KEYS))
    if unknown:
        raise TypeError(f"unknown bench_learner settings: {', '.join(unknown)}")
    path = Path(config) if config is not None else SHIPPED_CONFIG
    if not path.is_file():
        raise UserError(f"bench learner: no config at {path}; pass --config")
    sets = [f"{FLAG_KEYS[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()
            if v is not None]
    cfg = load_config(path, ["model.regions=learned", *sets, "model.learner.pretrained=none",
                             "model.learner.checkpoint=none", "train.frame_curriculum=[]", *overrides])
    cfg.model.learner.max_frames = max(int(cfg.model.learner.max_frames), int(cfg.data.num_frames))
    return cfg


def _dtype(device: torch.device, dtype: str) -> tuple[str, torch.dtype]:
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype}: choose fp32 or bf16")
    return dtype, torch_dtype


def _variants(cfg: Any, dev: torch.device, batch: int, torch_dtype: torch.dtype
              ) -> tuple[dict[str, Callable[[], None]], int]:
    """The two training steps (baseline ``vit`` first) and the ViT depth."""
    import timm

    lcfg, frames, img = cfg.model.learner, int(cfg.data.num_frames), int(cfg.model.learner.img_size)
    torch.manual_seed(0)
    pathway = build_pathway(cfg).to(dev).train()
    kwargs: dict[str, Any] = dict(img_size=img, num_classes=0)
    if int(lcfg.depth) > 0:
        kwargs["depth"] = int(lcfg.depth)
    vit = timm.create_model(str(lcfg.backbone), pretrained=False, **kwargs).to(dev).train()
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (batch, frames, 3, img, img), dtype=torch.uint8, generator=g).to(dev)

    def learner_loss() -> torch.Tensor:
        out = pathway({"frames": clips})
        loss = out.cls.float().pow(2).mean() + out.regions.float().pow(2).mean()
        return loss + sum(out.aux_losses.values(), torch.zeros((), device=dev))

    def vit_loss() -> torch.Tensor:
        x = pathway.preprocess(clips)  # the same uint8 -> normalised float conversion, [B*T, 3, S, S]
        feats = vit(x).view(batch, frames, -1).mean(1)  # [B, C]
        return feats.float().pow(2).mean()

    steps = {"vit": _step_fn(vit, vit_loss, dev, torch_dtype),
             "learner": _step_fn(pathway, learner_loss, dev, torch_dtype)}
    return steps, len(vit.blocks)


def _warm_and_peaks(steps: dict[str, Callable[[], None]], dev: torch.device, warmup: int) -> dict[str, int]:
    """Warm-up calls per variant; on CUDA the peak bytes above what was resident before."""
    peaks: dict[str, int] = {}
    for name, step in steps.items():
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            resident = torch.cuda.memory_allocated(dev)
        for _ in range(max(warmup, 1)):
            step()
        synchronize(dev)
        if dev.type == "cuda":  # activations, grads, AdamW state
            peaks[name] = int(torch.cuda.max_memory_allocated(dev) - resident)
    return peaks


def _gflop(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Matmul/conv/attention GFLOPs of one step of each variant: independent of load."""
    out: dict[str, float] = {}
    for name, step in steps.items():
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        out[name] = counter.get_total_flops() / 1e9
    return out


def bench_learner(config: str | Path | None = None, *, batch: int = 8, device: str = "auto", dtype: str = "auto",
                  iters: int = 5, warmup: int = 2, overrides: Sequence[str] = (), **flags: Any) -> dict[str, Any]:
    """Clips/s of one training step, pathway vs plain ViT; ``flags`` override the config
    (``backbone``, ``frames``, ``img_size``, ``depth``, ``divided_space_time``, ... see FLAG_KEYS)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    dtype, torch_dtype = _dtype(dev, dtype)
    cfg = bench_config(config, overrides, **flags)
    lcfg, frames = cfg.model.learner, int(cfg.data.num_frames)
    if min(batch, frames, iters, int(lcfg.img_size)) < 1:
        raise UserError("--batch, --frames, --iters and --img-size must be >= 1")
    steps, depth = _variants(cfg, dev, batch, torch_dtype)
    peaks = _warm_and_peaks(steps, dev, warmup)
    gflop = _gflop(steps)
    timed = interleaved_times(steps, dev, iters)
    wall = {k: t["seconds"] for k, t in timed.items()}
    cpu = {k: t["cpu_seconds"] for k, t in timed.items()}
    result: dict[str, Any] = {
        "bench": "learner", "device": device_name(dev), "dtype": dtype,
        "config": str(config or SHIPPED_CONFIG), "backbone": str(lcfg.backbone), "depth": depth,
        "batch": batch, "frames": frames, "img_size": int(lcfg.img_size),
        "codebook_size": int(lcfg.codebook_size), "code_dim": int(lcfg.code_dim),
        "num_regions": int(lcfg.num_regions), "interaction_layers": int(lcfg.interaction_layers),
        "divided_space_time": bool(lcfg.divided_space_time), "commitment": float(lcfg.commitment),
        "iters": iters, "unit": "clips/s, training step (fwd + bwd + AdamW)",
        "learner_per_s": batch / wall["learner"], "vit_per_s": batch / wall["vit"], "baseline": "vit",
    }
    result["ratio"] = result["learner_per_s"] / result["vit_per_s"]
    result["learner_gflop_per_step"] = gflop["learner"]
    result["vit_gflop_per_step"] = gflop["vit"]
    result["gflop_ratio"] = gflop["vit"] / max(gflop["learner"], 1e-9)  # as a throughput ratio
    result["learner_cpu_ms_per_step"] = 1000.0 * cpu["learner"]
    result["vit_cpu_ms_per_step"] = 1000.0 * cpu["vit"]
    result["cpu_time_ratio"] = cpu["vit"] / max(cpu["learner"], 1e-9)  # as a throughput ratio
    if peaks:
        result["learner_peak_bytes"] = peaks["learner"]
        result["vit_peak_bytes"] = peaks["vit"]
    return result
