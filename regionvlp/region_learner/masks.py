"""Region masks from quantized features, and mask-weighted aggregation of patches.

A 3x3 conv over the patch grid of the quantized features gives R mask logits per
location. They are normalised — softmax over the R regions at each location (each
patch is shared out among the regions) or an independent sigmoid per region — and
each region is the mask-weighted *average* of the patch features, so its scale does
not depend on how many patches it covers.
"""

from __future__ import annotations

import torch
import torch.nn as nn


MASK_NORMS = ("softmax", "sigmoid")


class RegionMasks(nn.Module):
    def __init__(self, code_dim: int, num_regions: int, *, norm: str = "softmax", kernel_size: int = 3) -> None:
        super().__init__()
        if norm not in MASK_NORMS:
            raise ValueError(f"mask norm must be one of {MASK_NORMS}, got {norm!r}")
        self.norm = norm
        self.num_regions = num_regions
        self.conv = nn.Conv2d(code_dim, num_regions, kernel_size, padding=kernel_size // 2)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized [N, d, h, w] -> masks [N, R, h*w] (softmax: sums to 1 over R)."""
        logits = self.conv(quantized).flatten(2)  # [N, R, h*w]
        if self.norm == "softmax":
            return logits.softmax(dim=1)
        return logits.sigmoid()


def aggregate(masks: torch.Tensor, feats: torch.Tensor, eps: float = 1.0e-6) -> torch.Tensor:
    """Mask-weighted average: masks [N, R, P], feats [N, P, C] -> regions [N, R, C]."""
    weights = masks / (masks.sum(dim=-1, keepdim=True) + eps)  # [N, R, P], rows sum to ~1
    return weights.to(feats.dtype) @ feats  # [N, R, C]
