"""Detector pathway: a frozen torchvision Faster R-CNN gives K regions per frame
(:func:`build_extractor`), a trainable region transformer turns them into the video
tokens the shared losses take (:func:`build_pathway`)."""

from regionvlp.detector.detector import ARCHS, build_detector, save_detector
from regionvlp.detector.extractor import RegionExtractor, build_extractor
from regionvlp.detector.transformer import RegionTransformer, build_pathway


__all__ = [
    "ARCHS",
    "RegionExtractor",
    "RegionTransformer",
    "build_detector",
    "build_extractor",
    "build_pathway",
    "save_detector",
]
