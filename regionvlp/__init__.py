"""regionvlp: video-language pre-training with region features.

Two region pathways (a frozen torchvision Faster R-CNN in the loop, or a learnable
RegionLearner inside a ViT) trained with the same alignment losses and DeepSpeed engine.
"""

__version__ = "0.1.0"
