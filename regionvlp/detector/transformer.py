"""Region transformer: detector regions of T frames -> a video [CLS] and region tokens.

Each region token = Linear(F->H)(RoI feature) + Linear(7->H)([x1,y1,x2,y2,w,h,w*h])
+ learned temporal embedding of its frame; a learned [CLS] is prepended; L pre-norm
transformer layers follow (timm's ViT ``Block``; ``init`` loads them from a ViT, as
DemoVLP initialises its region transformer from ViT-B/16). Padded regions (mask False) are never attended to and their
outputs are zeroed, so their content cannot change anything. With ``frame_local`` a
region attends only to the regions of its own frame while [CLS] attends to all.

The temporal embedding and the [CLS] token are the shared layers
:class:`~regionvlp.layers.FrameEmbedding` (its table named ``pos_embed`` here, as saved
checkpoints name it) and :class:`~regionvlp.layers.ClsToken`: submodules whose own
``forward`` uses their parameter and returns a plain tensor, so DeepSpeed ZeRO-3's
per-module gather hooks see every use of them (a parameter used directly by a parent
whose forward returns a dataclass is not re-gathered for backward). Checkpoints with the
older top-level names (``temporal``, ``cls_token``) still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from regionvlp.errors import UserError
from regionvlp.hub import cached_file, is_url
from regionvlp.layers import ClsToken, FrameEmbedding
from regionvlp.outputs import VideoOutput
from regionvlp.runtime import load_state_strict


def box_vector(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] normalised x1,y1,x2,y2 -> [..., 7] x1,y1,x2,y2,w,h,w*h."""
    wh = boxes[..., 2:] - boxes[..., :2]  # [..., 2]
    return torch.cat([boxes, wh, wh[..., :1] * wh[..., 1:]], dim=-1)


def make_block(dim: int, heads: int, mlp_ratio: float, dropout: float) -> nn.Module:
    """timm's pre-norm ViT ``Block`` (qkv bias, GELU MLP, LayerNorm eps 1e-6): the same layer,
    and the same parameter names, as a ViT's blocks, so ``init`` loads them one to one. The
    padding/frame mask goes in as its boolean ``attn_mask`` (True = may attend). Dropout:
    on attention weights, after the attention projection, inside and after the MLP."""
    from timm.models.vision_transformer import Block

    return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout)


def attention_mask(region_mask: torch.Tensor, frame_local: bool) -> torch.Tensor:
    """Allowed (query, key) pairs [B, 1+T*K, 1+T*K] for tokens [CLS, regions of frame 0, 1, ...].

    Keys: [CLS] and real regions only. Every query also sees itself, so a row is never
    empty (no NaN even when no region survived). ``frame_local``: a region query only
    sees [CLS] and the regions of its own frame (DemoVLP's per-frame attention); [CLS]
    sees everything real.
    """
    b, t, k = region_mask.shape
    dev = region_mask.device
    real = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), region_mask.reshape(b, t * k)], 1)  # [B, N]
    allowed = real[:, None, :].expand(b, 1 + t * k, 1 + t * k)  # [B, N, N]
    if frame_local:
        frame = torch.cat([torch.full((1,), -1, device=dev), torch.arange(t, device=dev).repeat_interleave(k)])
        same = frame[:, None] == frame[None, :]  # [N, N]
        is_cls_q, is_cls_k = frame[:, None] == -1, frame[None, :] == -1  # [N, 1], [1, N]
        allowed = allowed & (same | is_cls_q | is_cls_k)[None]
    eye = torch.eye(1 + t * k, dtype=torch.bool, device=dev)[None]
    return allowed | eye


TEMPORAL_RESIZE = ("zeros", "interpolate")


def adapt_temporal(table: torch.Tensor, source_frames: int | None, max_frames: int, clip_frames: int,
                   mode: str = "zeros") -> torch.Tensor:
    """A source run's frame table [T0_max, H] -> [max_frames, H]: its first
    ``source_frames`` rows (the ones its clips trained) copied (``zeros``) or linearly
    resampled over ``clip_frames`` rows (``interpolate``; one row is repeated); every
    other row zero."""
    if mode not in TEMPORAL_RESIZE:
        raise UserError(f"model.region_transformer.temporal_resize is {mode!r}; choose one of "
                        f"{', '.join(TEMPORAL_RESIZE)}")
    trained = min(source_frames or table.shape[0], table.shape[0])
    rows = table[:trained].float()  # [T0, H]
    out = torch.zeros(max_frames, table.shape[1])  # [T_max, H]
    if mode == "zeros" or trained == clip_frames:
        n = min(trained, max_frames)
        out[:n] = rows[:n]
    elif trained == 1:
        out[:clip_frames] = rows.expand(clip_frames, -1)
    else:
        resampled = F.interpolate(rows.t()[None], size=clip_frames, mode="linear", align_corners=True)  # [1, H, T]
        out[:clip_frames] = resampled[0].t()
    return out.to(table.dtype)


# top-level parameter names of older checkpoints -> their submodule names now
RENAMED = {"temporal": "temporal.pos_embed", "cls_token": "cls.cls_token"}
# inside each block: the hand-written MLP of older checkpoints -> timm's Mlp
RENAMED_IN_BLOCK = {"mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


class RegionTransformer(nn.Module):
    """``forward(batch) -> VideoOutput`` from ``region_feats`` [B,T,K,F], ``region_boxes`` [B,T,K,4],
    ``region_mask`` [B,T,K]."""

    def __init__(self, feature_dim: int = 1024, hidden: int = 768, layers: int = 4, heads: int = 12,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, max_frames: int = 16,
                 frame_local: bool = False, embed_dim: int = 256, temporal_resize: str = "zeros",
                 clip_frames: int | None = None) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.max_frames = max_frames
        self.temporal_resize = temporal_resize  # zeros | interpolate: rows of a checkpoint with fewer frames
        self.clip_frames = min(clip_frames or max_frames, max_frames)  # frames this run's clips have (at most)
        self.frame_local = frame_local
        self.feat_proj = nn.Linear(feature_dim, hidden)
        self.box_proj = nn.Linear(7, hidden)
        # temporal.pos_embed [T_max, H], zero at init (as Frozen-in-Time and DemoVLP): a row no
        # clip reached stays zero, so a run with more frames starts from the fewer-frame run's function
        self.temporal = FrameEmbedding(max_frames, hidden, param="pos_embed")
        self.cls = ClsToken(hidden)  # cls.cls_token [1, 1, H]
        self.input_norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(make_block(hidden, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, embed_dim)
        nn.init.trunc_normal_(self.cls.cls_token, std=0.02)  # temporal.pos_embed stays zero

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoint adaptation (as timm's ``checkpoint_filter_fn``): older names load."""
        for old, new in RENAMED.items():  # checkpoints written before the submodules existed
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
            for old, new in RENAMED_IN_BLOCK.items():  # the hand-written blocks before timm's
                if f".{old}" in key:
                    state_dict[key.replace(f".{old}", f".{new}")] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def checkpoint_filter(self, state: dict[str, torch.Tensor], source_frames: int | None = None
                          ) -> dict[str, torch.Tensor]:
        """``train.init_from`` adaptation (as timm's ``checkpoint_filter_fn``): the temporal
        table of a source run with fewer frames (``source_frames``: the most frames its clips
        had; None: every row of its table) becomes this run's: ``temporal_resize: zeros``
        keeps the source's first ``source_frames`` rows and zero-fills the rest (rows no clip
        reached are untrained), ``interpolate`` resamples them over this run's clip frames.
        The result is then loaded strictly."""
        state = dict(state)
        for old, new in RENAMED.items():
            if old in state and new not in state:
                state[new] = state.pop(old)
        table = state.get("temporal.pos_embed")
        if table is not None and table.dim() == 2 and table.shape[1] == self.temporal.pos_embed.shape[1]:
            state["temporal.pos_embed"] = adapt_temporal(table, source_frames, self.max_frames,
                                                         self.clip_frames, self.temporal_resize)
        return state

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
        allowed = allowed[:, None]  # [B, 1, N, N] for every head
        for blk in self.blocks:
            x = blk(x, attn_mask=allowed)
        x = self.proj(self.norm(x))  # [B, 1+T*K, D]
        region_mask = mask.reshape(b, t * k)  # [B, T*K]
        regions = x[:, 1:] * region_mask[..., None].to(x.dtype)  # padded outputs are zero
        return VideoOutput(
            cls=x[:, 0],
            regions=regions,
            region_mask=region_mask,
            logs={"regions_per_frame": mask.sum(dtype=torch.float32) / max(b * t, 1)},  # 0-d, no host sync
        )


def vit_state(source: str) -> dict[str, torch.Tensor]:
    """A ViT's weights: a timm model name (timm's pretrained weights: its cache, downloaded
    there when online; never when offline), an ``http(s)://`` URL of a weights file (the
    torch hub cache, :mod:`regionvlp.hub`) or a local file (``.safetensors``/``.pth``/``.bin``,
    timm-readable)."""
    import timm

    if is_url(source):
        source = str(cached_file(source, "model.region_transformer.init"))
    path = Path(source).expanduser()
    if path.is_file():
        from timm.models import load_state_dict

        try:
            return dict(load_state_dict(str(path)))
        except Exception as err:
            raise UserError(f"model.region_transformer.init: cannot read {path}: {' '.join(str(err).split())[:200]}"
                            ) from None
    if not timm.is_model(source):
        raise UserError(f"model.region_transformer.init: '{source}' is neither a file nor a timm model name "
                        "(e.g. vit_base_patch16_224, or none)")
    try:
        return timm.create_model(source, pretrained=True, num_classes=0).state_dict()
    except Exception as err:  # offline, not cached
        raise UserError(f"model.region_transformer.init: no weights for '{source}' on this machine "
                        f"({type(err).__name__}); put them in the timm/HF cache or pass a local file") from None


def init_from_vit(model: RegionTransformer, source: str) -> list[str]:
    """Load ViT blocks 0..L-1 (and the ViT's final ``norm``) into the region transformer's
    ``blocks`` / ``norm``, strictly: every parameter of those must come from the ViT with the
    same shape (hidden = the ViT's width; set ``heads`` to the ViT's too). Returns the keys."""
    state = vit_state(source)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(("blocks.", "norm."))}
    vit_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if vit_blocks < len(model.blocks):
        raise UserError(f"model.region_transformer.init: {source} has {vit_blocks} blocks but "
                        f"model.region_transformer.layers is {len(model.blocks)}; use layers <= {vit_blocks}")
    rest = tuple({k.split(".")[0] + "." for k in model.state_dict() if k not in own})  # keep their init
    load_state_strict(model, {k: state[k] for k in own if k in state},
                      f"model.region_transformer.init: {source} does not fit the region transformer "
                      "(hidden must be the ViT's width)", allow_missing=rest)
    return sorted(own)


def clip_frames(cfg: Any) -> int:
    """The most frames a clip of the run ``cfg`` has (``data.num_frames``, ``train.frame_curriculum``)."""
    return max([int(cfg.data.num_frames)] + [int(t) for _, t in (cfg.train.frame_curriculum or [])])


def build_pathway(cfg: Any) -> RegionTransformer:
    """The detector pathway's trainable part (reads region_feats/boxes/mask from the batch);
    blocks from a ViT when ``model.region_transformer.init`` names one."""
    r = cfg.model.region_transformer
    model = RegionTransformer(
        feature_dim=r.feature_dim, hidden=r.hidden, layers=r.layers, heads=r.heads, mlp_ratio=r.mlp_ratio,
        dropout=r.dropout, max_frames=r.max_frames, frame_local=r.frame_local, embed_dim=cfg.model.embed_dim,
        temporal_resize=str(r.temporal_resize), clip_frames=clip_frames(cfg),
    )
    if str(r.init).strip().lower() not in ("none", "", "null"):
        init_from_vit(model, str(r.init))
    return model
