"""The frozen region extractor: frames -> exactly K detector regions per frame.

One batched pass over all B*T frames: resize + normalise -> backbone -> RPN head ->
batched proposal filtering -> box head on the proposals -> per proposal the max
non-background class probability and the box regressed for that class -> class-agnostic
NMS over all frames at once -> top-K per frame -> box-head RoI features of the final
boxes -> pad + mask to K.

Differences from the stock ``model(images)`` call, all for speed with the same result
semantics: proposals are filtered for all images at once (NMS groups = image x FPN
level) instead of a Python loop per image; the box stage never expands proposals to
every class (stock: P x C boxes per image go through thresholding and NMS); NMS runs as
one call with per-group coordinate offsets (``torchvision.ops.batched_nms`` switches
to a per-group Python loop above 4k/20k box coordinates, which a 64-frame batch always
exceeds).

The extractor is *not* an ``nn.Module``: a model can hold a reference to it without
it becoming a child, so optimizers, DeepSpeed and checkpoints never see its weights.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regionvlp.errors import UserError

REGION_KEYS = ("region_feats", "region_boxes", "region_mask", "region_labels", "region_scores")


# ------------------------------------------------------------ batched helpers
def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """NMS within each group; kept indices sorted by decreasing score.

    The coordinate-offset trick of torchvision's ``batched_nms`` (one kernel call for
    many groups), done in float64 so the offsets of many groups (frames x levels) cannot
    round the coordinates. One call costs O(N^2) in the boxes it sees, so whole groups are
    packed into chunks of at most ``_NMS_CHUNK`` boxes (a handful of calls for a 64-frame
    batch) instead of torchvision's fallback of one call per group.
    """
    from torchvision.ops import nms

    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    b = boxes.double()  # [N, 4]
    span = b.max() - b.min() + 1.0
    limit = _NMS_CHUNK[boxes.device.type == "cuda"]
    if n <= limit:
        return nms(b + (groups.to(b) * span)[:, None], scores.double(), iou)
    # pack whole groups into chunks: sort by group, cut where the running count passes the limit
    order = torch.argsort(groups, stable=True)  # [N]
    g_sorted = groups[order]
    counts = torch.bincount(g_sorted - g_sorted[0])
    counts = counts[counts > 0]  # boxes per present group, in group order
    ends = torch.cumsum(counts, 0)
    chunk_of_group = torch.div(ends - 1, limit, rounding_mode="floor")  # groups larger than limit get their own chunk
    chunk_sizes = torch.bincount(chunk_of_group).tolist()  # groups per chunk
    group_sizes = counts.tolist()
    kept, pos, gi = [], 0, 0
    for num_groups in chunk_sizes:
        if num_groups == 0:
            continue
        size = sum(group_sizes[gi : gi + num_groups])
        idx = order[pos : pos + size]
        kept.append(idx[nms(b[idx] + (groups[idx].to(b) * span)[:, None], scores[idx].double(), iou)])
        pos, gi = pos + size, gi + num_groups
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


_NMS_CHUNK = (4000, 20000)  # boxes per NMS call on (CPU, GPU), as torchvision's batched_nms thresholds


def rank_within_groups(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Position of each element inside its group, in the given order (0 = first).

    ``groups`` [N] is listed in priority order (e.g. NMS output, score-descending); the
    result [N] lets ``rank < k`` keep the first k of every group without a loop.
    """
    n = groups.numel()
    order = torch.argsort(groups, stable=True)  # [N] group-major, priority kept inside
    counts = torch.bincount(groups, minlength=num_groups)  # [G]
    starts = torch.cumsum(counts, 0) - counts  # [G]
    rank_sorted = torch.arange(n, device=groups.device) - starts[groups[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def select_topk(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_idx: torch.Tensor,
    num_images: int,
    k: int,
    nms_thresh: float,
    score_thresh: float = 0.0,
    min_box: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic NMS per image, then the top ``k`` per image by score.

    boxes [N, 4] (pixels), scores [N], image_idx [N] -> (kept indices [M] into the
    inputs, grouped by image and score-descending inside an image; slot [M] = rank 0..k-1).
    Boxes with score <= score_thresh or a side < min_box are dropped first.
    """
    wh = boxes[:, 2:] - boxes[:, :2]  # [N, 2]
    valid = (scores > score_thresh) & (wh >= min_box).all(dim=1)
    cand = torch.nonzero(valid).squeeze(1)  # [N']
    keep = cand[batched_nms(boxes[cand], scores[cand], image_idx[cand], nms_thresh)]  # score-desc
    rank = rank_within_groups(image_idx[keep], num_images)
    sel = rank < k
    keep, rank = keep[sel], rank[sel]
    order = torch.argsort(image_idx[keep], stable=True)  # image-major, then rank (keep is score-desc)
    return keep[order], rank[order]


def pad_to_k(values: torch.Tensor, image_idx: torch.Tensor, slot: torch.Tensor, num_images: int, k: int,
             fill: float = 0) -> torch.Tensor:
    """Scatter rows ``values`` [M, ...] to ``[num_images, k, ...]`` at (image, slot); the rest ``fill``."""
    out = values.new_full((num_images, k) + tuple(values.shape[1:]), fill)
    out[image_idx, slot] = values
    return out


def _split_by_image(boxes: torch.Tensor, image_idx: torch.Tensor, num_images: int) -> list[torch.Tensor]:
    """Boxes [M, 4] grouped by image (already image-major) -> list of num_images tensors (views)."""
    counts = torch.bincount(image_idx, minlength=num_images)
    return list(boxes.split(counts.tolist()))


# ----------------------------------------------------------------- extractor
class RegionExtractor:
    """Frozen Faster R-CNN regions; ``extractor(frames uint8 [B,T,3,H,W]) -> dict``.

    Returns ``region_feats`` float32 [B,T,K,1024], ``region_boxes`` float32 [B,T,K,4]
    (x1,y1,x2,y2 normalised to [0,1] by the frame size), ``region_mask`` bool [B,T,K]
    (True = a real box; padded slots are zero), ``region_labels`` int64 [B,T,K]
    (0 on padding) and ``region_scores`` float32 [B,T,K].
    """

    def __init__(
        self,
        detector: nn.Module,
        num_regions: int = 30,
        nms_thresh: float = 0.5,
        score_thresh: float = 0.0,
        autocast: str = "bf16",
        channels_last: bool = True,
        arch: str = "",
        weights: str = "",
    ) -> None:
        self.detector = detector
        self.num_regions = int(num_regions)
        self.nms_thresh = float(nms_thresh)
        self.score_thresh = float(score_thresh)
        self.autocast = autocast
        self.channels_last = channels_last
        self.arch = arch
        self.weights = weights  # a reference (name or path); the weights are never checkpointed
        self.device = torch.device("cpu")
        self._anchors: dict[tuple, torch.Tensor] = {}
        self._freeze()

    # -- frozen for real
    def _freeze(self) -> None:
        self.detector.eval()
        for p in self.detector.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "RegionExtractor":
        """No-op: the extractor stays in eval mode whatever the surrounding model does."""
        self.detector.eval()
        return self

    def eval(self) -> "RegionExtractor":
        return self.train(False)

    def to(self, device: torch.device | str) -> "RegionExtractor":
        self.device = torch.device(device)
        self.detector.to(self.device)
        if self.device.type == "cuda" and self.channels_last:
            self.detector.to(memory_format=torch.channels_last)
        self._anchors.clear()
        return self

    @property
    def feature_dim(self) -> int:
        return int(self.detector.roi_heads.box_predictor.cls_score.in_features)

    def config(self) -> dict[str, Any]:
        """What a checkpoint stores instead of the weights."""
        return {"arch": self.arch, "weights": self.weights, "num_regions": self.num_regions,
                "nms_thresh": self.nms_thresh, "score_thresh": self.score_thresh}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda" or self.autocast == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    # -- stages
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 [N,3,H,W] -> normalised, resized, padded float [N,3,H',W'] and the resized (h, w).

        Matches ``GeneralizedRCNNTransform`` (same scale rule and interpolate call) for
        frames that share one size, done as one batched op.
        """
        t = self.detector.transform
        x = images.to(self.device, non_blocking=True).float().div_(255.0)  # [N,3,H,W]
        mean = torch.as_tensor(t.image_mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.as_tensor(t.image_std, dtype=x.dtype, device=x.device)[None, :, None, None]
        x = (x - mean) / std
        h, w = x.shape[-2:]
        scale = min(t.min_size[-1] / min(h, w), t.max_size / max(h, w))  # as torchvision's resize
        x = F.interpolate(x, size=None, scale_factor=scale, mode="bilinear",
                          recompute_scale_factor=True, align_corners=False)
        rh, rw = x.shape[-2:]
        d = t.size_divisible
        ph, pw = -(-rh // d) * d, -(-rw // d) * d
        x = F.pad(x, (0, pw - rw, 0, ph - rh))  # [N,3,ph,pw], zero pad right/bottom
        if self.device.type == "cuda" and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (int(rh), int(rw))

    def _anchors_for(self, x: torch.Tensor, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Anchors [A, 4] of one image; the same for every frame of the batch (cached by shape)."""
        from torchvision.models.detection.image_list import ImageList

        key = (tuple(x.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feats), x.device)
        if key not in self._anchors:
            self._anchors[key] = self.detector.rpn.anchor_generator(ImageList(x[:1], [size]), feats)[0]
        return self._anchors[key]

    def proposals(self, x: torch.Tensor, feats: dict[str, torch.Tensor], size: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """RPN proposals of all frames -> (boxes [P, 4] image-major, image index [P])."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.detector.rpn
        n = x.shape[0]
        levels = list(feats.values())
        objectness, deltas = rpn.head(levels)  # lists per level: [N, A, h, w], [N, 4A, h, w]
        per_level = [o[0].numel() for o in objectness]
        anchors = self._anchors_for(x, levels, size)  # [A_tot, 4]
        obj, dlt = concat_box_prediction_layers(objectness, deltas)  # [N*A_tot, 1], [N*A_tot, 4]
        obj, dlt = obj.float(), dlt.float()
        boxes = rpn.box_coder.decode_single(dlt, anchors.float().repeat(n, 1)).view(n, -1, 4)  # [N, A_tot, 4]
        obj = obj.view(n, -1)  # [N, A_tot]

        top = rpn._get_top_n_idx(obj, per_level)  # [N, S] top-n per level
        lvl = torch.cat([torch.full((c,), i, device=x.device, dtype=torch.int64) for i, c in enumerate(per_level)])
        rows = torch.arange(n, device=x.device)[:, None]
        boxes, obj, lvl = boxes[rows, top], obj[rows, top], lvl[top]  # [N, S, 4], [N, S], [N, S]
        prob = torch.sigmoid(obj)
        h, w = size
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = (wh >= rpn.min_size).all(-1) & (prob >= rpn.score_thresh)  # [N, S]
        img = rows.expand_as(ok)[ok]  # [P']
        num_levels = len(per_level)
        keep = batched_nms(boxes[ok], prob[ok], img * num_levels + lvl[ok], rpn.nms_thresh)
        img_k = img[keep]
        rank = rank_within_groups(img_k, n)
        sel = rank < rpn.post_nms_top_n()
        keep, img_k, rank = keep[sel], img_k[sel], rank[sel]
        order = torch.argsort(img_k, stable=True)  # image-major, score-descending inside
        return boxes[ok][keep[order]], img_k[order]

    def box_features(self, feats: dict[str, torch.Tensor], boxes: torch.Tensor, image_idx: torch.Tensor,
                     n: int, size: tuple[int, int]) -> torch.Tensor:
        """Box-head RoI features [M, 1024] of image-major boxes [M, 4]."""
        roi = self.detector.roi_heads
        pooled = roi.box_roi_pool(feats, _split_by_image(boxes, image_idx, n), [size] * n)  # [M, C, 7, 7]
        return roi.box_head(pooled)

    def regions(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Preprocessed frames [N,3,H',W'] -> regions padded to K per frame (see class doc)."""
        n, k = x.shape[0], self.num_regions
        roi = self.detector.roi_heads
        feats = self.detector.backbone(x)  # dict of [N, C, h, w]
        props, pimg = self.proposals(x, feats, size)  # [P, 4], [P]

        rep = self.box_features(feats, props, pimg, n, size)  # [P, 1024]
        logits, reg = roi.box_predictor(rep)  # [P, C], [P, 4C]
        prob = F.softmax(logits.float(), -1)
        conf, cls = prob[:, 1:].max(-1)  # [P]: confidence = max non-background probability
        label = cls + 1
        num_classes = logits.shape[-1]
        deltas = reg.float().view(reg.shape[0], num_classes, 4)[torch.arange(reg.shape[0], device=reg.device), label]
        boxes = roi.box_coder.decode_single(deltas, props)  # [P, 4] the box regressed for that class
        h, w = size
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=-1)

        keep, slot = select_topk(boxes, conf, pimg, n, k, self.nms_thresh, self.score_thresh)
        fb, fimg = boxes[keep], pimg[keep]  # [M, 4], [M]
        ffeat = self.box_features(feats, fb, fimg, n, size).float()  # [M, 1024] features of the FINAL boxes
        norm = torch.tensor([w, h, w, h], dtype=fb.dtype, device=fb.device)
        return {
            "region_feats": pad_to_k(ffeat, fimg, slot, n, k),  # [N, K, 1024]
            "region_boxes": pad_to_k((fb / norm).clamp_(0, 1), fimg, slot, n, k),  # [N, K, 4]
            "region_mask": pad_to_k(torch.ones_like(fimg, dtype=torch.bool), fimg, slot, n, k, False),
            "region_labels": pad_to_k(label[keep], fimg, slot, n, k),  # [N, K]
            "region_scores": pad_to_k(conf[keep], fimg, slot, n, k),  # [N, K]
        }

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames uint8 [B,T,3,H,W] (or [N,3,H,W]) -> region dict with leading [B,T] (or [N])."""
        if frames.dtype != torch.uint8:
            raise UserError(f"region extractor expects uint8 frames, got {frames.dtype}")
        lead = frames.shape[:-3]
        flat = frames.reshape(-1, *frames.shape[-3:])  # [N,3,H,W]
        if self.detector.training:  # someone called .train() on the detector itself
            self.detector.eval()
        with torch.inference_mode(), self._autocast():
            x, size = self.preprocess(flat)
            out = self.regions(x, size)
        # leave inference mode: the trainable region transformer must be able to save these for backward
        return {key: v.clone().reshape(*lead, *v.shape[1:]) for key, v in out.items()}

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Batch transform: adds the region keys when the batch has ``frames`` and no ``region_feats``."""
        if "region_feats" in batch or "frames" not in batch:
            return batch
        out = dict(batch)
        out.update(self(batch["frames"]))
        return out


def build_extractor(cfg: Any) -> RegionExtractor:
    """The frozen extractor for ``cfg.model.detector`` (not an nn.Module; call ``.to(device)``)."""
    from regionvlp.regions.detector import build_detector, detector_kwargs

    d = cfg.model.detector
    det = build_detector(d.arch, d.weights, **detector_kwargs(d))
    return RegionExtractor(det, num_regions=d.num_regions, nms_thresh=d.nms_thresh,
                           score_thresh=d.score_thresh, autocast=d.autocast,
                           channels_last=d.channels_last, arch=d.arch, weights=str(d.weights))
