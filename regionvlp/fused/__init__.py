"""Fused regions: the detector pathway's region tokens for the K boxes and the learned
pathway's R aggregated regions in one region set (``model.regions: fused``).

``build_pathway(cfg)`` is what the registry entry (:mod:`regionvlp.pathways`) names: the
detector pathway's region transformer (``model.detector``, ``model.region_transformer``)
and the learned pathway (``model.learner``) built as they are for their own runs, joined
by :class:`~regionvlp.fused.pathway.FusedPathway` (``model.fused``).
"""

from __future__ import annotations

from typing import Any

from regionvlp.detector import build_pathway as build_detector
from regionvlp.fused.pathway import FusedPathway
from regionvlp.region_learner import build_pathway as build_learned

__all__ = ["FusedPathway", "build_pathway"]


def build_pathway(cfg: Any) -> FusedPathway:
    """Both pathways' trainable parts for ``cfg`` + the fusion layers of ``cfg.model.fused``."""
    f = cfg.model.fused
    return FusedPathway(build_detector(cfg), build_learned(cfg), int(cfg.model.embed_dim), layers=int(f.layers),
                        heads=int(f.heads), mlp_ratio=float(f.mlp_ratio), dropout=float(f.dropout))
