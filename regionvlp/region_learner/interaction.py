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
import torch.nn.functional as F


class InteractionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"interaction dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, C] -> [B, S, C]."""
        B, S, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, S, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, S, C/h]
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, C))
        return x + self.mlp(self.norm2(x))


class RegionInteraction(nn.Module):
    """Temporal + slot embeddings, then ``layers`` pre-norm transformer layers."""

    def __init__(self, dim: int, num_regions: int, max_frames: int, *, layers: int = 1, heads: int = 8,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"the region interaction needs at least 1 layer, got {layers}")
        self.max_frames = max_frames
        self.time_embed = nn.Parameter(torch.zeros(max_frames, dim))  # [T_max, C]
        # "pos_embed" in the name keeps it out of weight decay (engine.NO_DECAY_NAMES)
        self.slot_pos_embed = nn.Parameter(torch.zeros(num_regions, dim))  # [R, C]
        nn.init.trunc_normal_(self.slot_pos_embed, std=0.02)
        self.layers = nn.ModuleList(InteractionLayer(dim, heads, mlp_ratio) for _ in range(layers))

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """regions [B, T, R, C] -> [B, T, R, C]."""
        B, T, R, C = regions.shape
        x = regions + self.time_embed[:T, None, :] + self.slot_pos_embed[None, :, :]  # [B, T, R, C]
        x = x.reshape(B, T * R, C)
        for layer in self.layers:
            x = layer(x)
        return x.reshape(B, T, R, C)
