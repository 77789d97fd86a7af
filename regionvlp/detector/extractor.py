"""The frozen region extractor: frames -> exactly K detector regions per frame.

One batched pass over all B*T frames with fixed-size tensors throughout: resize +
normalise -> backbone -> RPN head -> per frame and FPN level the top-n anchors ->
exact NMS per (frame, level) -> the best ``post_nms_top_n`` proposals per frame (padded,
with a validity mask) -> box head on the proposals -> selection of K boxes per frame ->
box-head RoI features of the final boxes -> pad + mask to K.

Two selection rules (``model.detector.selection``):

- ``region`` (default): per proposal the max non-background class probability and the
  box regressed for that class, then class-agnostic NMS and the top K by that score:
  one box per object, the bottom-up-attention style of picking region features
  (Anderson et al. 2018; the features DemoVLP and peers were trained on);
- ``stock``: torchvision's ``RoIHeads.postprocess_detections`` exactly: every
  (proposal, class) pair is a candidate, per-class NMS, the top K detections: what
  ``model(images)`` returns with ``box_score_thresh`` = ``score_thresh`` and
  ``box_detections_per_img`` = K (several labels may sit on one object).

The RPN stage is the stock one (same top-n per level, clipping, min size, NMS per level,
post-NMS top-n). NMS is :func:`regionvlp.detector.select.cluster_nms` (exact greedy NMS as
batched matrix work); RoIAlign gets each FPN level converted to contiguous fp32 once per
call, and RoIs are grouped by level after one read of the per-level counts. Host syncs
per call: one NMS convergence read per NMS stage, one level-count read per RoI stage (4);
``stock`` adds a read when its candidate window might have cut a frame short (rare).

The extractor is *not* an ``nn.Module``: a model can hold a reference to it without
it becoming a child, so optimizers, DeepSpeed and checkpoints never see its weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regionvlp.detector.detector import build_detector, detector_kwargs
from regionvlp.detector.select import cluster_nms, host_ints, top_kept
from regionvlp.errors import UserError
from regionvlp.hub import apply_offline
from regionvlp.runtime import get_autocast


REGION_KEYS = ("region_feats", "region_boxes", "region_mask", "region_labels", "region_scores")
MIN_BOX = 1e-2  # final boxes thinner than this are dropped, as torchvision's postprocess_detections


def big_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """[..., 4] -> [...] bool: both sides >= min_size, ``torchvision.ops.remove_small_boxes``'s
    rule as a mask: that function returns the kept indices of [N, 4] boxes (a ``nonzero``,
    a host sync per call, and varying shapes), where the extractor keeps fixed shapes."""
    return ((boxes[..., 2:] - boxes[..., :2]) >= min_size).all(dim=-1)


def gather_rows(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values [G, n, ...] picked per row by idx [G, k] -> [G, k, ...]."""
    view = idx.reshape(*idx.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, view.expand(*idx.shape, *values.shape[2:]))


# ----------------------------------------------------------------- extractor
class Layout:
    """Per input shape: fp32 anchors of one frame [A, 4], the RPN's top-n per level and
    the padded (level, slot) -> candidate map, and the RoIAlign scales of the levels."""

    def __init__(self, ex: "RegionExtractor", x: torch.Tensor, levels: list[torch.Tensor],
                 size: tuple[int, int], per_level: list[int]) -> None:
        from torchvision.models.detection.image_list import ImageList

        rpn, pool = ex.detector.rpn, ex.detector.roi_heads.box_roi_pool
        dev = x.device
        stand_ins = [torch.empty((1, 1, *f.shape[-2:]), dtype=torch.float32, device=dev) for f in levels]
        self.anchors = rpn.anchor_generator(ImageList(x[:1].float(), [size]), stand_ins)[0].float()  # [A, 4]
        self.per_level = per_level  # anchors per level
        self.top_n = [min(int(rpn.pre_nms_top_n()), c) for c in self.per_level]
        width = max(self.top_n)
        slots = torch.zeros(len(levels), width, dtype=torch.int64)  # [L, n] index into the top-n list
        real = torch.zeros(len(levels), width, dtype=torch.bool)
        offset = 0
        for lvl, n in enumerate(self.top_n):
            slots[lvl, :n] = torch.arange(offset, offset + n)
            real[lvl, :n] = True
            offset += n
        self.slots, self.real = slots.to(dev), real.to(dev)
        # RoIAlign levels and scales, as torchvision's MultiScaleRoIAlign infers them
        names = list(pool.featmap_names)
        self.pool_levels = [i for i, name in enumerate(ex.level_names) if name in names]
        self.scales = [2.0 ** round(math.log2(levels[i].shape[-2] / size[0])) for i in self.pool_levels]
        self.k_min, self.k_max = int(-math.log2(self.scales[0])), int(-math.log2(self.scales[-1]))
        self.canonical = (pool.canonical_scale, pool.canonical_level)
        self.output_size, self.sampling_ratio = tuple(pool.output_size), int(pool.sampling_ratio)


class RegionExtractor:
    """Frozen Faster R-CNN regions; ``extractor(frames uint8 [B,T,3,H,W]) -> dict``.

    Returns ``region_feats`` float32 [B,T,K,1024], ``region_boxes`` float32 [B,T,K,4]
    (x1,y1,x2,y2 normalised to [0,1] by the frame size), ``region_mask`` bool [B,T,K]
    (True = a real box; padded slots are zero), ``region_labels`` int64 [B,T,K]
    (0 on padding) and ``region_scores`` float32 [B,T,K].
    """

    def __init__(self, detector: nn.Module, num_regions: int = 30, nms_thresh: float = 0.5,
                 score_thresh: float = 0.0, autocast: str = "bf16", channels_last: bool = True,
                 arch: str = "", weights: str = "", selection: str = "region") -> None:
        self.detector = detector
        self.num_regions = int(num_regions)
        self.nms_thresh = float(nms_thresh)
        self.score_thresh = float(score_thresh)
        self.selection = selection
        self.autocast = autocast
        self.channels_last = channels_last
        self.arch = arch
        self.weights = weights  # a reference (name or path); the weights are never checkpointed
        self.device = torch.device("cpu")
        self.level_names: list[str] = []
        self._layouts: dict[tuple, Layout] = {}
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
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
        self._layouts.clear()
        self._norm = None
        return self

    @property
    def feature_dim(self) -> int:
        return int(self.detector.roi_heads.box_predictor.cls_score.in_features)

    def config(self) -> dict[str, Any]:
        """What a checkpoint stores instead of the weights."""
        return {"arch": self.arch, "weights": self.weights, "num_regions": self.num_regions,
                "nms_thresh": self.nms_thresh, "score_thresh": self.score_thresh, "selection": self.selection}

    # -- stages
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 [N,3,H,W] -> normalised, resized, padded float [N,3,H',W'] and the resized (h, w).

        Matches ``GeneralizedRCNNTransform`` (same scale rule and interpolate call) for
        frames that share one size, done as one batched op.
        """
        t = self.detector.transform
        if self._norm is None:  # mean/std on the device once, not a host->device copy per call
            self._norm = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
                               for v in (t.image_mean, t.image_std))
        x = images.to(self.device, non_blocking=True).float().div_(255.0)  # [N,3,H,W]
        x = (x - self._norm[0]) / self._norm[1]
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

    def layout(self, x: torch.Tensor, levels: list[torch.Tensor], size: tuple[int, int],
               per_level: list[int]) -> Layout:
        key = (tuple(x.shape[-2:]), size, tuple(tuple(f.shape[-2:]) for f in levels), x.device)
        if key not in self._layouts:
            self._layouts[key] = Layout(self, x, levels, size, per_level)
        return self._layouts[key]

    def proposals(self, x: torch.Tensor, feats: dict[str, torch.Tensor], size: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        """RPN proposals of all frames: (boxes [N, P, 4] fp32, valid [N, P], layout), the
        stock RPN's filtering done per (frame, level) row at once."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers
        from torchvision.ops import clip_boxes_to_image

        rpn, n = self.detector.rpn, x.shape[0]
        self.level_names = list(feats.keys())
        levels = list(feats.values())
        objectness, deltas = rpn.head(levels)  # lists per level: [N, A, h, w], [N, 4A, h, w]
        lay = self.layout(x, levels, size, [int(o[0].numel()) for o in objectness])
        obj, dlt = concat_box_prediction_layers(objectness, deltas)  # [N*A_tot, 1], [N*A_tot, 4]
        obj, dlt = obj.float().view(n, -1), dlt.float().view(n, -1, 4)  # [N, A_tot], [N, A_tot, 4]
        top, offset = [], 0
        for count, k in zip(lay.per_level, lay.top_n):  # top-n anchors per level, as the stock RPN
            top.append(obj[:, offset:offset + count].topk(k, dim=1).indices + offset)
            offset += count
        top = torch.cat(top, dim=1)  # [N, S]
        boxes = rpn.box_coder.decode_single(gather_rows(dlt, top).reshape(-1, 4), lay.anchors[top].reshape(-1, 4))
        boxes = clip_boxes_to_image(boxes.view(n, -1, 4), size)  # [N, S, 4]
        prob = torch.sigmoid(obj.gather(1, top))  # [N, S]
        ok = big_enough(boxes, rpn.min_size) & (prob >= rpn.score_thresh)
        num_levels, width = lay.slots.shape
        b, p = boxes[:, lay.slots], prob[:, lay.slots]  # [N, L, n, 4], [N, L, n]: one row per (frame, level)
        v = ok[:, lay.slots] & lay.real
        kept = cluster_nms(b.view(-1, width, 4), p.view(-1, width), v.view(-1, width), rpn.nms_thresh)
        idx, real = top_kept(p.view(n, -1), kept.view(n, -1), rpn.post_nms_top_n())  # [N, P]
        return gather_rows(b.view(n, -1, 4), idx), real, lay

    def roi_features(self, levels32: list[torch.Tensor], lay: Layout, boxes: torch.Tensor,
                     extra: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Box-head features [N*M, 1024] of boxes [N, M, 4] (frame pixels), RoIs grouped by
        FPN level as torchvision's ``MultiScaleRoIAlign`` assigns them (one host read of
        the per-level counts, with ``extra`` read alongside and returned)."""
        from torchvision.ops import roi_align

        n, m = boxes.shape[:2]
        flat = boxes.reshape(-1, 4).float()  # [R, 4]
        frame = torch.arange(n, device=boxes.device, dtype=flat.dtype).repeat_interleave(m)  # [R]
        s0, lvl0 = lay.canonical
        area = ((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])).sqrt()
        lvl = torch.floor(lvl0 + torch.log2(area / s0) + 1e-6).clamp(lay.k_min, lay.k_max).long() - lay.k_min
        num = len(levels32)
        counts = (lvl[None] == torch.arange(num, device=lvl.device)[:, None]).sum(1)  # [L]
        read = host_ints(counts if extra is None else torch.cat([counts, extra.reshape(-1).long()]))
        order = torch.argsort(lvl, stable=True)  # [R] level-major
        rois = torch.cat([frame[:, None], flat], dim=1)[order]  # [R, 5]
        pooled = [roi_align(f, r, lay.output_size, spatial_scale=sc, sampling_ratio=lay.sampling_ratio)
                  for f, r, sc in zip(levels32, rois.split(read[:num]), lay.scales)]
        out = torch.empty((rois.shape[0], *pooled[0].shape[1:]), dtype=pooled[0].dtype, device=rois.device)
        out[order] = torch.cat(pooled)  # [R, C, 7, 7] back in box order
        return self.detector.roi_heads.box_head(out), read[num:]

    def _class_scores(self, rep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, reg = self.detector.roi_heads.box_predictor(rep)  # [N*P, C], [N*P, 4C]
        c = logits.shape[-1]
        return F.softmax(logits.float(), -1).view(n, -1, c), reg.float().view(n, -1, c, 4)

    def select_region(self, prob: torch.Tensor, reg: torch.Tensor, props: torch.Tensor, pvalid: torch.Tensor,
                      size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """``region`` rule: max non-background class per proposal, class-agnostic NMS, top K.
        -> boxes [N, K', 4], scores [N, K'], labels [N, K'], real [N, K']."""
        from torchvision.ops import clip_boxes_to_image

        n, p = pvalid.shape
        conf, cls = prob[..., 1:].max(-1)  # [N, P]
        label = cls + 1
        deltas = reg.gather(2, label[..., None, None].expand(n, p, 1, 4)).squeeze(2)  # [N, P, 4]
        coder = self.detector.roi_heads.box_coder
        boxes = clip_boxes_to_image(coder.decode_single(deltas.reshape(-1, 4), props.reshape(-1, 4)).view(n, p, 4), size)
        valid = pvalid & (conf > self.score_thresh) & big_enough(boxes, MIN_BOX)
        kept = cluster_nms(boxes, conf, valid, self.nms_thresh)
        idx, real = top_kept(conf, kept, self.num_regions)
        return gather_rows(boxes, idx), gather_rows(conf, idx), gather_rows(label, idx), real

    def select_stock(self, prob: torch.Tensor, reg: torch.Tensor, props: torch.Tensor, pvalid: torch.Tensor,
                     size: tuple[int, int], window: int) -> tuple[torch.Tensor, ...]:
        """``stock`` rule (``postprocess_detections``): every (proposal, class) candidate, per-class
        NMS, top K, among each frame's ``window`` best candidates. Returns the ``region`` outputs
        plus ``short`` [] bool: some frame kept < K while it had more candidates than the window."""
        from torchvision.ops import clip_boxes_to_image

        n, p, c = prob.shape
        coder = self.detector.roi_heads.box_coder
        boxes = coder.decode_single(reg.reshape(n * p, -1), props.reshape(-1, 4)).view(n, p, c, 4)
        boxes = clip_boxes_to_image(boxes[:, :, 1:], size).reshape(n, -1, 4)  # [N, P*(C-1), 4]
        scores = prob[..., 1:].reshape(n, -1)  # [N, P*(C-1)]
        labels = torch.arange(1, c, device=prob.device).repeat(p)[None].expand(n, -1)
        valid = (pvalid[..., None].expand(n, p, c - 1).reshape(n, -1) & (scores > self.score_thresh)
                 & big_enough(boxes, MIN_BOX))
        window = min(window, scores.shape[1])
        cand, _ = top_kept(scores, valid, window)  # [N, W] the best candidates
        b, s, lab, v = (gather_rows(t, cand) for t in (boxes, scores, labels, valid))
        kept = cluster_nms(b, s, v, self.nms_thresh, labels=lab)
        idx, real = top_kept(s, kept, self.num_regions)
        short = ((real.sum(1) < self.num_regions) & (valid.sum(1) > window)).any()
        return gather_rows(b, idx), gather_rows(s, idx), gather_rows(lab, idx), real, short

    def regions(self, x: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Preprocessed frames [N,3,H',W'] -> regions padded to K per frame (see class doc)."""
        n, k = x.shape[0], self.num_regions
        feats = self.detector.backbone(x)  # dict of [N, C, h, w]
        props, pvalid, lay = self.proposals(x, feats, size)  # [N, P, 4], [N, P]
        # RoIAlign input: each pooled level as contiguous fp32, once for both RoI stages
        levels32 = [feats[self.level_names[i]].float().contiguous() for i in lay.pool_levels]
        rep, _ = self.roi_features(levels32, lay, props)
        prob, reg = self._class_scores(rep, n)  # [N, P, C], [N, P, C, 4]
        window = 8 * k
        while True:
            if self.selection == "stock":
                fb, score, label, real, short = self.select_stock(prob, reg, props, pvalid, size, window)
            else:
                (fb, score, label, real), short = self.select_region(prob, reg, props, pvalid, size), None
            ffeat, flag = self.roi_features(levels32, lay, fb, extra=short)  # features of the FINAL boxes
            if not flag or not flag[0]:
                break
            window *= 4  # rare: a frame ran out of candidates inside the window; widen it (exact result)
        h, w = size
        m = real[..., None]
        norm = torch.stack([fb[..., 0] / w, fb[..., 1] / h, fb[..., 2] / w, fb[..., 3] / h], -1).clamp_(0, 1)
        out = {
            "region_feats": ffeat.float().view(n, -1, ffeat.shape[-1]) * m,  # [N, K', 1024]
            "region_boxes": norm * m,  # [N, K', 4]
            "region_mask": real,
            "region_labels": label * real,
            "region_scores": score * real,
        }
        return {key: pad_slots(v, k) for key, v in out.items()}

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames uint8 [B,T,3,H,W] (or [N,3,H,W]) -> region dict with leading [B,T] (or [N])."""
        if frames.dtype != torch.uint8:
            raise UserError(f"region extractor expects uint8 frames, got {frames.dtype}")
        lead = frames.shape[:-3]
        flat = frames.reshape(-1, *frames.shape[-3:])  # [N,3,H,W]
        if self.detector.training:  # someone called .train() on the detector itself
            self.detector.eval()
        with torch.inference_mode(), get_autocast(self.autocast if self.device.type == "cuda" else None,
                                                  self.device.type)():
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


def pad_slots(values: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K', ...] -> [N, k, ...], zero (False) filled when K' < k (fewer proposals than K)."""
    missing = k - values.shape[1]
    if missing <= 0:
        return values
    return torch.cat([values, values.new_zeros((values.shape[0], missing, *values.shape[2:]))], dim=1)


def build_extractor(cfg: Any) -> RegionExtractor:
    """The frozen extractor for ``cfg.model.detector`` (not an nn.Module; call ``.to(device)``)."""
    d = cfg.model.detector
    apply_offline(cfg)  # run.offline: pretrained detector weights only from the cache
    det = build_detector(d.arch, d.weights, **detector_kwargs(d, size=int(cfg.data.size)))
    return RegionExtractor(det, num_regions=d.num_regions, nms_thresh=d.nms_thresh,
                           score_thresh=d.score_thresh, autocast=d.autocast, selection=str(d.selection),
                           channels_last=d.channels_last, arch=d.arch, weights=str(d.weights))
