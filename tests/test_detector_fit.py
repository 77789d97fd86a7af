"""`regionvlp detector fit`: box labels through resize + crop, box recall, a real (short)
fit on synth shards that learns and writes a checkpoint the frozen extractor loads."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from regionvlp.cli import main
from regionvlp.config import load_config
from regionvlp.errors import UserError
from regionvlp.detector.fit import box_recall, fit_detector, frame_boxes, load_frames, measure_recall

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("fitworld")
    return synth(out, videos=48, val_videos=8, seed=3, size=64, frames=4, workers=1, progress=False)


def _cfg(world: dict, *extra: str):
    return load_config(ROOT / "configs/tiny/detector.yaml", [
        f"data.train.urls=['{world['train']['urls']}']", f"data.val.urls=['{world['val']['urls']}']",
        "data.num_frames=4", "model.detector.num_regions=6", *extra])


def test_frame_boxes_follow_resize_and_centre_crop():
    # 200x100 video decoded to 50x50: scale 0.5 -> 100x50, centre crop drops 25 px left
    meta = {"width": 200, "height": 100, "labels": [2, 4],
            "boxes": [[[60, 10, 100, 50], [0, 0, 20, 20]], [[80, 20, 120, 60], [190, 80, 200, 100]]]}
    boxes, labels = frame_boxes(meta, [1, 0], 50)
    assert torch.allclose(boxes[0], torch.tensor([[15.0, 10.0, 35.0, 30.0]]))  # second object cropped away
    assert labels[0].tolist() == [2]
    assert torch.allclose(boxes[1], torch.tensor([[5.0, 5.0, 25.0, 25.0]]))
    assert labels[1].tolist() == [2]
    with pytest.raises(ValueError):
        frame_boxes({"width": 64, "height": 64, "labels": [1], "boxes": [[[0, 0, 5, 5], [1, 1, 6, 6]]]}, [0], 64)
    with pytest.raises(ValueError):
        frame_boxes({"caption": "no boxes"}, [0], 64)


def test_box_recall_counts_matches_at_iou_half():
    pred = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 1, 1]],
                         [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 0, 0]]], dtype=torch.float32)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    gt = [torch.tensor([[0, 0, 10, 12], [40, 40, 50, 50]], dtype=torch.float32),  # IoU 0.83 found; second not
          torch.tensor([[50, 50, 60, 60]], dtype=torch.float32)]  # only a padded slot matches it
    assert box_recall(pred, mask, gt) == (1, 3)
    assert box_recall(pred, torch.ones_like(mask), gt) == (2, 3)


def test_fit_learns_and_extractor_loads_checkpoint(world, tmp_path):
    from regionvlp.detector import build_extractor

    cfg = _cfg(world)
    out = tmp_path / "det.pt"
    summary = fit_detector(cfg, list(cfg.data.train.urls), out=out, steps=40, batch_size=8, lr=3e-3,
                           warmup_steps=5, num_classes=6, progress=False)
    assert summary["checkpoint"] == str(out) and out.is_file()
    assert summary["num_classes"] == 6  # as asked (synth CLASSES: background + 5 shapes)
    assert summary["train_clips"] == 48 and summary["train_frames"] == 48 * 4
    assert summary["final_loss"] < 0.75 * summary["first_loss"]

    # the checkpoint loads by path into the frozen extractor, weights as fitted
    saved = torch.load(out, map_location="cpu", weights_only=False)
    assert saved["arch"] == "fasterrcnn_tiny" and saved["num_classes"] == 6
    fitted_cfg = _cfg(world, f"model.detector.weights={out}")
    extractor = build_extractor(fitted_cfg)
    for k, v in extractor.detector.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k]), k

    # box recall of the fitted detector beats the same arch at random init
    val = load_frames(list(cfg.data.val.urls), cfg, num_frames=4)
    fitted = measure_recall(extractor, val)
    random_init = measure_recall(build_extractor(cfg), val)
    assert summary["box_recall"] == pytest.approx(fitted["box_recall"])
    assert fitted["boxes_total"] > 0
    assert fitted["box_recall"] > random_init["box_recall"] + 0.1, (fitted, random_init)


def _strip_boxes(src: Path, dst: Path) -> None:
    """A copy of a synth shard whose json has no box labels (a plain caption shard)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta.pop("boxes"), meta.pop("labels")
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_cli_unlabelled_shards_are_a_clear_error(world, tmp_path, capsys):
    shard = Path(world["val"]["urls"].replace("{", "").replace("}", ""))
    plain = tmp_path / "plain.tar"
    _strip_boxes(shard, plain)
    with pytest.raises(UserError, match="no labelled frames"):
        load_frames([str(plain)], _cfg(world), num_frames=2)
    rc = main(["detector", "fit", str(ROOT / "configs/tiny/detector.yaml"), str(plain), "data.num_frames=2",
               "--steps", "1", "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "no labelled frames" in err and "no_boxes" in err
    assert not (tmp_path / "x.pt").exists()


def test_freeze_rule_matches_torchvision_resnet_fpn_backbone():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from regionvlp.detector.detector import build_detector, freeze_for_finetune

    for layers in (0, 3, 5):
        model = build_detector("fasterrcnn_resnet50_fpn", "none")
        freeze_for_finetune(model, "fasterrcnn_resnet50_fpn", layers)
        ref = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=layers)
        ours = {n: p.requires_grad for n, p in model.backbone.body.named_parameters()}
        theirs = {n: p.requires_grad for n, p in ref.body.named_parameters()}
        assert ours == theirs, layers
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules()) == \
            sum(isinstance(m, FrozenBatchNorm2d) for m in ref.body.modules())
    with pytest.raises(UserError, match="trainable-layers"):
        freeze_for_finetune(build_detector("fasterrcnn_tiny", "none"), "fasterrcnn_tiny", 5)


def test_fit_from_pretrained_keeps_frozen_batchnorm_and_stages(world, tmp_path):
    from regionvlp.detector.detector import build_detector, save_detector

    torch.manual_seed(1)
    start = build_detector("fasterrcnn_tiny", "none", num_classes=6)
    with torch.no_grad():  # non-trivial statistics, as a pretrained detector has
        for m in start.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    pre = save_detector(start, "fasterrcnn_tiny", tmp_path / "pre.pt")
    out = tmp_path / "fit.pt"
    cfg = _cfg(world, f"model.detector.weights={pre}", "data.val.urls=[]")
    summary = fit_detector(cfg, list(cfg.data.train.urls), out=out, steps=3, batch_size=4, lr=1e-2,
                           warmup_steps=1, num_classes=6, max_clips=4, trainable_layers=1, progress=False)
    assert summary["backbone"]["frozen_batchnorm"] and summary["backbone"]["trainable_layers"] == 1
    before = start.state_dict()
    after = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    body = "backbone.body."
    for key, value in before.items():
        if not key.startswith(body) or key.endswith("num_batches_tracked"):
            continue
        if "running_" in key or not key.startswith(body + "layer3."):  # frozen stats and frozen stages
            assert torch.equal(after[key], value), key
    assert not torch.equal(after[body + "layer3.0.weight"], before[body + "layer3.0.weight"])  # the trainable stage
    assert not torch.equal(after["rpn.head.conv.0.0.weight"], before["rpn.head.conv.0.0.weight"])
    loaded = build_detector("fasterrcnn_tiny", str(out))  # a FrozenBatchNorm2d checkpoint loads into BatchNorm2d
    assert torch.equal(loaded.state_dict()[body + "stem.0.1.running_mean"], before[body + "stem.0.1.running_mean"])
