"""The contract between a video pathway, the text tower and the shared losses.

A video pathway is an ``nn.Module`` whose ``forward(batch)`` returns a
:class:`VideoOutput`; the text tower returns a :class:`TextOutput`. The losses take
these (L2-normalised by the dual encoder) and nothing else, so the detector pathway
and the RegionLearner pathway are trained identically.

Masks are bool with True for a real entry. Padded entries may hold any value; every
consumer must ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VideoOutput:
    cls: torch.Tensor  # [B, D] video [CLS]
    regions: torch.Tensor  # [B, R, D] region tokens (R = T*K or T*R_learned)
    region_mask: torch.Tensor  # [B, R] bool, True = real region
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # added to the total
    # scalars for the metrics log: 0-d tensors (read by the trainer on logging steps only, so a
    # forward never waits for the device) or floats
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class TextOutput:
    cls: torch.Tensor  # [B, D] sentence [CLS]
    words: torch.Tensor  # [B, L, D] word tokens
    word_mask: torch.Tensor  # [B, L] bool, True = real word
