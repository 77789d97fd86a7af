"""Validation during training: the loss terms on ``data.val`` and retrieval R@k."""

from __future__ import annotations

from typing import Any

import torch

from regionvlp import dist
from regionvlp.data import build_loader
from regionvlp.evaluation import evaluate_model
from regionvlp.model import prepare_batch
from regionvlp.qa.evaluate import evaluate_qa, run_vocab
from regionvlp.runtime import get_autocast

VAL_METRICS = ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5", "t2v_medr")
QA_VAL_METRICS = ("qa_accuracy", "qa_majority_accuracy")


def val_loss(engine: Any, cfg: Any, extractor: Any | None, device: torch.device, dtype: torch.dtype,
             num_frames: int, fallback: dict[str, Any]) -> dict[str, float]:
    """Mean loss terms over data.val; every rank runs the same number of forwards (a rank
    out of data repeats its last batch, or ``fallback`` if it had none, uncounted) so
    ZeRO-3 gathers never hang."""
    it = iter(build_loader(cfg, "val", training=False, num_frames=num_frames))
    sums: dict[str, float] = {}
    count, last = 0, fallback
    engine.eval()
    with torch.no_grad():
        while True:
            batch = next(it, None)
            if not dist.any_rank(batch is not None, device):
                break
            real = batch is not None
            batch = last = batch if real else last
            with get_autocast(dtype, device.type)():
                out = engine(prepare_batch(batch, extractor, device, dtype))
            if real:
                n = len(batch["__key__"])
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.float()) * n
                count += n
    engine.train()
    return reduce_means(sums, count, device)


def reduce_means(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """``val_<key>`` means over every rank's sums (keys agreed across ranks) and ``val_samples``."""
    keys = sorted(set().union(*map(set, dist.gather_objects(sorted(sums)))))
    local = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(count)], dtype=torch.float64, device=device)
    t = dist.all_reduce_sum(local).cpu()
    total = max(1.0, float(t[-1]))
    return {f"val_{k}": float(v) / total for k, v in zip(keys, t[:-1].tolist())} | {"val_samples": int(t[-1])}


def validate(engine: Any, cfg: Any, extractor: Any | None, device: torch.device, dtype: torch.dtype,
             num_frames: int, zero_stage: int, fallback: dict[str, Any]) -> dict[str, float]:
    """Val loss, plus retrieval R@1/R@5 from :mod:`regionvlp.evaluation` (QA accuracy and
    its majority baseline for a QA run), not under ZeRO-3, where ranks' differing val
    batch counts would stall the parameter gathers."""
    if not list(cfg.data.val.urls):
        return {}
    out = val_loss(engine, cfg, extractor, device, dtype, num_frames, fallback)
    if zero_stage < 3 and cfg.qa.enabled:
        engine.module.answers = run_vocab(cfg)
        with get_autocast(dtype, device.type)():
            metrics = evaluate_qa(engine.module, cfg, "val", batch_transform=extractor, device=device)
        out.update({f"val_{k}": float(v) for k, v in metrics.items() if k in QA_VAL_METRICS})
        engine.train()
    elif zero_stage < 3:
        with get_autocast(dtype, device.type)():
            metrics = evaluate_model(engine.module, cfg, "val", batch_transform=extractor, device=device,
                                     progress=False)
        out.update({f"val_{k}": float(v) for k, v in metrics.items() if k in VAL_METRICS})
        engine.train()
    return out
