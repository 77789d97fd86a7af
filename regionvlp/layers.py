"""Layers more than one pathway uses (as ``timm.layers`` is for timm's models).

The pathways never import each other (``tests/test_layout.py``), so what they share
lives here, below them:

* :class:`FrameEmbedding` — a learned embedding per frame index, added to every token
  of that frame (the detector pathway's ``temporal.pos_embed``, the learned pathway's
  ``time_embed.weight``);
* :class:`ClsToken` — a learned [CLS] token prepended to a token sequence.

Both are small modules of their own, not bare parameters of their owner, so DeepSpeed
ZeRO-3's per-module gather hooks see every use of their parameter inside a module
whose ``forward`` returns a plain tensor.
"""

from __future__ import annotations

import torch
from torch import nn

FRAME_INITS = ("zeros", "trunc_normal")


class FrameEmbedding(nn.Module):
    """``forward(x [B, T, ..., C]) -> x + table[:T]`` broadcast over the middle axes.

    ``param`` names the table in the state dict (each pathway keeps the name its
    checkpoints were saved with: ``weight`` or ``pos_embed``). ``init``: ``zeros`` (a
    pretrained image model computes what it did per frame until trained) or
    ``trunc_normal`` (std 0.02, drawn here; an owner that must keep its RNG order can
    build with ``zeros`` and draw later itself)."""

    def __init__(self, max_frames: int, dim: int, *, param: str = "weight", init: str = "zeros") -> None:
        super().__init__()
        if init not in FRAME_INITS:
            raise ValueError(f"FrameEmbedding init must be one of {', '.join(FRAME_INITS)}, got {init!r}")
        self.param = param
        self.register_parameter(param, nn.Parameter(torch.zeros(max_frames, dim)))  # [T_max, C]
        if init == "trunc_normal":
            nn.init.trunc_normal_(self.table, std=0.02)

    @property
    def table(self) -> torch.Tensor:
        """The [T_max, C] parameter, whatever its state-dict name."""
        return getattr(self, self.param)

    def no_weight_decay(self) -> set[str]:
        """Parameters that must not decay (collected by :func:`regionvlp.optim.no_decay_names`)."""
        return {self.param}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, S, C] (any number of axes between T and C) -> x + table[t] per frame t."""
        table = self.table[: x.shape[1]].to(x.dtype)  # [T, C]
        return x + table.view(table.shape[0], *([1] * (x.dim() - 3)), table.shape[1])


class ClsToken(nn.Module):
    """A learned [CLS] token: ``forward(x [B, N, H]) -> [B, 1+N, H]`` with [CLS] first."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))  # [1, 1, H]; init by the owner

    def no_weight_decay(self) -> set[str]:
        """Parameters that must not decay (collected by :func:`regionvlp.optim.no_decay_names`)."""
        return {"cls_token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
