"""The dual encoder: a video pathway and the text tower joined by the shared losses.

``build_model(cfg)`` picks the pathway by ``cfg.model.regions`` (``detector``: the
region transformer over frozen-detector regions; ``learned``: the RegionLearner ViT).
``build_batch_transform(cfg)`` gives the frozen region extractor the detector pathway
needs when a batch carries frames instead of precomputed regions; it is kept outside
the model so DeepSpeed, the optimizer and checkpoints never see it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp.errors import UserError
from regionvlp.losses import AlignmentLoss, check_loss_config, region_word_scores
from regionvlp.pathway import TextOutput, VideoOutput


class DualEncoder(nn.Module):
    """``pathway`` (batch -> VideoOutput) + ``text_tower`` (ids, mask -> TextOutput) + ``loss``."""

    def __init__(self, pathway: nn.Module, text_tower: nn.Module, loss: AlignmentLoss) -> None:
        super().__init__()
        self.pathway = pathway
        self.text_tower = text_tower
        self.loss = loss

    def encode_video(self, batch: dict[str, Any]) -> VideoOutput:
        """L2-normalised video [CLS] [B, D] and regions [B, R, D] (+ mask, aux losses, logs)."""
        out = self.pathway(batch)
        return VideoOutput(
            cls=F.normalize(out.cls, dim=-1),
            regions=F.normalize(out.regions, dim=-1),
            region_mask=out.region_mask.bool(),
            aux_losses=dict(out.aux_losses),
            logs=dict(out.logs),
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        """L2-normalised sentence [CLS] [B, D] and words [B, L, D] (+ word mask)."""
        out = self.text_tower(input_ids, attention_mask)
        return TextOutput(
            cls=F.normalize(out.cls, dim=-1),
            words=F.normalize(out.words, dim=-1),
            word_mask=out.word_mask.bool(),
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training step terms: ``loss`` = global + lambda * local + sum(aux), and each term
        (``global``, ``local``, ``aux_<name>``), ``temperature`` and the pathway's logs."""
        video = self.encode_video(batch)
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        out = self.loss(video, text)
        total = out["loss"]
        for name, value in video.aux_losses.items():
            total = total + value
            out[f"aux_{name}"] = value
        out["loss"] = total
        for name, value in video.logs.items():
            out.setdefault(name, torch.as_tensor(float(value)))
        return out

    @torch.no_grad()
    def similarity(self, video: VideoOutput, text: TextOutput) -> torch.Tensor:
        """Retrieval scores [Nv, Nt], video rows: global [CLS] cosine, plus
        lambda * (S^{v->t} + S^{t->v}) / 2 of the region-word alignment when lambda > 0."""
        sim = video.cls.float() @ text.cls.float().T  # [Nv, Nt]
        lam = self.loss.local_weight
        if lam != 0.0:
            s_vt, s_tv = region_word_scores(
                video.regions.float(), video.region_mask, text.words.float(), text.word_mask,
                self.loss.align_temperature, self.loss.chunk_size,
            )
            sim = sim + lam * 0.5 * (s_vt + s_tv)
        return sim


def build_pathway(cfg) -> nn.Module:
    """The video pathway ``cfg.model.regions`` names (imported lazily)."""
    kind = cfg.model.regions
    if kind == "detector":
        from regionvlp.regions import build_pathway as build
    elif kind == "learned":
        from regionvlp.region_learner import build_pathway as build
    else:
        raise UserError(f"config key 'model.regions' is {kind!r}; choose one of detector, learned")
    return build(cfg)


def build_model(cfg) -> DualEncoder:
    """Pathway (by ``cfg.model.regions``) + text tower + losses, on CPU, fp32."""
    from regionvlp.text import TextTower

    check_loss_config(cfg.loss)  # before the (slow) towers are built
    pathway = build_pathway(cfg)
    text = TextTower(cfg.model.text, int(cfg.model.embed_dim))
    return DualEncoder(pathway, text, AlignmentLoss(cfg.loss))


def build_batch_transform(cfg) -> Callable[[torch.Tensor], dict[str, torch.Tensor]] | None:
    """The frozen region extractor (detector pathway) or None (learned pathway)."""
    if cfg.model.regions != "detector":
        return None
    from regionvlp.regions import build_extractor

    return build_extractor(cfg)


def prepare_batch(batch: dict[str, Any], transform: Callable | None) -> dict[str, Any]:
    """Apply the batch transform when the batch has ``frames`` and no ``region_feats``:
    adds ``region_feats`` [B, T, K, F], ``region_boxes`` [B, T, K, 4], ``region_mask``
    [B, T, K] (and the extractor's labels / scores). Returns the same dict."""
    if transform is None or "region_feats" in batch or "frames" not in batch:
        return batch
    with torch.no_grad():
        batch.update(transform(batch["frames"]))
    return batch
