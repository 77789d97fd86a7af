"""The fused pathway: detector regions and learned regions in one region set.

Per clip::

    region_feats/boxes/mask [B,T,K,*] -> region transformer -> box tokens   [B, T*K, D] (+ mask)
    frames [B,T,3,H,W]                -> RegionLearner ViT  -> learned tokens [B, T*R, D] (all real)
    tokens = [CLS] + (box tokens + type[0]) + (learned tokens + type[1])     [B, 1+T*K+T*R, D]
      -> ``layers`` pre-norm transformer blocks (padded boxes never attended to)
      -> LayerNorm -> Linear
    video [CLS] = token 0; regions = tokens 1.. (padded boxes zeroed), mask = box mask + ones

The [CLS] input is a learned token plus the mean of the two pathways' own [CLS], so the
fused [CLS] starts from both summaries and every parameter of both pathways gets a
gradient. Both pathways' auxiliary losses (the RegionLearner's commitment) and logs are
kept. The batch needs ``frames`` (for the RegionLearner) and ``region_*`` (the detector's
frozen extractor, the registry entry's batch transform, adds them from the frames).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from regionvlp.detector.transformer import attention_mask, make_block
from regionvlp.errors import UserError
from regionvlp.layers import ClsToken
from regionvlp.outputs import VideoOutput

BOX, LEARNED = 0, 1  # rows of the type embedding


class FusedPathway(nn.Module):
    """``forward(batch) -> VideoOutput`` over one region set of both pathways' tokens."""

    def __init__(self, detector: nn.Module, learned: nn.Module, embed_dim: int, *, layers: int = 1, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.detector = detector  # RegionTransformer: box tokens
        self.learned = learned  # RegionLearnerPathway: learned region tokens
        self.type_embed = nn.Embedding(2, embed_dim)  # [2, D]: box, learned
        self.cls = ClsToken(embed_dim)  # cls.cls_token [1, 1, D]
        self.blocks = nn.ModuleList(make_block(embed_dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        nn.init.trunc_normal_(self.type_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.cls.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters that must not decay (collected by :func:`regionvlp.optim.no_decay_names`)."""
        return {"type_embed.weight"}

    @contextmanager
    def capture_masks(self) -> Iterator[list[torch.Tensor]]:
        """The RegionLearner's masks [B, T, R, h, w] of every forward inside the block (``show``)."""
        with self.learned.capture_masks() as masks:
            yield masks

    def forward(self, batch: dict[str, Any]) -> VideoOutput:
        if "frames" not in batch:
            raise UserError("the fused pathway needs frames (video or frame shards) for its learned regions; "
                            "region shards have none")
        box = self.detector(batch)  # cls [B, D], regions [B, T*K, D], mask [B, T*K]
        lrn = self.learned(batch)  # cls [B, D], regions [B, T*R, D], mask all True
        types = self.type_embed.weight.to(box.regions.dtype)  # [2, D]
        tokens = torch.cat([box.regions + types[BOX], lrn.regions.to(box.regions.dtype) + types[LEARNED]], 1)
        mask = torch.cat([box.region_mask.bool(), lrn.region_mask.bool()], 1)  # [B, N]
        x = self.cls(tokens)  # [B, 1+N, D]
        summary = 0.5 * (box.cls + lrn.cls.to(box.cls.dtype))  # [B, D]
        x = x + torch.cat([summary[:, None], torch.zeros_like(tokens)], 1)
        allowed = attention_mask(mask[:, None], frame_local=False)[:, None]  # [B, 1, 1+N, 1+N]
        for blk in self.blocks:
            x = blk(x, attn_mask=allowed)
        x = self.proj(self.norm(x))  # [B, 1+N, D]
        regions = x[:, 1:] * mask[..., None].to(x.dtype)  # padded boxes are zero
        return VideoOutput(cls=x[:, 0], regions=regions, region_mask=mask,
                           aux_losses={**box.aux_losses, **lrn.aux_losses}, logs={**box.logs, **lrn.logs})
