"""Learned regions: a RegionLearner (quantize -> mask -> aggregate -> interact) inside a
timm ViT, giving the same :class:`~regionvlp.outputs.VideoOutput` as the detector pathway.

``build_pathway(cfg)`` is what :func:`regionvlp.model.build_model` calls for
``model.regions: learned``; :func:`load_checkpoint` starts a pathway from a saved one
(a different ``max_frames`` is adapted; anything else missing or unexpected is an error).
"""

from __future__ import annotations

from regionvlp.region_learner.checkpoint import load_checkpoint, load_pathway_state
from regionvlp.region_learner.pathway import RegionLearnerPathway


__all__ = ["build_pathway", "load_checkpoint", "load_pathway_state"]


def build_pathway(cfg) -> RegionLearnerPathway:
    """The learned-regions pathway for ``cfg.model.learner`` with output dim ``cfg.model.embed_dim``.

    When ``model.learner.checkpoint`` names a saved pathway (or whole model), its weights
    are loaded strictly, temporal embeddings resized per ``model.learner.temporal_resize``.
    """
    lcfg = cfg.model.learner
    pathway = RegionLearnerPathway(lcfg, int(cfg.model.embed_dim))
    if str(lcfg.checkpoint) not in ("none", ""):
        load_checkpoint(pathway, lcfg.checkpoint, temporal=str(lcfg.temporal_resize))
    return pathway
