"""Detector construction and weights: none / DEFAULT / enum names / local checkpoints, offline only."""

from __future__ import annotations

import pytest
import torch

from regionvlp.errors import UserError
from regionvlp.detector.detector import build_detector, save_detector
from regionvlp.hub import cache_path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_arch_shapes_and_seeded_random_init():
    a = build_detector("fasterrcnn_tiny", "none", num_classes=6, min_size=64, max_size=64)
    torch.manual_seed(123)  # the global RNG does not matter: "none" is one fixed random detector
    b = build_detector("fasterrcnn_tiny", "none", num_classes=6, min_size=64, max_size=64)
    assert _same_weights(a, b)
    assert a.roi_heads.box_head.fc7.out_features == 1024
    assert a.roi_heads.box_predictor.cls_score.out_features == 6
    assert sum(p.numel() for p in a.parameters()) < 4_000_000
    a.eval()
    with torch.no_grad():
        out = a([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[-1] == 4


def test_local_checkpoint_dict_and_plain_state_dict(tmp_path):
    src = build_detector("fasterrcnn_tiny", "none", num_classes=5)
    with torch.no_grad():
        src.roi_heads.box_predictor.cls_score.bias.add_(1.0)  # differs from the seeded init
    ckpt = save_detector(src, "fasterrcnn_tiny", tmp_path / "det.pth")
    loaded = build_detector("fasterrcnn_tiny", str(ckpt))
    assert _same_weights(src, loaded)
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    assert _same_weights(src, build_detector("fasterrcnn_tiny", str(plain)))  # num_classes read from the weights
    # fine-tuning on new labels: same trunk, a fresh predictor of the asked size
    re = build_detector("fasterrcnn_tiny", str(ckpt), num_classes=3)
    assert re.roi_heads.box_predictor.cls_score.out_features == 3
    assert torch.equal(re.backbone.body.stem[0][0].weight, src.backbone.body.stem[0][0].weight)
    with pytest.raises(UserError, match="model.detector.arch=fasterrcnn_tiny"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", str(ckpt))
    with pytest.raises(UserError, match="not found"):
        build_detector("fasterrcnn_tiny", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        build_detector("fasterrcnn_tiny", str(tmp_path / "junk.pth"))


def test_pretrained_names_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    for name in ("DEFAULT", "COCO_V1", "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"):
        with pytest.raises(UserError, match="model.detector.weights=/path/to/detector.pth") as err:
            build_detector(arch, name)
        assert str(tmp_path / "torch") in str(err.value)
    with pytest.raises(UserError, match="neither a file nor a weights name"):
        build_detector(arch, "COCO_V9")
    with pytest.raises(UserError, match="no pretrained weights"):
        build_detector("fasterrcnn_tiny", "DEFAULT")
    with pytest.raises(UserError, match="unknown"):
        build_detector("retinanet", "none")

    # with the file in the hub cache, DEFAULT loads it (here: a stand-in with COCO's 91 classes)
    from torchvision.models import get_model_weights

    member = get_model_weights(arch).DEFAULT
    cached = cache_path(member.url)
    assert cached.is_relative_to(tmp_path)
    cached.parent.mkdir(parents=True)
    src = build_detector(arch, "none")
    with torch.no_grad():
        src.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)
    torch.save(src.state_dict(), cached)
    assert _same_weights(src, build_detector(arch, "DEFAULT"))
