"""``regionvlp detector fit``: fine-tune a torchvision Faster R-CNN on the box labels in shards.

Real users start the detector pathway from COCO or Visual Genome weights; where none can
be downloaded (or for a world of its own, like ``regionvlp synth``), this fits one on
the boxes the shards carry and writes a checkpoint the detector pathway loads by path
(``model.detector.weights=PATH``).

Box labels are read from each sample's json, in the layout ``synth`` writes:
``boxes`` — per frame of the video, one ``[x1, y1, x2, y2]`` in pixels of the original
``width`` × ``height`` per object — and ``labels`` — one class id per object (0 is the
background). Frames are decoded exactly as evaluation decodes them (``iter_samples``
with ``training=False``: ``data.eval_sampling``, short side resized to ``data.size`` and
a centre crop), and the boxes go through the same frame selection, resize and crop.

Box recall is measured the way the pathway sees boxes: the fitted checkpoint is loaded
into the frozen :class:`~regionvlp.detector.RegionExtractor` (``model.detector.*``:
top-K per frame after class-agnostic NMS) and a labelled box counts as found when one of
the K boxes overlaps it with IoU >= 0.5.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from regionvlp.data import iter_samples
from regionvlp.data.decode import sample_indices
from regionvlp.data.samples import with_frames
from regionvlp.detector.detector import build_detector, detector_kwargs, freeze_for_finetune, save_detector
from regionvlp.detector.extractor import build_extractor
from regionvlp.errors import UserError
from regionvlp.hub import apply_offline
from regionvlp.optim import WarmupCosine, no_decay_names


log = logging.getLogger(__name__)


@dataclass
class FrameSet:
    """Decoded frames with their boxes, one entry per frame."""

    frames: torch.Tensor  # [N, 3, S, S] uint8
    boxes: list[torch.Tensor]  # N × [n_i, 4] float32 pixels of the S×S frame
    labels: list[torch.Tensor]  # N × [n_i] int64
    clips: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


# ----------------------------------------------------------------- box labels
def frame_boxes(meta: dict[str, Any], indices: Sequence[int], size: int,
                min_side: float = 2.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The json's pixel boxes for the frames at ``indices``, mapped through the decoder's
    short-side resize to ``size`` and centre crop (``[n, 4]`` per frame, clipped to the
    crop; boxes thinner than ``min_side`` pixels after cropping are dropped).

    Raises ``ValueError`` (the skip reason's detail) when the json has no usable boxes.
    """
    boxes, labels = meta.get("boxes"), meta.get("labels")
    width, height = meta.get("width"), meta.get("height")
    if not isinstance(boxes, list) or not isinstance(labels, list) or not boxes:
        raise ValueError("json has no 'boxes'/'labels'")
    if not width or not height:
        raise ValueError("json has no 'width'/'height'")
    scale = size / min(width, height)
    nw, nh = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = nw / width, nh / height
    lab = torch.as_tensor(labels, dtype=torch.int64)  # [n]
    out_boxes, out_labels = [], []
    for i in indices:
        if i >= len(boxes):
            raise ValueError(f"json has boxes for {len(boxes)} frames, frame {i} sampled")
        b = torch.as_tensor(boxes[i], dtype=torch.float32).reshape(-1, 4)  # [n, 4]
        if b.shape[0] != lab.shape[0]:
            raise ValueError(f"{b.shape[0]} boxes but {lab.shape[0]} labels")
        b = b * torch.tensor([sx, sy, sx, sy]) - torch.tensor([left, top, left, top], dtype=torch.float32)
        b = b.clamp(0, size)
        keep = ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
        out_boxes.append(b[keep])
        out_labels.append(lab[keep])
    return out_boxes, out_labels


def load_frames(urls: Sequence[str], cfg: Any, *, num_frames: int, max_clips: int | None = None,
                desc: str = "frames") -> FrameSet:
    """Every labelled frame of up to ``max_clips`` clips (``num_frames`` per clip)."""
    stream = iter_samples(list(urls), cfg, training=False, num_frames=num_frames)
    frames: list[torch.Tensor] = []
    boxes: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    extra: dict[str, int] = {}
    clips = 0
    bar = tqdm(total=max_clips, desc=f"detector fit: reading {desc}", unit="clip", file=sys.stderr, leave=False)
    for sample in with_frames(stream, stream.counter):
        meta = sample.get("meta") or {}
        clip = sample["frames"]  # [T, 3, S, S] uint8
        total = int(meta.get("num_frames") or 0)
        try:
            if total <= 0:
                raise ValueError("json has no 'num_frames'")
            idx = sample_indices(total, clip.shape[0], cfg.data.eval_sampling)
            b, lab = frame_boxes(meta, idx, int(clip.shape[-1]))
        except ValueError as err:
            extra["no_boxes"] = extra.get("no_boxes", 0) + 1
            log.debug("detector fit: %s skipped: %s", sample.get("__key__"), err)
            continue
        frames.append(clip)
        boxes.extend(b)
        labels.extend(lab)
        clips += 1
        bar.update(1)
        if max_clips is not None and clips >= max_clips:
            break
    bar.close()
    skipped = dict(getattr(stream, "skipped", {}) or {})
    for k, v in extra.items():
        skipped[k] = skipped.get(k, 0) + v
    if not frames:
        raise UserError(
            f"detector fit: no labelled frames in {' '.join(urls)} (skipped: {skipped or 'none'}); the shards' json "
            "needs per-frame pixel 'boxes', per-object 'labels', 'width', 'height' and 'num_frames' as `regionvlp synth` writes"
        )
    return FrameSet(torch.cat(frames), boxes, labels, clips=clips, skipped=skipped)


# --------------------------------------------------------------------- recall
def box_recall(pred_boxes: torch.Tensor, pred_mask: torch.Tensor, gt_boxes: Sequence[torch.Tensor],
               iou_thresh: float = 0.5) -> tuple[int, int]:
    """(found, total) labelled boxes; found = some kept prediction has IoU >= ``iou_thresh``.

    ``pred_boxes`` [N, K, 4] and ``gt_boxes`` N × [n_i, 4] in the same coordinates,
    ``pred_mask`` [N, K] bool (True = a real prediction).
    """
    from torchvision.ops import box_iou

    found = total = 0
    for pb, pm, gb in zip(pred_boxes, pred_mask, gt_boxes):
        total += int(gb.shape[0])
        if gb.shape[0] == 0 or not bool(pm.any()):
            continue
        iou = box_iou(gb, pb[pm])  # [n_i, k]
        found += int((iou.max(dim=1).values >= iou_thresh).sum())
    return found, total


@torch.no_grad()
def measure_recall(extractor: Any, data: FrameSet, *, batch_size: int = 64, iou_thresh: float = 0.5) -> dict[str, Any]:
    """Box recall of the extractor's top-K boxes on ``data``'s frames."""
    found = total = 0
    kept = 0
    size = data.frames.shape[-1]
    for start in tqdm(range(0, len(data), batch_size), desc="detector fit: box recall", unit="batch",
                      file=sys.stderr, leave=False):
        frames = data.frames[start:start + batch_size]  # [n, 3, S, S]
        out = extractor(frames[:, None])  # regions of [n, 1, ...]
        boxes = out["region_boxes"][:, 0].float().cpu() * size  # [n, K, 4] pixels
        mask = out["region_mask"][:, 0].cpu()  # [n, K]
        f, t = box_recall(boxes, mask, data.boxes[start:start + batch_size], iou_thresh)
        found, total = found + f, total + t
        kept += int(mask.sum())
    return {"box_recall": found / max(total, 1), "boxes_found": found, "boxes_total": total,
            "frames": len(data), "regions_per_frame": kept / max(len(data), 1), "iou": iou_thresh}


# ------------------------------------------------------------------------ fit
def _augment(frames: torch.Tensor, boxes: list[torch.Tensor], flip: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Horizontal flip of the frames where ``flip`` [n] is True, boxes alongside."""
    size = frames.shape[-1]
    frames = torch.where(flip[:, None, None, None], frames.flip(-1), frames)  # [n, 3, S, S]
    out = []
    for b, f in zip(boxes, flip.tolist()):
        out.append(torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], dim=1) if f else b)
    return frames, out


def _num_classes(train: FrameSet, num_classes: int | None) -> int:
    present = int(max(int(lab.max()) if lab.numel() else 0 for lab in train.labels))
    if num_classes is None:
        return present + 1
    if num_classes <= present:
        raise UserError(f"detector fit: --num-classes {num_classes} but the shards use class id {present}")
    return num_classes


def _build_model(cfg: Any, num_classes: int, trainable_layers: int) -> tuple[torch.nn.Module, dict | None]:
    """The detector to fit, and the freeze counts when it starts from pretrained weights."""
    d = cfg.model.detector
    # fewer sampled RPN proposals / RoIs per training image than torchvision's defaults: the
    # box head dominates a step at these sizes and a few objects per frame need few samples
    train_kw = {"rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150, "box_batch_size_per_image": 64}
    kw = {**detector_kwargs(d, size=int(cfg.data.size)), **train_kw}
    apply_offline(cfg)  # run.offline: pretrained weights only from the cache
    model = build_detector(d.arch, d.weights, num_classes=num_classes, **kw)
    pretrained = str(d.weights).strip().lower() not in ("none", "", "null", "random")
    frozen = freeze_for_finetune(model, str(d.arch), trainable_layers) if pretrained else None
    return model.train(), frozen


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, steps: int):
    """AdamW (no decay where :func:`regionvlp.optim.no_decay_names` says), linear warmup
    then cosine to 5 % — the trainer's schedule."""
    skip = no_decay_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in params if n not in skip], "weight_decay": weight_decay},
                             {"params": [p for n, p in params if n in skip], "weight_decay": 0.0}], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup_steps, steps, 0.05))


def _train(model: torch.nn.Module, train: FrameSet, *, steps: int, batch_size: int, lr: float,
           weight_decay: float, warmup_steps: int, seed: int, progress: bool) -> list[float]:
    """The fitting loop (random frames with a box, horizontal flips); the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt, sched = _optimizer(model, lr, weight_decay, warmup_steps, steps)
    # frames with at least one box (torchvision accepts empty targets, but they teach little here)
    usable = [i for i, b in enumerate(train.boxes) if b.shape[0] > 0]
    losses: list[float] = []
    bar = tqdm(range(steps), desc="detector fit", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        pick = [usable[rng.randrange(len(usable))] for _ in range(batch_size)]
        flip = torch.rand(len(pick), generator=gen) < 0.5  # [n]
        frames, boxes = _augment(train.frames[pick], [train.boxes[i] for i in pick], flip)
        images = list(frames.float().div_(255.0))  # the detector's own transform normalises
        terms = model(images, [{"boxes": b, "labels": train.labels[i]} for b, i in zip(boxes, pick)])
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise RuntimeError(f"detector fit: non-finite loss at step {step}: {({k: float(v) for k, v in terms.items()})}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    bar.close()
    return losses


def _recall(cfg: Any, out: Path, val_urls: list[str], num_frames: int, val_clips: int | None) -> dict[str, Any]:
    """Box recall through the frozen extractor, loading the checkpoint just written."""
    if not val_urls:
        log.warning("detector fit: no val shards (--val-urls or data.val.urls): box recall not measured")
        return {"box_recall": None}
    val = load_frames(val_urls, cfg, num_frames=num_frames, max_clips=val_clips, desc="val")
    ecfg = copy.deepcopy(cfg)
    ecfg.model.detector.weights = str(out)
    rec = measure_recall(build_extractor(ecfg), val)
    print(f"detector fit: box recall @ IoU 0.5 = {rec['box_recall']:.3f} ({rec['boxes_found']}/{rec['boxes_total']} "
          f"boxes, top-{cfg.model.detector.num_regions} per frame)", file=sys.stderr)
    return {"box_recall": rec["box_recall"], "val": {**rec, "clips": val.clips, "skipped": val.skipped}}


def fit_detector(
    cfg: Any,
    urls: Sequence[str],
    *,
    out: str | Path | None = None,
    val_urls: Sequence[str] | None = None,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 2.0e-3,
    weight_decay: float = 1.0e-4,
    warmup_steps: int = 20,
    num_frames: int | None = None,
    max_clips: int | None = None,
    val_clips: int | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
    trainable_layers: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit ``cfg.model.detector.arch`` (starting from ``cfg.model.detector.weights``) on the
    box labels of ``urls``, save it to ``out`` and measure box recall on ``val_urls``
    (default ``cfg.data.val.urls``). Returns the JSON summary.

    From pretrained weights (a name or a file), the backbone's BatchNorm is frozen and only
    its last ``trainable_layers`` stages train (:func:`~regionvlp.detector.detector.freeze_for_finetune`,
    torchvision's rule); from ``none`` everything trains with batch statistics."""
    if steps < 1 or batch_size < 1:
        raise UserError("detector fit: --steps and --batch-size must be >= 1")
    if not urls:
        raise UserError("detector fit: give the training shards (URLS)")
    seed = int(cfg.seed if seed is None else seed)
    torch.manual_seed(seed)
    num_frames = int(num_frames or cfg.data.num_frames)
    arch = cfg.model.detector.arch
    out = Path(out) if out is not None else Path(cfg.run.out_dir) / "detector.pt"
    start = time.perf_counter()

    train = load_frames(urls, cfg, num_frames=num_frames, max_clips=max_clips, desc="train")
    num_classes = _num_classes(train, num_classes)
    print(f"detector fit: {len(train)} frames of {train.clips} clips, {num_classes - 1} classes, "
          f"{sum(len(b) for b in train.boxes)} boxes", file=sys.stderr)
    model, frozen = _build_model(cfg, num_classes, trainable_layers)
    losses = _train(model, train, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    warmup_steps=warmup_steps, seed=seed, progress=progress)
    fit_seconds = time.perf_counter() - start
    save_detector(model, arch, out, classes=list(range(num_classes)), steps=steps, seed=seed)
    window = max(1, min(20, steps // 5))
    summary: dict[str, Any] = {
        "checkpoint": str(out), "arch": arch, "num_classes": num_classes, "steps": steps,
        "batch_size": batch_size, "train_frames": len(train), "train_clips": train.clips,
        "first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window,
        "fit_seconds": round(fit_seconds, 2), "skipped": dict(train.skipped),
        "backbone": ({"frozen_batchnorm": True, "trainable_layers": trainable_layers, **frozen} if frozen
                     else {"frozen_batchnorm": False, "trainable_layers": "all"}),
    }
    summary.update(_recall(cfg, out, list(val_urls) if val_urls else list(cfg.data.val.urls), num_frames, val_clips))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
