"""Region transformer: detector regions of T frames -> a video [CLS] and region tokens.

Each region token = Linear(F->H)(RoI feature) + Linear(7->H)([x1,y1,x2,y2,w,h,w*h])
+ learned temporal embedding of its frame; a learned [CLS] is prepended; L pre-norm
transformer layers follow. Padded regions (mask False) are never attended to and their
outputs are zeroed, so their content cannot change anything. With ``frame_local`` a
region attends only to the regions of its own frame while [CLS] attends to all.

The temporal embedding and the [CLS] token live in small submodules
(:class:`TemporalPosEmbed`, :class:`ClsToken`) whose own ``forward`` uses them and
returns a plain tensor, so DeepSpeed ZeRO-3's per-module gather hooks see every use of
them (a parameter used directly by a parent whose forward returns a dataclass is not
re-gathered for backward). Checkpoints with the older top-level names (``temporal``,
``cls_token``) still load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regionvlp.errors import UserError
from regionvlp.pathway import VideoOutput


def box_vector(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] normalised x1,y1,x2,y2 -> [..., 7] x1,y1,x2,y2,w,h,w*h."""
    wh = boxes[..., 2:] - boxes[..., :2]  # [..., 2]
    return torch.cat([boxes, wh, wh[..., :1] * wh[..., 1:]], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"model.region_transformer.hidden ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # [B, N, H]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, N, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )  # [B, h, N, d]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), allowed))
        return x + self.drop(self.mlp(self.norm2(x)))


def attention_mask(region_mask: torch.Tensor, frame_local: bool) -> torch.Tensor:
    """Allowed (query, key) pairs [B, 1+T*K, 1+T*K] for tokens [CLS, regions of frame 0, 1, ...].

    Keys: [CLS] and real regions only. Every query also sees itself, so a row is never
    empty (no NaN even when no region survived). ``frame_local``: a region query only
    sees regions of its own frame; [CLS] sees everything real.
    """
    b, t, k = region_mask.shape
    dev = region_mask.device
    real = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), region_mask.reshape(b, t * k)], 1)  # [B, N]
    allowed = real[:, None, :].expand(b, 1 + t * k, 1 + t * k)  # [B, N, N]
    if frame_local:
        frame = torch.cat([torch.full((1,), -1, device=dev), torch.arange(t, device=dev).repeat_interleave(k)])
        same = frame[:, None] == frame[None, :]  # [N, N]
        is_cls_q = frame[:, None] == -1  # [N, 1]
        allowed = allowed & (same | is_cls_q)[None]
    eye = torch.eye(1 + t * k, dtype=torch.bool, device=dev)[None]
    return allowed | eye


class TemporalPosEmbed(nn.Module):
    """Learned embedding of the frame index: ``forward(x [B, T, K, H]) -> x + pos_embed[:T]``."""

    def __init__(self, max_frames: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(max_frames, hidden))  # [T_max, H]; init by the owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embed[: x.shape[1], None, :].to(x.dtype)


class ClsToken(nn.Module):
    """A learned [CLS] token: ``forward(x [B, N, H]) -> [B, 1+N, H]`` with [CLS] first."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))  # [1, 1, H]; init by the owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)


# top-level parameter names of older checkpoints -> their submodule names now
_RENAMED = {"temporal": "temporal.pos_embed", "cls_token": "cls.cls_token"}


class RegionTransformer(nn.Module):
    """``forward(batch) -> VideoOutput`` from ``region_feats`` [B,T,K,F], ``region_boxes`` [B,T,K,4],
    ``region_mask`` [B,T,K]."""

    def __init__(self, feature_dim: int = 1024, hidden: int = 768, layers: int = 4, heads: int = 12,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, max_frames: int = 16,
                 frame_local: bool = False, embed_dim: int = 256) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.max_frames = max_frames
        self.frame_local = frame_local
        self.feat_proj = nn.Linear(feature_dim, hidden)
        self.box_proj = nn.Linear(7, hidden)
        self.temporal = TemporalPosEmbed(max_frames, hidden)  # temporal.pos_embed [T_max, H]
        self.cls = ClsToken(hidden)  # cls.cls_token [1, 1, H]
        self.input_norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, embed_dim)
        nn.init.trunc_normal_(self.temporal.pos_embed, std=0.02)  # last, as before: same init per seed
        nn.init.trunc_normal_(self.cls.cls_token, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in _RENAMED.items():  # checkpoints written before the submodules existed
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, batch: dict[str, Any]) -> VideoOutput:
        if "region_feats" not in batch:
            raise UserError(
                "the detector pathway needs region_feats in the batch: read region shards "
                "(`regionvlp regions extract`) or apply regionvlp.model.build_batch_transform(cfg) to raw frames"
            )
        feats = batch["region_feats"]  # [B, T, K, F]
        boxes = batch["region_boxes"]  # [B, T, K, 4]
        mask = batch["region_mask"].bool()  # [B, T, K]
        b, t, k, f = feats.shape
        if f != self.feature_dim:
            raise UserError(f"region features are {f}-d but model.region_transformer.feature_dim is {self.feature_dim}")
        if t > self.max_frames:
            raise UserError(f"{t} frames per clip exceed model.region_transformer.max_frames={self.max_frames}")
        dtype = self.feat_proj.weight.dtype
        m = mask[..., None]  # [B, T, K, 1]
        # zero the padded inputs so nothing about them can leak (even through NaN/inf values)
        feats = torch.where(m, feats.to(dtype), torch.zeros((), dtype=dtype, device=feats.device))
        boxes = torch.where(m, boxes.to(dtype), torch.zeros((), dtype=dtype, device=boxes.device))
        x = self.temporal(self.feat_proj(feats) + self.box_proj(box_vector(boxes)))  # [B, T, K, H]
        x = self.cls(x.reshape(b, t * k, -1))  # [B, 1+T*K, H]
        x = self.drop(self.input_norm(x))
        allowed = attention_mask(mask, self.frame_local)  # [B, N, N]
        for blk in self.blocks:
            x = blk(x, allowed)
        x = self.proj(self.norm(x))  # [B, 1+T*K, D]
        region_mask = mask.reshape(b, t * k)  # [B, T*K]
        regions = x[:, 1:] * region_mask[..., None].to(x.dtype)  # padded outputs are zero
        return VideoOutput(
            cls=x[:, 0],
            regions=regions,
            region_mask=region_mask,
            logs={"regions_per_frame": mask.sum(dtype=torch.float32) / max(b * t, 1)},  # 0-d, no host sync
        )


def build_pathway(cfg: Any) -> RegionTransformer:
    """The detector pathway's trainable part (reads region_feats/boxes/mask from the batch)."""
    r = cfg.model.region_transformer
    return RegionTransformer(
        feature_dim=r.feature_dim, hidden=r.hidden, layers=r.layers, heads=r.heads, mlp_ratio=r.mlp_ratio,
        dropout=r.dropout, max_frames=r.max_frames, frame_local=r.frame_local, embed_dim=cfg.model.embed_dim,
    )
