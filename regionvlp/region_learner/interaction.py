"""Interaction among the T x R learned regions: pre-norm transformer layers.

Each layer is ``x + attn(LN(x))`` then ``x + mlp(LN(x))`` over every region of every
frame, so regions exchange information across space and time. Before the first layer
each region gets a learned temporal embedding (its frame) and a slot embedding (which
mask produced it). Any number of layers >= 1 works.

The temporal embedding starts at zero (as Frozen's does): 1-frame pre-training trains
row 0 only, and the rows it never sees stay zero instead of random, so an 8-frame
fine-tune starts with every frame's regions as the pre-trained model saw them (plus the
row-0 offset when ``temporal_resize: interpolate`` repeats it).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def interaction_layer(dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> nn.Module:
    """One pre-norm layer ``x + attn(LN(x))``, ``x + mlp(LN(x))``: timm's ViT ``Block``
    (qkv bias, GELU MLP), the same layer the hand-written ``InteractionLayer`` of earlier
    checkpoints was (their names load through :func:`adapt_state`)."""
    from timm.models.vision_transformer import Block

    if dim % heads:
        raise ValueError(f"interaction dim {dim} is not divisible by {heads} heads")
    return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout)


# parameter names of the hand-written interaction layers -> timm Block's
OLD_LAYER_NAMES = {".qkv.": ".attn.qkv.", ".proj.": ".attn.proj.", ".mlp.0.": ".mlp.fc1.", ".mlp.3.": ".mlp.fc2."}


def adapt_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint adaptation (as timm's ``checkpoint_filter_fn``): interaction-layer keys
    written before the layers were timm Blocks get today's names; other keys pass."""
    out = {}
    for key, value in state.items():
        if "interaction.layers." in key and ".attn." not in key:
            for old, new in OLD_LAYER_NAMES.items():
                if old in key:
                    key = key.replace(old, new)
                    break
        out[key] = value
    return out


class RegionInteraction(nn.Module):
    """Temporal + slot embeddings, then ``layers`` pre-norm transformer layers."""

    def __init__(self, dim: int, num_regions: int, max_frames: int, *, layers: int = 1, heads: int = 8,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"the region interaction needs at least 1 layer, got {layers}")
        self.max_frames = max_frames
        self.time_embed = nn.Parameter(torch.zeros(max_frames, dim))  # [T_max, C]
        self.slot_pos_embed = nn.Parameter(torch.zeros(num_regions, dim))  # [R, C]
        nn.init.trunc_normal_(self.slot_pos_embed, std=0.02)
        self.layers = nn.ModuleList(interaction_layer(dim, heads, mlp_ratio) for _ in range(layers))

    def no_weight_decay(self) -> set[str]:
        """Parameters that must not decay (collected by :func:`regionvlp.optim.no_decay_names`)."""
        return {"time_embed", "slot_pos_embed"}

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """regions [B, T, R, C] -> [B, T, R, C]."""
        B, T, R, C = regions.shape
        x = regions + self.time_embed[:T, None, :] + self.slot_pos_embed[None, :, :]  # [B, T, R, C]
        x = x.reshape(B, T * R, C)
        for layer in self.layers:
            x = layer(x)
        return x.reshape(B, T, R, C)
