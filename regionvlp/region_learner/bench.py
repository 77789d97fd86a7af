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
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from regionvlp.bench import device_name, interleaved_times, resolve_device, synchronize
from regionvlp.errors import UserError


def _step_fn(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
             dtype: torch.dtype) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = dtype != torch.float32

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def bench_learner(
    backbone: str = "vit_base_patch16_224",
    *,
    batch: int = 8,
    frames: int = 4,
    device: str = "auto",
    img_size: int = 224,
    dtype: str = "auto",
    depth: int = 0,
    codebook_size: int = 2048,
    code_dim: int = 256,
    num_regions: int = 8,
    interaction_layers: int = 1,
    divided_space_time: bool = False,
    embed_dim: int = 256,
    iters: int = 5,
    warmup: int = 2,
) -> dict[str, Any]:
    import timm

    from regionvlp.config import load_config
    from regionvlp.region_learner import build_pathway

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype}: choose fp32 or bf16")
    if min(batch, frames, iters, img_size) < 1:
        raise UserError("--batch, --frames, --iters and --img-size must be >= 1")

    torch.manual_seed(0)
    cfg = load_config(None, [
        "model.regions=learned", f"model.embed_dim={embed_dim}",
        f"model.learner.backbone={backbone}", f"model.learner.img_size={img_size}",
        f"model.learner.depth={depth}", f"model.learner.max_frames={frames}", f"data.num_frames={frames}",
        f"model.learner.codebook_size={codebook_size}", f"model.learner.code_dim={code_dim}",
        f"model.learner.num_regions={num_regions}", f"model.learner.interaction_layers={interaction_layers}",
        f"model.learner.divided_space_time={str(bool(divided_space_time)).lower()}",
    ])
    pathway = build_pathway(cfg).to(dev).train()
    kwargs: dict[str, Any] = dict(img_size=img_size, num_classes=0)
    if depth > 0:
        kwargs["depth"] = depth
    vit = timm.create_model(backbone, pretrained=False, **kwargs).to(dev).train()

    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (batch, frames, 3, img_size, img_size), dtype=torch.uint8, generator=g).to(dev)
    batch_dict = {"frames": clips}

    def learner_loss() -> torch.Tensor:
        out = pathway(batch_dict)
        loss = out.cls.float().pow(2).mean() + out.regions.float().pow(2).mean()
        return loss + sum(out.aux_losses.values(), torch.zeros((), device=dev))

    def vit_loss() -> torch.Tensor:
        x = pathway.preprocess(clips)  # the same uint8 -> normalised float conversion, [B*T, 3, S, S]
        feats = vit(x).view(batch, frames, -1).mean(1)  # [B, C]
        return feats.float().pow(2).mean()

    steps = {"vit": _step_fn(vit, vit_loss, dev, torch_dtype),
             "learner": _step_fn(pathway, learner_loss, dev, torch_dtype)}
    peaks: dict[str, int] = {}
    for name, step in steps.items():  # warm-up (and peak memory) per variant
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            resident = torch.cuda.memory_allocated(dev)
        for _ in range(max(warmup, 1)):
            step()
        synchronize(dev)
        if dev.type == "cuda":  # above what was resident before: activations, grads, AdamW state
            peaks[name] = int(torch.cuda.max_memory_allocated(dev) - resident)
    from torch.utils.flop_counter import FlopCounterMode

    gflop: dict[str, float] = {}
    for name, step in steps.items():  # matmul/conv/attention FLOPs of one step: independent of load
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        gflop[name] = counter.get_total_flops() / 1e9
    timed = interleaved_times(steps, dev, iters)
    median = {k: t["seconds"] for k, t in timed.items()}
    median_cpu = {k: t["cpu_seconds"] for k, t in timed.items()}
    result: dict[str, Any] = {
        "bench": "learner",
        "device": device_name(dev),
        "dtype": dtype,
        "backbone": backbone,
        "depth": len(vit.blocks),
        "batch": batch,
        "frames": frames,
        "img_size": img_size,
        "codebook_size": codebook_size,
        "code_dim": code_dim,
        "num_regions": num_regions,
        "interaction_layers": interaction_layers,
        "divided_space_time": bool(divided_space_time),
        "iters": iters,
        "unit": "clips/s, training step (fwd + bwd + AdamW)",
        "learner_per_s": batch / median["learner"],
        "vit_per_s": batch / median["vit"],
        "baseline": "vit",
    }
    result["ratio"] = result["learner_per_s"] / result["vit_per_s"]
    result["learner_gflop_per_step"] = gflop["learner"]
    result["vit_gflop_per_step"] = gflop["vit"]
    result["learner_cpu_ms_per_step"] = 1000.0 * median_cpu["learner"]
    result["vit_cpu_ms_per_step"] = 1000.0 * median_cpu["vit"]
    result["cpu_time_ratio"] = median_cpu["vit"] / max(median_cpu["learner"], 1e-9)  # as a throughput ratio
    if peaks:
        result["learner_peak_bytes"] = peaks["learner"]
        result["vit_peak_bytes"] = peaks["vit"]
    return result
