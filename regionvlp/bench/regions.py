"""``regionvlp bench regions``: frames/s of the region extractor against the stock call.

Variants, same detector weights, inputs (uint8 frames ``[batch,3,size,size]``), device
and dtype, measured in one run:

- ``backbone``: preprocessing + backbone (+FPN) + the RPN head's conv, the floor every
  variant pays (the RPN head conv runs on every FPN level: +36 % FLOPs at P2 on R50);
- ``extractor``: :class:`RegionExtractor` with K regions, the tuned RPN defaults of
  ``DetectorConfig`` (``rpn_pre_nms_top_n``/``rpn_post_nms_top_n``) and ``--selection``
  (default ``region``, as the shipped configs);
- ``extractor_stock_rpn``: the same extractor at the arch's stock RPN settings;
- ``stock`` (the baseline): ``model(images)`` with ``box_score_thresh=0`` and
  ``box_detections_per_img=K``, then RoI pooling + box head over its boxes (features
  captured from the backbone by a hook), i.e. the straightforward way to get K boxes
  with their 1024-d features out of torchvision.

The detector runs at ``min_size = max_size = size`` so no variant upsamples.

Quality figures from one untimed call each, same weights and frames:
``box_agreement`` is the share of the extractor's real boxes that match a box of the
stock call at IoU >= 0.9, ``box_agreement_stock_selection`` the same for the extractor
with ``selection: stock`` (tuned RPN), ``real_regions_per_frame`` the extractor's real
(unpadded) boxes per frame out of K.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from regionvlp.config import DetectorConfig
from regionvlp.detector.detector import build_detector, detector_kwargs
from regionvlp.detector.extractor import RegionExtractor
from regionvlp.errors import UserError
from regionvlp.runtime import device_name, get_autocast, resolve_device, synchronize


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _resolve(device: str, dtype: str) -> tuple[torch.device, str]:
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no GPU is visible; use --device cpu (or auto)")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of fp32, bf16, fp16, auto; got {dtype}")
    if dtype == "fp16" and dev.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
    return dev, dtype


def _detectors(arch: str, weights: str, size: int, k: int, dev: torch.device) -> dict[str, torch.nn.Module]:
    """``stock`` (K detections, score threshold 0), ``tuned`` (the extractor's RPN defaults) and
    ``stock_rpn`` (the arch's RPN settings), all with the same weights, eval, on ``dev``."""
    base_kw = {"min_size": size, "max_size": size}
    stock = build_detector(arch, weights, box_score_thresh=0.0, box_detections_per_img=k, **base_kw)
    stock.eval().requires_grad_(False).to(dev)
    tuned = build_detector(arch, "none", **{**detector_kwargs(DetectorConfig(arch=arch)), **base_kw})
    stock_rpn = build_detector(arch, "none", **base_kw)
    for det in (tuned, stock_rpn):
        det.load_state_dict(stock.state_dict())
    if dev.type == "cuda":
        stock.to(memory_format=torch.channels_last)
    return {"stock": stock, "tuned": tuned, "stock_rpn": stock_rpn}


def _smooth_frames(batch: int, size: int, seed: int, dev: torch.device) -> torch.Tensor:
    """uint8 [batch, 3, size, size], smooth so the RPN sees structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(size // 16, 1), max(size // 16, 1), generator=g)
    return (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255).to(torch.uint8).to(dev)


def _stock_call(stock_det: torch.nn.Module, frames: torch.Tensor):
    """``model(images)`` then RoI pooling + box head over its boxes -> the detections."""
    captured: dict[str, Any] = {}
    hook = stock_det.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("feats", o))
    try:
        dets = stock_det([f.float().div(255) for f in frames])
    finally:
        hook.remove()
    # detections are in frame pixels; the detector ran at the same size (scale 1)
    boxes = [d["boxes"].float() for d in dets]
    roi = stock_det.roi_heads
    roi.box_head(roi.box_roi_pool(captured["feats"], boxes, [tuple(frames.shape[-2:])] * len(boxes)))
    return dets


def box_agreement(regions: dict[str, torch.Tensor], stock: list[dict[str, torch.Tensor]], size: int,
                  iou: float = 0.9) -> float:
    """Share of the extractor's real boxes with a stock detection at IoU >= ``iou``."""
    from torchvision.ops import box_iou

    matched = total = 0
    for boxes, mask, det in zip(regions["region_boxes"], regions["region_mask"], stock):
        mine = boxes[mask].float() * size  # [k, 4] frame pixels (square frames)
        total += int(mine.shape[0])
        if mine.shape[0] and det["boxes"].shape[0]:
            matched += int((box_iou(mine, det["boxes"].float()).max(dim=1).values >= iou).sum())
    return matched / max(total, 1)


def _quality(ex: Any, ex_stock_sel: Any, stock_det: torch.nn.Module, frames: torch.Tensor, dev: torch.device,
             dtype: str) -> dict[str, float]:
    with torch.inference_mode(), get_autocast(dtype, dev.type)():
        stock = _stock_call(stock_det, frames)
        mine, stock_sel = ex(frames), ex_stock_sel(frames)
    size = frames.shape[-1]
    return {"box_agreement": round(box_agreement(mine, stock, size), 4),
            "box_agreement_stock_selection": round(box_agreement(stock_sel, stock, size), 4),
            "real_regions_per_frame": round(float(mine["region_mask"].sum()) / frames.shape[0], 3),
            "stock_regions_per_frame": round(sum(len(d["boxes"]) for d in stock) / frames.shape[0], 3)}


def _ratios(result: dict[str, Any], best_cpu: dict[str, float], dev: torch.device) -> None:
    result["baseline"] = "stock"
    result["extractor_vs_stock"] = round(result["extractor_per_s"] / result["stock_per_s"], 3)
    result["extractor_vs_backbone"] = round(result["extractor_per_s"] / result["backbone_per_s"], 3)
    result["extractor_stock_rpn_vs_stock"] = round(result["extractor_stock_rpn_per_s"] / result["stock_per_s"], 3)
    if dev.type == "cpu":
        result["extractor_vs_stock_cpu_time"] = round(best_cpu["stock"] / best_cpu["extractor"], 3)
        result["extractor_vs_backbone_cpu_time"] = round(best_cpu["backbone"] / best_cpu["extractor"], 3)


def bench_regions(arch: str = "fasterrcnn_resnet50_fpn", size: int = 384, batch: int = 64, device: str = "auto",
                  dtype: str = "auto", num_regions: int = 30, weights: str = "none", iters: int = 3,
                  warmup: int = 1, seed: int = 0, selection: str = "region") -> dict[str, Any]:

    dev, dtype = _resolve(device, dtype)
    torch.manual_seed(seed)
    k = int(num_regions)
    dets = _detectors(arch, weights, size, k, dev)
    opts = {"num_regions": k, "autocast": "none" if dtype == "fp32" else dtype, "channels_last": dev.type == "cuda"}
    ex_tuned = RegionExtractor(dets["tuned"], selection=selection, **opts).to(dev)
    ex_stock_rpn = RegionExtractor(dets["stock_rpn"], selection=selection, **opts).to(dev)
    ex_stock_sel = RegionExtractor(dets["tuned"], selection="stock", **opts).to(dev)
    frames = _smooth_frames(batch, size, seed, dev)

    def backbone() -> None:
        with torch.inference_mode(), get_autocast(dtype, dev.type)():
            x, _ = ex_tuned.preprocess(frames)
            dets["tuned"].rpn.head(list(dets["tuned"].backbone(x).values()))

    def stock() -> None:
        with torch.inference_mode(), get_autocast(dtype, dev.type)():
            _stock_call(dets["stock"], frames)

    def extract(ex: RegionExtractor) -> None:
        with get_autocast(dtype, dev.type)():  # the extractor autocasts itself on GPU only; same dtype on CPU too
            ex(frames)

    variants = {"backbone": backbone, "extractor": lambda: extract(ex_tuned),
                "extractor_stock_rpn": lambda: extract(ex_stock_rpn), "stock": stock}
    rpn = {name: {"pre_nms_top_n": dets[name].rpn._pre_nms_top_n["testing"],
                  "post_nms_top_n": dets[name].rpn._post_nms_top_n["testing"]} for name in ("tuned", "stock_rpn")}
    result: dict[str, Any] = {
        "bench": "regions", "device": device_name(dev), "dtype": dtype, "arch": arch, "weights": weights,
        "size": size, "batch": batch, "num_regions": k, "selection": selection,
        "rpn_tuned": rpn["tuned"], "rpn_stock": rpn["stock_rpn"], "iters": iters,
    }
    result.update(_quality(ex_tuned, ex_stock_sel, dets["stock"], frames, dev, dtype))
    best, best_cpu = _interleaved_best(variants, dev, warmup=warmup, iters=iters)
    for name, sec in best.items():
        result[f"{name}_per_s"] = round(batch / sec, 3)
    if dev.type == "cpu":
        for name, sec in best_cpu.items():
            result[f"{name}_cpu_ms_per_frame"] = round(1000 * sec / batch, 2)
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["timing"] = f"best of {iters} calls per variant, variants interleaved round-robin"
    _ratios(result, best_cpu, dev)
    return result
