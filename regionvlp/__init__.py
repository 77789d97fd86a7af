"""regionvlp: video-language pre-training with region features.

Two region pathways (a frozen torchvision Faster R-CNN in the loop, or a learnable
RegionLearner inside a ViT) trained with the same alignment losses and DeepSpeed engine.
"""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """An exported folder (``regionvlp export RUN_DIR OUT``) → a ready dual encoder in
    eval mode, with ``.batch_transform`` (the frozen extractor, or None) and ``.config``."""
    from regionvlp.checkpoint import load_model as _load_model

    return _load_model(path, device)
