"""``regionvlp bench regions``: frames/s of the region extractor against the stock call.

Variants, same detector weights, inputs (uint8 frames ``[batch,3,size,size]``), device
and dtype, measured in one run:

- ``backbone``: preprocessing + backbone (+FPN) only, the floor every variant pays;
- ``extractor``: :class:`RegionExtractor` with K regions and the tuned RPN defaults of
  ``DetectorConfig`` (``rpn_pre_nms_top_n``/``rpn_post_nms_top_n``);
- ``extractor_stock_rpn``: the same extractor at the arch's stock RPN settings;
- ``stock`` (the baseline): ``model(images)`` with ``box_score_thresh=0`` and
  ``box_detections_per_img=K``, then RoI pooling + box head over its boxes (features
  captured from the backbone by a hook), i.e. the straightforward way to get K boxes
  with their 1024-d features out of torchvision.

The detector runs at ``min_size = max_size = size`` so no variant upsamples.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

from regionvlp.bench import device_name, resolve_device, synchronize
from regionvlp.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _interleaved_best(variants: dict[str, Any], device: torch.device, *, warmup: int, iters: int
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """(wall seconds, process CPU seconds) per call of each variant: the best of ``iters``
    calls, the variants taking turns so that load from other processes (a shared CPU)
    hits all of them alike. CPU time (all threads) is what a variant costs whatever the
    load; on GPU only the wall time means anything."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    best = {name: float("inf") for name in variants}
    best_cpu = {name: float("inf") for name in variants}
    for _ in range(iters):
        for name, fn in variants.items():
            start, cpu0 = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
            best_cpu[name] = min(best_cpu[name], time.process_time() - cpu0)
    return best, best_cpu


def bench_regions(arch: str = "fasterrcnn_resnet50_fpn", size: int = 384, batch: int = 64, device: str = "auto",
                  dtype: str = "auto", num_regions: int = 30, weights: str = "none", iters: int = 3,
                  warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    from regionvlp.config import DetectorConfig
    from regionvlp.regions.detector import build_detector
    from regionvlp.regions.extractor import RegionExtractor

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no GPU is visible; use --device cpu (or auto)")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of fp32, bf16, fp16, auto; got {dtype}")
    if dtype == "fp16" and dev.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
    torch.manual_seed(seed)
    k = int(num_regions)
    from regionvlp.regions.detector import detector_kwargs

    base_kw = {"min_size": size, "max_size": size}
    dcfg = DetectorConfig(arch=arch)
    tuned_kw = detector_kwargs(dcfg)  # the extractor's defaults: TUNED_RPN for this arch
    stock_det = build_detector(arch, weights, box_score_thresh=0.0, box_detections_per_img=k, **base_kw)
    stock_det.eval().requires_grad_(False).to(dev)
    state = stock_det.state_dict()
    tuned_det = build_detector(arch, "none", **{**tuned_kw, **base_kw})
    tuned_det.load_state_dict(state)
    stock_rpn_det = build_detector(arch, "none", **base_kw)
    stock_rpn_det.load_state_dict(state)
    autocast_name = "none" if dtype == "fp32" else dtype
    channels_last = dev.type == "cuda"
    if channels_last:
        stock_det.to(memory_format=torch.channels_last)
    ex_tuned = RegionExtractor(tuned_det, num_regions=k, autocast=autocast_name, channels_last=channels_last).to(dev)
    ex_stock_rpn = RegionExtractor(stock_rpn_det, num_regions=k, autocast=autocast_name,
                                   channels_last=channels_last).to(dev)

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(size // 16, 1), max(size // 16, 1), generator=g)
    frames = (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255).to(torch.uint8)
    frames = frames.to(dev)  # [batch, 3, size, size], smooth so the RPN sees structure

    captured: dict[str, Any] = {}
    stock_det.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("feats", o))

    def backbone() -> None:
        with torch.inference_mode(), _autocast(dev, dtype):
            x, _ = ex_tuned.preprocess(frames)
            tuned_det.backbone(x)

    def stock() -> None:
        with torch.inference_mode(), _autocast(dev, dtype):
            images = [f.float().div(255) for f in frames]
            dets = stock_det(images)
            h, w = frames.shape[-2:]
            # detections are in frame pixels; the detector ran at the same size (scale 1)
            boxes = [d["boxes"].float() for d in dets]
            sizes = [(h, w)] * len(boxes)
            roi = stock_det.roi_heads
            roi.box_head(roi.box_roi_pool(captured["feats"], boxes, sizes))

    def extract(ex: RegionExtractor) -> None:
        with _autocast(dev, dtype):  # the extractor autocasts itself on GPU only; same dtype on CPU too
            ex(frames)

    variants = {
        "backbone": backbone,
        "extractor": lambda: extract(ex_tuned),
        "extractor_stock_rpn": lambda: extract(ex_stock_rpn),
        "stock": stock,
    }
    result: dict[str, Any] = {
        "bench": "regions",
        "device": device_name(dev),
        "dtype": dtype,
        "arch": arch,
        "weights": weights,
        "size": size,
        "batch": batch,
        "num_regions": k,
        "rpn_tuned": {"pre_nms_top_n": tuned_det.rpn._pre_nms_top_n["testing"],
                      "post_nms_top_n": tuned_det.rpn._post_nms_top_n["testing"]},
        "rpn_stock": {"pre_nms_top_n": stock_rpn_det.rpn._pre_nms_top_n["testing"],
                      "post_nms_top_n": stock_rpn_det.rpn._post_nms_top_n["testing"]},
        "iters": iters,
    }
    best, best_cpu = _interleaved_best(variants, dev, warmup=warmup, iters=iters)
    for name, sec in best.items():
        result[f"{name}_per_s"] = round(batch / sec, 3)
    if dev.type == "cpu":
        for name, sec in best_cpu.items():
            result[f"{name}_cpu_ms_per_frame"] = round(1000 * sec / batch, 2)
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["timing"] = f"best of {iters} calls per variant, variants interleaved round-robin"
    result["baseline"] = "stock"
    result["extractor_vs_stock"] = round(result["extractor_per_s"] / result["stock_per_s"], 3)
    result["extractor_vs_backbone"] = round(result["extractor_per_s"] / result["backbone_per_s"], 3)
    result["extractor_stock_rpn_vs_stock"] = round(result["extractor_stock_rpn_per_s"] / result["stock_per_s"], 3)
    if dev.type == "cpu":
        result["extractor_vs_stock_cpu_time"] = round(best_cpu["stock"] / best_cpu["extractor"], 3)
    return result
