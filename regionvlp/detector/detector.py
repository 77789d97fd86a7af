"""Building torchvision Faster R-CNN detectors: the four stock archs plus a tiny one.

``build_detector(arch, weights, num_classes=None, **kw)`` returns a plain torchvision
:class:`~torchvision.models.detection.FasterRCNN` (trainable; the frozen extractor wraps
it separately). ``weights`` is one of

- ``none``: random init (tests, CPU demo);
- ``DEFAULT`` or an enum name (``COCO_V1``, ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``):
  torchvision's pretrained weights, read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``) and downloaded there when missing and online, as
  torchvision does (:mod:`regionvlp.hub`); offline (``HF_HUB_OFFLINE=1``,
  ``run.offline: true``) or without a network a missing file is a :class:`UserError`
  that names the URL, where to put it and how to pass a local path;
- an ``http(s)://`` URL of such a file: through the same cache and rule;
- a local checkpoint path: either ``{"arch", "num_classes", "state_dict"}`` (what
  ``save_detector`` and ``regionvlp detector fit`` write) or a plain state_dict.

``fasterrcnn_tiny`` is FasterRCNN over a 4-stage conv+BN backbone with an FPN, sized to
train and run on 2 CPU cores at 64-128 px; its box head is the stock TwoMLPHead with
1024-d representation, so region features keep the same width as the big archs.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regionvlp.errors import UserError
from regionvlp.hub import cached_file, is_url
from regionvlp.runtime import load_state_strict


TORCHVISION_ARCHS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
TINY_ARCH = "fasterrcnn_tiny"
ARCHS = TORCHVISION_ARCHS + (TINY_ARCH,)
COCO_NUM_CLASSES = 91  # torchvision's default (background + 90 COCO ids)
REPRESENTATION_SIZE = 1024  # box-head RoI feature width, every arch
RANDOM_INIT_SEED = 0  # weights "none": the same random detector in every process


# ------------------------------------------------------------------ tiny arch
def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyConvNet(nn.Module):
    """Four conv stages at strides 4, 8, 16, 32 (channels 16, 32, 64, 96)."""

    channels = (16, 32, 64, 96)

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4 = self.channels
        self.stem = nn.Sequential(_conv_bn(3, c1, 2), _conv_bn(c1, c1, 2))  # stride 4
        self.layer1 = _conv_bn(c1, c2, 2)  # stride 8
        self.layer2 = _conv_bn(c2, c3, 2)  # stride 16
        self.layer3 = _conv_bn(c3, c4, 2)  # stride 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - used via FPN getter
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


def _tiny_fasterrcnn(num_classes: int, **kw: Any) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    body = TinyConvNet()
    fpn_channels = 32
    backbone = BackboneWithFPN(
        body,
        return_layers={"stem": "0", "layer1": "1", "layer2": "2", "layer3": "3"},
        in_channels_list=list(TinyConvNet.channels),
        out_channels=fpn_channels,
    )  # levels '0'..'3' + 'pool'
    anchors = AnchorGenerator(
        sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5
    )
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, REPRESENTATION_SIZE)
    defaults: dict[str, Any] = {
        "min_size": 128,
        "max_size": 128,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 300,
        "rpn_pre_nms_top_n_train": 600,
        "rpn_post_nms_top_n_train": 300,
        "box_batch_size_per_image": 128,
    }
    return FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        **{**defaults, **kw},
    )


# --------------------------------------------------------------------- weights
def _weights_enum(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch)


def _resolve_enum(arch: str, weights: str):
    """``DEFAULT`` / ``COCO_V1`` / ``<EnumClass>.COCO_V1`` -> the enum member, or None."""
    enum = _weights_enum(arch)
    name = weights.split(".")[-1] if weights.startswith(enum.__name__ + ".") else weights
    try:
        return enum[name]
    except KeyError:
        return None


def _load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / not a torch file
        raise UserError(f"detector weights {path}: cannot read it as a torch checkpoint ({err})") from None


def _split_checkpoint(obj: Any, source: str) -> tuple[str | None, int | None, dict[str, torch.Tensor]]:
    """(arch, num_classes, state_dict) from a ``{"arch", "num_classes", "state_dict"}`` file or a plain state_dict."""
    if not isinstance(obj, dict):
        raise UserError(f"detector weights {source}: expected a state_dict or a dict with 'state_dict'")
    arch = None
    num_classes = None
    state = obj
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        arch = obj.get("arch")
        num_classes = obj.get("num_classes")
        state = obj["state_dict"]
    if num_classes is None:
        cls_w = state.get("roi_heads.box_predictor.cls_score.weight")
        if cls_w is not None:
            num_classes = int(cls_w.shape[0])
    return arch, num_classes, state


def _construct(arch: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    if arch == TINY_ARCH:
        return _tiny_fasterrcnn(num_classes, **kw)
    import torchvision.models.detection as det

    return getattr(det, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **kw)


def _replace_predictor(model: nn.Module, num_classes: int) -> None:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)


def build_detector(
    arch: str, weights: str | None = "none", num_classes: int | None = None, **kw: Any
) -> nn.Module:
    """A torchvision ``FasterRCNN`` for ``arch`` with ``weights`` (see module doc).

    ``num_classes`` (background included) replaces the box predictor when it differs from
    the weights' classes (fine-tuning a pretrained detector on new labels); ``kw`` goes to
    ``FasterRCNN`` (``min_size``, ``max_size``, ``rpn_pre_nms_top_n_test``, ...).
    """
    if arch not in ARCHS:
        raise UserError(f"model.detector.arch '{arch}' is unknown; choose one of {', '.join(ARCHS)}")
    w = "none" if weights is None else str(weights).strip()
    if w.lower() in ("none", "", "null", "random"):
        # a fixed seed, independent of the global RNG: "none" names one reproducible detector,
        # so regions extracted offline and in the training loop come from the same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return _construct(arch, num_classes or COCO_NUM_CLASSES, kw)

    if is_url(w):  # a weights file by URL: through the torch hub cache, as torchvision's own
        w = str(cached_file(w, "model.detector.weights", local="/path/to/detector.pth"))
    path = Path(w).expanduser()
    looks_like_path = path.suffix in (".pt", ".pth", ".bin", ".ckpt") or os.sep in w or path.exists()
    if looks_like_path:
        if not path.is_file():
            raise UserError(f"detector weights file not found: {path} (model.detector.weights)")
        ckpt_arch, ckpt_classes, state = _split_checkpoint(_load_file(path), str(path))
        if ckpt_arch is not None and ckpt_arch != arch:
            raise UserError(
                f"detector checkpoint {path} is for arch '{ckpt_arch}' but model.detector.arch is '{arch}'; "
                f"set model.detector.arch={ckpt_arch}"
            )
        model = _construct(arch, ckpt_classes or COCO_NUM_CLASSES, kw)
        load_state_strict(model, state, f"detector weights {path} do not fit this arch (check model.detector.arch)")
        if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
            _replace_predictor(model, num_classes)
        return model

    if arch == TINY_ARCH:
        raise UserError(
            f"{TINY_ARCH} has no pretrained weights ('{w}'): use model.detector.weights=none or a local "
            "checkpoint path (e.g. one written by `regionvlp detector fit`)"
        )
    member = _resolve_enum(arch, w)
    if member is None:
        names = ", ".join(["DEFAULT"] + [m.name for m in _weights_enum(arch)])
        raise UserError(
            f"model.detector.weights '{w}' is neither a file nor a weights name for {arch} "
            f"(names: {names}; or none, or a local checkpoint path)"
        )
    cached = cached_file(member.url, "model.detector.weights", local="/path/to/detector.pth")
    weight_classes = len(member.meta["categories"])
    model = _construct(arch, weight_classes, kw)
    load_state_strict(model, _load_file(cached), f"detector weights {cached} do not fit this arch "
                                                     "(check model.detector.arch)")
    if num_classes is not None and num_classes != weight_classes:
        _replace_predictor(model, num_classes)
    return model


# backbone stages, last first, per arch family: the units torchvision's trainable-layers rule counts
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
TINY_STAGES = ("layer3", "layer2", "layer1", "stem")


def backbone_stages(model: nn.Module, arch: str) -> list[str]:
    """Name prefixes (inside ``backbone.body``) of the backbone's stages, last stage first.

    ResNet: layer4 .. conv1 (5, as ``_resnet_fpn_extractor``); MobileNetV3: the feature
    blocks split where torchvision's ``_mobilenet_extractor`` splits them (6); tiny: 4."""
    if arch.startswith("fasterrcnn_resnet50"):
        return list(RESNET_STAGES)
    if arch == TINY_ARCH:
        return list(TINY_STAGES)
    blocks = list(model.backbone.body.named_children())  # MobileNetV3 features "0".."16"
    starts = [0] + [i for i, (_, b) in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    ends = starts[1:] + [len(blocks)]
    stages = [tuple(name for name, _ in blocks[a:b]) for a, b in zip(starts, ends)]
    return [",".join(stage) for stage in reversed(stages)]


def freeze_for_finetune(model: nn.Module, arch: str, trainable_layers: int = 3) -> dict[str, int]:
    """What torchvision does to a detector built on pretrained weights: every BatchNorm of the
    backbone body becomes a ``FrozenBatchNorm2d`` with the same statistics (batch statistics
    of a few frames would drift the features), and only the last ``trainable_layers``
    backbone stages train (ResNet: 3 of 5 by default, as ``fasterrcnn_resnet50_fpn(weights=...)``).
    FPN, RPN and box heads always train. Returns counts of frozen / trainable parameters."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    stages = backbone_stages(model, arch)
    if not 0 <= trainable_layers <= len(stages):
        raise UserError(f"--trainable-layers {trainable_layers}: {arch} has {len(stages)} backbone stages "
                        f"(use 0..{len(stages)})")
    body = model.backbone.body
    for name, module in list(body.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(module, key).detach())
            parent = body.get_submodule(name.rpartition(".")[0]) if "." in name else body
            setattr(parent, name.rpartition(".")[2], frozen)
    train_prefixes = [p for stage in stages[:trainable_layers] for p in stage.split(",")]
    if trainable_layers == len(stages) and stages == list(RESNET_STAGES):
        train_prefixes.append("bn1")
    counts = {"frozen": 0, "trainable": 0}
    for name, p in body.named_parameters():
        train = any(name == pre or name.startswith(pre + ".") for pre in train_prefixes)
        p.requires_grad_(train)
        counts["trainable" if train else "frozen"] += p.numel()
    return counts


def save_detector(model: nn.Module, arch: str, path: str | Path, **extra: Any) -> Path:
    """Write ``{"arch", "num_classes", "state_dict", **extra}`` (loadable by :func:`build_detector`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    torch.save({"arch": arch, "num_classes": num_classes, "state_dict": state, **extra}, path)
    return path


# Region extraction keeps K ~ 30 boxes per frame, so it needs far fewer RPN proposals than
# detection at 100 boxes per image (stock: 1000 per level before NMS, 1000 per image after;
# 150/150 for the 320 mobilenet). The box head runs on every proposal and costs about as
# much as the whole ResNet-50 backbone at 1000 per frame, so these are the extractor's
# defaults when model.detector.rpn_pre_nms_top_n / rpn_post_nms_top_n are left None:
# (pre-NMS per FPN level, post-NMS per frame).
TUNED_RPN: dict[str, tuple[int, int]] = {
    "fasterrcnn_resnet50_fpn": (300, 200),
    "fasterrcnn_resnet50_fpn_v2": (300, 200),
    "fasterrcnn_mobilenet_v3_large_fpn": (300, 200),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (150, 100),
    TINY_ARCH: (150, 100),
}


def detector_kwargs(dcfg: Any, tuned: bool = True, size: int | None = None) -> dict[str, Any]:
    """FasterRCNN keyword arguments from ``model.detector``.

    ``min_size``/``max_size`` None take ``size`` (``data.size``: the detector runs at the
    frames' own size instead of the arch's 800 px, which would upsample 224-384 px frames
    3.6-2x); with ``size`` None too, the arch's own. RPN top-n None take :data:`TUNED_RPN`
    (``tuned=False``: the arch's stock settings)."""
    pre, post = TUNED_RPN.get(str(dcfg.arch), (None, None)) if tuned else (None, None)
    chosen = {"min_size": (dcfg.min_size, size), "max_size": (dcfg.max_size, size),
              "rpn_pre_nms_top_n_test": (dcfg.rpn_pre_nms_top_n, pre),
              "rpn_post_nms_top_n_test": (dcfg.rpn_post_nms_top_n, post)}  # (config value, default)
    values = {k: value if value is not None else default for k, (value, default) in chosen.items()}
    return {k: int(v) for k, v in values.items() if v is not None}
