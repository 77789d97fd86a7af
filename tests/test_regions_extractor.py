"""The frozen region extractor: top-K/padding semantics, normalisation, equality with a
straightforward per-image reference built from stock torchvision calls, and frozenness."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, boxes as box_ops, nms

from regionvlp.detector.detector import build_detector
from regionvlp.detector.extractor import RegionExtractor
from regionvlp.detector.select import cluster_nms, top_kept


def _frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 frames [n,3,h,w] (blobs rather than white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, h // 8, w // 8, generator=g)
    return (F.interpolate(low, size=(h, w), mode="bilinear") * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def tiny_detector():
    torch.manual_seed(0)
    return build_detector("fasterrcnn_tiny", "none", min_size=64, max_size=96,
                          rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=100)


# ------------------------------------------------------------ top-K semantics
def test_cluster_nms_top_kept_padding_and_empty_frames():
    n = 42
    boxes = torch.zeros(4, n, 4)
    scores = torch.zeros(4, n)
    valid = torch.zeros(4, n, dtype=torch.bool)
    # frame 0: two heavily overlapping boxes + one apart -> NMS keeps 2
    boxes[0, :3] = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=torch.float)
    scores[0, :3] = torch.tensor([0.9, 0.8, 0.3])
    valid[0, :3] = True
    # frame 1: nothing at all; frame 2: only invalid boxes
    boxes[2, :2] = torch.tensor([[0, 0, 5, 5], [3, 3, 3, 9]], dtype=torch.float)
    scores[2, :2] = torch.tensor([0.0, 0.7])
    # frame 3: 40 disjoint boxes, shuffled scores -> the best 30
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    for i in range(40):
        boxes[3, i] = torch.tensor([i * 20, 0, i * 20 + 10, 10], dtype=torch.float)
        scores[3, i] = float(perm[i]) / 40 + 0.01
    valid[3, :40] = True

    kept = cluster_nms(boxes, scores, valid, 0.5)
    idx, real = top_kept(scores, kept, 30)
    out_scores = scores.gather(1, idx) * real
    assert real.sum(1).tolist() == [2, 0, 0, 30]
    assert torch.equal(out_scores[0, :2], torch.tensor([0.9, 0.3]))
    assert torch.equal(out_scores[3], torch.sort(scores[3, :40], descending=True).values[:30])
    assert real[0, :2].all() and not real[0, 2:].any()  # real slots first, padding after


@pytest.mark.parametrize("stage", ["final_score", "no_proposal"])
def test_nothing_survives_gives_all_false_mask_and_zeros(tiny_detector, stage, monkeypatch):
    if stage == "no_proposal":  # the RPN keeps nothing: empty box head input
        monkeypatch.setattr(tiny_detector.rpn, "score_thresh", 1.5)
    ex = RegionExtractor(tiny_detector, num_regions=5, score_thresh=1.0 if stage == "final_score" else 0.0)
    out = ex(_frames(4, 64, 64).view(2, 2, 3, 64, 64))
    assert out["region_feats"].shape == (2, 2, 5, 1024)
    assert out["region_boxes"].shape == (2, 2, 5, 4)
    assert out["region_mask"].shape == (2, 2, 5) and out["region_mask"].dtype == torch.bool
    assert not out["region_mask"].any()
    assert (out["region_feats"] == 0).all() and (out["region_boxes"] == 0).all()
    assert (out["region_labels"] == 0).all() and (out["region_scores"] == 0).all()


# ----------------------------------------------- equality with a reference
def reference_regions(det, frames: torch.Tensor, k: int, nms_thresh: float) -> list[dict]:
    """Straightforward per-image version from stock torchvision pieces (transform, rpn)."""
    det.eval()
    roi = det.roi_heads
    out = []
    with torch.no_grad():
        images = [f.float() / 255 for f in frames]
        il, _ = det.transform(images)
        feats = det.backbone(il.tensors)
        props, _ = det.rpn(il, feats)  # stock per-image proposal filtering
        for i, size in enumerate(il.image_sizes):
            fi = OrderedDict((name, v[i : i + 1]) for name, v in feats.items())
            logits, reg = roi.box_predictor(roi.box_head(roi.box_roi_pool(fi, [props[i]], [size])))
            prob = F.softmax(logits, -1)
            all_boxes = box_ops.clip_boxes_to_image(roi.box_coder.decode(reg, [props[i]]), size)  # [P, C, 4]
            boxes, scores, labels = [], [], []
            for j in range(prob.shape[0]):  # one proposal at a time
                c = int(prob[j, 1:].argmax()) + 1
                boxes.append(all_boxes[j, c])
                scores.append(prob[j, c])
                labels.append(c)
            boxes, scores, labels = torch.stack(boxes), torch.stack(scores), torch.tensor(labels)
            ok = box_ops.remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            keep = nms(boxes, scores, nms_thresh)[:k]
            fb = boxes[keep]
            ffeat = roi.box_head(roi.box_roi_pool(fi, [fb], [size]))
            # back to original frame pixels as stock postprocess does, then normalise by the frame size
            h0, w0 = frames.shape[-2:]
            orig = det.transform.postprocess([{"boxes": fb}], [size], [(h0, w0)])[0]["boxes"]
            norm = orig / torch.tensor([w0, h0, w0, h0])
            out.append({"boxes": norm, "feats": ffeat, "scores": scores[keep], "labels": labels[keep]})
    return out


# (a random-init mobilenet gives the same box features for every RoI, so all its scores tie)
@pytest.mark.parametrize("arch,hw", [("fasterrcnn_tiny", (48, 80)), ("fasterrcnn_resnet50_fpn", (64, 64))])
def test_extractor_matches_reference(arch, hw, tiny_detector):
    torch.manual_seed(0)
    det = tiny_detector if arch == "fasterrcnn_tiny" else build_detector(arch, "none", min_size=64, max_size=64)
    k = 8
    frames = _frames(4, *hw, seed=3)  # 2 clips x 2 frames
    ex = RegionExtractor(det, num_regions=k, nms_thresh=0.5)
    out = ex(frames.view(2, 2, 3, *hw))
    ref = reference_regions(det, frames, k, 0.5)
    flat = {name: v.reshape(4, k, *v.shape[3:]) for name, v in out.items()}
    for i, r in enumerate(ref):
        n = r["boxes"].shape[0]
        assert int(flat["region_mask"][i].sum()) == n
        torch.testing.assert_close(flat["region_boxes"][i, :n], r["boxes"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(flat["region_scores"][i, :n], r["scores"], rtol=1e-4, atol=1e-6)
        assert torch.equal(flat["region_labels"][i, :n], r["labels"])
        torch.testing.assert_close(flat["region_feats"][i, :n], r["feats"], rtol=1e-4, atol=1e-4)
        b = flat["region_boxes"][i, :n]
        assert ((b >= 0) & (b <= 1)).all() and (b[:, 2:] >= b[:, :2]).all()
        # class-agnostic NMS really happened: kept boxes overlap less than the threshold
        iou = box_iou(b, b) - torch.eye(n)
        assert (iou <= 0.5 + 1e-6).all()


@pytest.mark.parametrize("arch,hw", [("fasterrcnn_tiny", (48, 80)), ("fasterrcnn_resnet50_fpn", (64, 64))])
def test_stock_selection_equals_torchvision_model_call(arch, hw, tiny_detector):
    """selection=stock gives what the detector's own ``model(images)`` returns with
    ``box_score_thresh=0`` and ``box_detections_per_img=K``: boxes, labels, scores, order."""
    torch.manual_seed(0)
    det = tiny_detector if arch == "fasterrcnn_tiny" else build_detector(arch, "none", min_size=64, max_size=64)
    k = 10
    saved = det.roi_heads.score_thresh, det.roi_heads.detections_per_img
    det.roi_heads.score_thresh, det.roi_heads.detections_per_img = 0.0, k
    try:
        frames = _frames(3, *hw, seed=4)
        with torch.no_grad():
            stock = det.eval()([f.float() / 255 for f in frames])
        out = RegionExtractor(det, num_regions=k, selection="stock")(frames)
    finally:
        det.roi_heads.score_thresh, det.roi_heads.detections_per_img = saved
    h0, w0 = hw
    labels_seen = set()
    for i, ref in enumerate(stock):
        n = ref["boxes"].shape[0]
        assert n == k and int(out["region_mask"][i].sum()) == n
        boxes = out["region_boxes"][i, :n] * torch.tensor([w0, h0, w0, h0])
        torch.testing.assert_close(boxes, ref["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out["region_scores"][i, :n], ref["scores"], rtol=1e-4, atol=1e-6)
        assert torch.equal(out["region_labels"][i, :n], ref["labels"])
        labels_seen |= set(ref["labels"].tolist())
    assert len(labels_seen) > 1


def test_extractor_makes_at_most_four_host_syncs(tiny_detector):
    from host_syncs import host_syncs

    from regionvlp.detector.select import HOST_SYNC

    frames = _frames(4, 64, 64, seed=2).view(2, 2, 3, 64, 64)
    for selection in ("region", "stock"):
        ex = RegionExtractor(tiny_detector, num_regions=6, selection=selection)
        ex(frames)  # first call builds the per-shape layout (anchors etc.)
        n, names = host_syncs(lambda: ex(frames), extra=(HOST_SYNC,))
        assert n <= 4, (selection, names)
        assert names[HOST_SYNC] == n, names  # no accidental sync (nonzero, item, bincount, torchvision nms)


def test_anchors_are_float32_under_bf16_autocast(tiny_detector):
    ex = RegionExtractor(tiny_detector, num_regions=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ex(_frames(2, 64, 64, seed=8))
    lay = next(iter(ex._layouts.values()))
    assert lay.anchors.dtype == torch.float32
    assert out["region_boxes"].dtype == torch.float32 and torch.isfinite(out["region_feats"]).all()


def test_boxes_normalised_by_original_frame_size(tiny_detector):
    """A 48x80 frame is resized to 57x96 (max_size 96) inside the detector; boxes come out in [0,1] of the frame."""
    ex = RegionExtractor(tiny_detector, num_regions=30)
    frames = _frames(2, 48, 80, seed=5)
    out = ex(frames)
    x, size = ex.preprocess(frames)
    assert size == (57, 96) and x.shape[-2:] == (64, 96)  # padded to a multiple of 32
    b = out["region_boxes"][out["region_mask"]]
    assert b.numel() > 0
    assert ((b >= 0) & (b <= 1)).all()
    assert b[:, 2].max() > 0.5  # spans the width of the frame, not the padded canvas
    assert b[:, 2].max() <= 1.0


# ------------------------------------------------------------------ frozen
def test_extractor_stays_frozen_and_outputs_are_trainable_inputs(tiny_detector):
    ex = RegionExtractor(tiny_detector, num_regions=4)
    frames = _frames(2, 64, 64, seed=7)
    first = ex(frames)
    ex.train()
    tiny_detector.train()  # even on the detector itself
    again = ex(frames)
    assert not tiny_detector.training
    assert all(not p.requires_grad for p in tiny_detector.parameters())
    assert torch.equal(first["region_feats"], again["region_feats"])
    # outputs are ordinary tensors: a trainable layer can use them in backward
    lin = torch.nn.Linear(1024, 3)
    lin(again["region_feats"]).sum().backward()
    assert lin.weight.grad is not None
    assert not isinstance(ex, torch.nn.Module)


@pytest.mark.parametrize("n,rows,labels", [(60, 3, False), (400, 5, False), (300, 2, True)])
def test_cluster_nms_keeps_exactly_what_torchvision_nms_keeps(n, rows, labels):
    from torchvision.ops import batched_nms as tv_batched_nms

    g = torch.Generator().manual_seed(n)
    xy = torch.rand(rows, n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(rows, n, 2, generator=g) * 30 + 1], -1)  # dense: long suppression chains
    scores = torch.rand(rows, n, generator=g)
    valid = torch.rand(rows, n, generator=g) > 0.1
    lab = torch.randint(1, 4, (rows, n), generator=g) if labels else torch.zeros(rows, n, dtype=torch.long)
    kept = cluster_nms(boxes, scores, valid, 0.5, labels=lab if labels else None, check_every=2)
    for r in range(rows):
        idx = valid[r].nonzero().squeeze(1)
        ref = idx[tv_batched_nms(boxes[r, idx], scores[r, idx], lab[r, idx], 0.5)]
        assert torch.equal(kept[r].nonzero().squeeze(1), torch.sort(ref).values)


def test_bench_regions_reports_variants_and_baseline(capsys):
    """Shape of the benchmark's JSON (the figures themselves live in docs/benchmarks.md)."""
    import json

    from regionvlp.cli import main

    assert main(["bench", "regions", "--arch", "fasterrcnn_tiny", "--size", "64", "--batch", "2",
                 "--iters", "1", "--warmup", "0", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["baseline"] == "stock" and res["dtype"] == "fp32" and res["device"].startswith("cpu")
    for variant in ("backbone", "extractor", "extractor_stock_rpn", "stock"):
        assert res[f"{variant}_per_s"] > 0
    assert res["rpn_tuned"] == {"pre_nms_top_n": 150, "post_nms_top_n": 100}
    assert res["size"] == 64 and res["batch"] == 2 and res["num_regions"] == 30
    assert 0.0 <= res["box_agreement"] <= 1.0 and res["selection"] == "region"
    assert res["box_agreement_stock_selection"] > 0.0  # same proposals' classes: mostly stock's boxes
    assert 0 < res["real_regions_per_frame"] <= 30


def test_box_agreement_counts_matches_at_iou_09():
    from regionvlp.bench.regions import box_agreement

    regions = {"region_boxes": torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0]]]),
               "region_mask": torch.tensor([[True, True, False]])}
    stock = [{"boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0], [60.0, 60.0, 100.0, 100.0]])}]
    assert box_agreement(regions, stock, 100) == 0.5  # the second box has IoU 0.64 with its nearest
