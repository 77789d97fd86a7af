"""Fixed-size box selection for the region extractor: NMS and top-k as batched tensor
work, one row per frame (or per frame x FPN level), no per-frame Python loop.

:func:`cluster_nms` computes exactly torchvision's greedy NMS (``torchvision.ops.nms``:
a box is dropped when a *kept* higher-scoring box overlaps it with IoU > threshold),
written as the fixed-point iteration of Cluster-NMS (Zheng et al., 2021): with the
boxes of a row sorted by score and ``S[i, j]`` = "i outranks and overlaps j",
``keep = valid & ~any_i(S[i, :] & keep[i])`` is applied until it stops changing. The
greedy result is the unique fixed point (box j only depends on boxes ranked above it),
so the answer is exact, not an approximation like Fast-NMS; the iterations are
``[G, n, n]`` tensor ops and convergence is read back once per ``check_every``
iterations (usually a single host read per call).

Host reads go through :func:`host_ints`, labelled ``regionvlp::host_sync`` for the
profiler, so a test can count every deliberate sync next to accidental ones.
"""

from __future__ import annotations

import torch


HOST_SYNC = "regionvlp::host_sync"  # profiler label of every deliberate device -> host read


def host_ints(t: torch.Tensor) -> list[int]:
    """One device -> host read of an integer/bool tensor, as a flat list of ints."""
    with torch.profiler.record_function(HOST_SYNC):
        return [int(v) for v in t.reshape(-1).cpu().tolist()]


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every pair inside each row: boxes [G, n, 4] (x1, y1, x2, y2) -> [G, n, n],
    computed as ``torchvision.ops.nms`` does (areas without the +1)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [G, n]
    lt = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])  # [G, n, n, 2]
    rb = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [G, n, n]
    return inter / (area[:, :, None] + area[:, None, :] - inter)


def cluster_nms(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou_thresh: float,
                labels: torch.Tensor | None = None, check_every: int = 8) -> torch.Tensor:
    """Greedy NMS inside each row: boxes [G, n, 4], scores [G, n], valid [G, n] bool,
    optional labels [G, n] (NMS only among equal labels, as ``batched_nms``) -> kept [G, n] bool.

    Invalid boxes are never kept and suppress nothing."""
    g, n = scores.shape
    if n == 0:
        return valid.clone()
    order = scores.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)  # [G, n]
    b = boxes.gather(1, order[..., None].expand(g, n, 4)).float()  # [G, n, 4] score-descending
    v = valid.gather(1, order)  # [G, n]
    above = torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(1)  # i ranks above j
    sup = (pairwise_iou(b) > iou_thresh) & above & v[:, :, None]  # [G, n, n] i may suppress j
    if labels is not None:
        lab = labels.gather(1, order)
        sup &= lab[:, :, None] == lab[:, None, :]
    keep = v
    while True:
        for _ in range(check_every):
            prev, keep = keep, v & ~(sup & keep[:, :, None]).any(dim=1)
        if not host_ints((keep != prev).any())[0]:  # a fixed point: the greedy answer
            break
    out = torch.zeros_like(keep)
    return out.scatter_(1, order, keep)  # back to the input order


def top_kept(scores: torch.Tensor, kept: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best kept entries of each row: scores/kept [G, n] -> (indices [G, k'], real [G, k'])
    with k' = min(k, n), score-descending, unreal slots after the real ones."""
    k = min(int(k), scores.shape[1])
    masked = scores.float().masked_fill(~kept, float("-inf"))  # [G, n]
    top, idx = masked.topk(k, dim=1)  # sorted descending
    return idx, top > float("-inf")
