"""The learned-regions video pathway: a timm ViT with a RegionLearner inside.

Per clip of T frames::

    frames uint8 [B,T,3,H,W] -> float, backbone mean/std, resize to img_size
      -> ViT patch embed + pos embed (per frame) + learned temporal embedding (per frame)
      -> blocks 0..k (optionally each preceded by temporal attention, identity at init;
         skipped at T = 1, where attention over one frame has nothing to mix)
      -> RegionLearner on the patch tokens of block k:
           quantize (EMA codebook) -> conv masks (R per frame) -> mask-weighted average
           of the patch features -> interaction over the T x R regions
      -> the R region tokens of each frame join that frame's token sequence
      -> blocks k+1..end (none for k = last) refine patches, [CLS] and regions together
      -> ViT final norm
    video [CLS] = W_c · mean_t(frame [CLS]) + W_r · mean_{t,r}(region)   (W_r zero at init)
    regions     = W_p · region tokens, [B, T·R, D], all real

The video [CLS] starts as the backbone's own frame [CLS] averaged over frames (so a
pretrained ViT keeps its meaning) and learns how much of the regions to mix in; the
region tokens feed the region-word alignment loss.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from regionvlp.errors import UserError
from regionvlp.outputs import VideoOutput
from regionvlp.layers import FrameEmbedding
from regionvlp.region_learner.backbone import TemporalAttention, create_vit
from regionvlp.region_learner.checkpoint import load_pathway_state
from regionvlp.region_learner.interaction import RegionInteraction
from regionvlp.region_learner.masks import RegionMasks, aggregate
from regionvlp.region_learner.quantizer import EMAQuantizer


def _embed_frames(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, S, S] -> tokens [N, P+h*w, C]: patch embedding, prefix tokens, position
    embedding. Installed as the ViT's own ``forward`` so the ViT's direct parameters
    (cls/reg tokens, position embedding) are used inside its own module call, which is
    where DeepSpeed ZeRO-3 gathers partitioned parameters."""
    x = vit.patch_embed(images)  # [N, h*w, C]
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))


@dataclass
class LearnerOutput:
    regions: torch.Tensor  # [B, T, R, C] after interaction
    masks: torch.Tensor  # [B, T, R, N] normalised masks over the patch grid
    codes: torch.Tensor  # [B, T, N] code index per patch
    commitment: torch.Tensor  # [] (0 when beta == 0)
    perplexity: torch.Tensor  # []
    usage: torch.Tensor  # []


class RegionLearner(nn.Module):
    """quantize -> mask -> aggregate -> interact, on the patch tokens of one ViT block."""

    def __init__(self, dim: int, heads: int, *, max_frames: int, codebook_size: int, code_dim: int,
                 ema_decay: float, ema_eps: float, dead_code_threshold: float, commitment: float,
                 num_regions: int, mask_norm: str, interaction_layers: int) -> None:
        super().__init__()
        self.num_regions = num_regions
        self.pre_quant = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, code_dim))
        self.quantizer = EMAQuantizer(codebook_size, code_dim, decay=ema_decay, eps=ema_eps,
                                      dead_code_threshold=dead_code_threshold, commitment=commitment)
        self.masks = RegionMasks(code_dim, num_regions, norm=mask_norm)
        self.interaction = RegionInteraction(dim, num_regions, max_frames, layers=interaction_layers, heads=heads)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> LearnerOutput:
        """patches [B, T, N, C] with N = h*w -> regions [B, T, R, C]."""
        B, T, N, C = patches.shape
        h, w = grid
        q = self.quantizer(self.pre_quant(patches))  # quantized [B, T, N, d]
        grid_codes = q.quantized.reshape(B * T, h, w, -1).permute(0, 3, 1, 2)  # [B*T, d, h, w]
        masks = self.masks(grid_codes)  # [B*T, R, N]
        regions = aggregate(masks, patches.reshape(B * T, N, C))  # [B*T, R, C]
        regions = self.interaction(regions.reshape(B, T, self.num_regions, C))  # [B, T, R, C]
        return LearnerOutput(regions=regions, masks=masks.reshape(B, T, self.num_regions, N),
                             codes=q.indices, commitment=q.commitment, perplexity=q.perplexity, usage=q.usage)


class RegionLearnerPathway(nn.Module):
    def __init__(self, lcfg, embed_dim: int) -> None:
        super().__init__()
        vit = create_vit(lcfg.backbone, int(lcfg.img_size), str(lcfg.pretrained), int(lcfg.depth))
        # inside the pathway, calling the ViT embeds frames; its blocks are run one by one below
        vit.forward = types.MethodType(_embed_frames, vit)
        self.vit = vit
        self.img_size = int(lcfg.img_size)
        self.max_frames = int(lcfg.max_frames)
        self.temporal_resize = str(lcfg.temporal_resize)  # init_from: time tables of another frame count
        dim = vit.embed_dim
        heads = vit.blocks[0].attn.num_heads
        depth = len(vit.blocks)
        k = int(lcfg.insert_after)
        k = depth + k if k < 0 else k
        if not 0 <= k < depth:
            raise UserError(f"model.learner.insert_after={lcfg.insert_after} is outside the {depth} blocks "
                            f"of {lcfg.backbone} (use 0..{depth - 1}, or -1 for the last)")
        self.insert_after = k
        self.grid = tuple(vit.patch_embed.grid_size)  # (h, w)
        self.num_prefix = vit.num_prefix_tokens
        self.num_regions = int(lcfg.num_regions)
        self.time_embed = FrameEmbedding(self.max_frames, dim)  # time_embed.weight [T_max, C], zero at init
        self.temporal = (nn.ModuleList(TemporalAttention(dim, heads) for _ in range(depth))
                         if lcfg.divided_space_time else None)
        self.learner = RegionLearner(
            dim, heads, max_frames=self.max_frames, codebook_size=int(lcfg.codebook_size),
            code_dim=int(lcfg.code_dim), ema_decay=float(lcfg.ema_decay), ema_eps=float(lcfg.ema_eps),
            dead_code_threshold=float(lcfg.dead_code_threshold), commitment=float(lcfg.commitment),
            num_regions=self.num_regions, mask_norm=str(lcfg.mask_norm),
            interaction_layers=int(lcfg.interaction_layers))
        self.cls_head = nn.Linear(dim, embed_dim)
        self.region_pool = nn.Linear(dim, embed_dim, bias=False)
        nn.init.zeros_(self.region_pool.weight)  # video [CLS] starts as the frames' own [CLS]
        self.region_head = nn.Linear(dim, embed_dim)
        pcfg = getattr(vit, "pretrained_cfg", None) or {}
        mean = pcfg.get("mean", (0.485, 0.456, 0.406))
        std = pcfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> None:
        """This pathway's own checkpoint adaptation (as timm's ``checkpoint_filter_fn``), used
        by ``train.init_from``: a saved pathway's weights loaded strictly, temporal tables
        resized to ``max_frames``, temporal attention kept at its identity init when the
        source had none (:func:`regionvlp.region_learner.checkpoint.load_pathway_state`)."""
        load_pathway_state(self, state, temporal=self.temporal_resize)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, 3, H, W] -> normalised [B*T, 3, S, S] in the model's dtype."""
        B, T, _, H, W = frames.shape
        x = frames.reshape(B * T, 3, H, W).float().div_(255.0)  # [B*T, 3, H, W]
        if (H, W) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.time_embed.weight.dtype)

    @contextmanager
    def capture_masks(self) -> Iterator[list[torch.Tensor]]:
        """Inside the block, every forward appends the RegionLearner's masks
        [B, T, R, h, w] (normalised, on the patch grid) to the yielded list. A forward
        hook on ``self.learner``: the forward itself is unchanged and costs the same."""
        masks: list[torch.Tensor] = []
        h, w = self.grid

        def keep(module: nn.Module, args: tuple, out: LearnerOutput) -> None:
            B, T, R, _ = out.masks.shape
            masks.append(out.masks.detach().reshape(B, T, R, h, w))

        handle = self.learner.register_forward_hook(keep)
        try:
            yield masks
        finally:
            handle.remove()

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.vit.blocks[i]
        if self.vit.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, batch: dict) -> VideoOutput:
        frames = batch["frames"]
        if frames.dim() != 5 or frames.shape[2] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [B, T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        if T > self.max_frames:
            raise UserError(f"{T} frames per clip but model.learner.max_frames={self.max_frames}; "
                            f"set model.learner.max_frames >= {T}")
        vit = self.vit
        P, R = self.num_prefix, self.num_regions
        x = vit(self.preprocess(frames))  # [B*T, P+N, C] (_embed_frames)
        S, C = x.shape[1], x.shape[2]
        N = S - P
        if N != self.grid[0] * self.grid[1]:
            raise ValueError(f"expected {self.grid[0]}x{self.grid[1]} patch tokens, got {N} (patch dropout?)")
        x = self.time_embed(x.view(B, T, S, C)).view(B * T, S, C)
        out: LearnerOutput | None = None
        for i in range(len(vit.blocks)):
            if self.temporal is not None and T > 1:  # one frame: skipped, so 1-frame runs cost a plain ViT
                x = self.temporal[i](x.view(B, T, -1, C)).view(B * T, -1, C)
            x = self._block(i, x)
            if i == self.insert_after:
                out = self.learner(x[:, P:P + N].reshape(B, T, N, C), self.grid)
                x = torch.cat([x, out.regions.reshape(B * T, R, C)], dim=1)  # [B*T, P+N+R, C]
        assert out is not None
        x = vit.norm(x)  # [B*T, P+N+R, C]
        frame = vit.fc_norm(vit.pool(x[:, :P + N]))  # [B*T, C] the ViT's own summary per frame
        regions = x[:, P + N:].reshape(B, T, R, C)  # [B, T, R, C]
        cls = self.cls_head(frame.view(B, T, C).mean(1)) + self.region_pool(regions.mean(dim=(1, 2)))  # [B, D]
        region_tokens = self.region_head(regions.reshape(B, T * R, C))  # [B, T*R, D]
        aux = {"commitment": out.commitment} if self.learner.quantizer.commitment > 0 else {}
        logs = {"perplexity": out.perplexity, "codebook_usage": out.usage}  # 0-d tensors: no host sync
        return VideoOutput(
            cls=cls,
            regions=region_tokens,
            region_mask=torch.ones(B, T * R, dtype=torch.bool, device=cls.device),
            aux_losses=aux,
            logs=logs,
        )
