"""Learned regions: a RegionLearner (quantize -> mask -> aggregate -> interact) inside a
timm ViT, giving the same :class:`~regionvlp.outputs.VideoOutput` as the detector pathway.

``build_pathway(cfg)`` is what :func:`regionvlp.model.build_model` calls for
``model.regions: learned``; :func:`load_checkpoint` starts a pathway from a saved one
(a different ``max_frames`` is adapted; anything else missing or unexpected is an error).
"""

from __future__ import annotations

from regionvlp.errors import UserError
from regionvlp.region_learner.checkpoint import TEMPORAL_RESIZE, load_checkpoint, load_pathway_state
from regionvlp.region_learner.masks import MASK_NORMS
from regionvlp.region_learner.pathway import RegionLearnerPathway


__all__ = ["build_pathway", "load_checkpoint", "load_pathway_state"]


def build_pathway(cfg) -> RegionLearnerPathway:
    """The learned-regions pathway for ``cfg.model.learner`` with output dim ``cfg.model.embed_dim``.

    When ``model.learner.checkpoint`` names a saved pathway (or whole model), its weights
    are loaded strictly, temporal embeddings resized per ``model.learner.temporal_resize``.
    """
    lcfg = cfg.model.learner
    if lcfg.mask_norm not in MASK_NORMS:
        raise UserError(f"model.learner.mask_norm is {lcfg.mask_norm!r}; choose one of {', '.join(MASK_NORMS)}")
    if lcfg.temporal_resize not in TEMPORAL_RESIZE:
        raise UserError(f"model.learner.temporal_resize is {lcfg.temporal_resize!r}; "
                        f"choose one of {', '.join(TEMPORAL_RESIZE)}")
    for key in ("codebook_size", "code_dim", "num_regions", "interaction_layers", "img_size"):
        if int(lcfg[key]) < 1:
            raise UserError(f"model.learner.{key} must be >= 1, got {lcfg[key]}")
    if not 0.0 <= float(lcfg.ema_decay) < 1.0:
        raise UserError(f"model.learner.ema_decay must be in [0, 1), got {lcfg.ema_decay}")
    if float(lcfg.commitment) < 0:
        raise UserError(f"model.learner.commitment must be >= 0, got {lcfg.commitment}")
    frames = [int(cfg.data.num_frames)] + [int(t) for _, t in (cfg.train.frame_curriculum or [])]
    if max(frames) > int(lcfg.max_frames):
        raise UserError(f"clips of up to {max(frames)} frames (data.num_frames / train.frame_curriculum) but "
                        f"model.learner.max_frames={lcfg.max_frames}; set model.learner.max_frames >= {max(frames)}")
    pathway = RegionLearnerPathway(lcfg, int(cfg.model.embed_dim))
    if str(lcfg.checkpoint) not in ("none", ""):
        load_checkpoint(pathway, lcfg.checkpoint, temporal=str(lcfg.temporal_resize))
    return pathway
