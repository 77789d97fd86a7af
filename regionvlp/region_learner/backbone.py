"""The timm ViT backbone: creation (random, timm weights, or a local file) and the
temporal attention used for divided space-time attention."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp.errors import UserError
from regionvlp.hub import cached_file, is_url
from regionvlp.runtime import load_state_strict


def create_vit(name: str, img_size: int, pretrained: str = "none", depth: int = 0) -> nn.Module:
    """A timm ``VisionTransformer`` without classifier (``num_classes=0``).

    ``pretrained``: ``none`` (random init), ``timm`` (timm's own weights: its cache,
    downloaded there when online), an ``http(s)://`` URL of a weights file (the torch hub
    cache, downloaded there when online; :mod:`regionvlp.hub`), or a path to a local checkpoint file
    (``.safetensors``/``.pth``/``.bin``/``.npz`` as timm reads them; position embeddings
    are resampled to ``img_size`` by timm's filter). ``depth > 0`` overrides the number
    of blocks (tiny test/CPU configs).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        hint = f" (e.g. {', '.join(near)})" if near else ""
        raise UserError(f"model.learner.backbone: '{name}' is not a timm model name{hint}")
    kwargs: dict = dict(img_size=img_size, num_classes=0)
    if depth > 0:
        kwargs["depth"] = depth
    not_vit = UserError(f"model.learner.backbone: '{name}' is not a timm VisionTransformer "
                        "(use e.g. vit_base_patch16_224)")
    if pretrained in ("none", "", None):
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:  # img_size/depth are ViT arguments
            raise not_vit from None
    elif pretrained == "timm":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # offline, no cache, no weights for this name
            detail = " ".join(str(err).split())[:200]
            raise UserError(
                f"could not load timm weights for '{name}' ({type(err).__name__}: {detail}); "
                "when offline, download them elsewhere and set model.learner.pretrained=/path/to/weights "
                "(or pretrained=none for random init)") from None
    else:
        if is_url(pretrained):
            pretrained = str(cached_file(pretrained, "model.learner.pretrained"))
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.learner.pretrained: no checkpoint file at {path} "
                            "(use none, timm, or a path to a weights file)")
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:
            raise not_vit from None
        if isinstance(model, VisionTransformer):
            _load_local(model, path, name)
    if not isinstance(model, VisionTransformer):
        raise not_vit
    return model


def _load_local(model: nn.Module, path: Path, name: str) -> None:
    """Strictly load an image-ViT checkpoint file (timm formats; position embeddings
    resampled to this model's grid by timm's filter; classifier weights ignored)."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        if path.suffix == ".npz":  # big_vision / JAX format
            model.load_pretrained(str(path))
            return
        state = checkpoint_filter_fn(load_state_dict(str(path)), model)
    except Exception as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"model.learner.pretrained: cannot read {path} as '{name}' weights: {detail}") from None
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head.") or k in own}
    load_state_strict(model, state, f"model.learner.pretrained: {path} does not load into '{name}' "
                                    "(check backbone and depth)")


class TemporalAttention(nn.Module):
    """Pre-norm self-attention across frames at each token position (divided space-time).

    The output projection starts at zero, so a fresh block is the identity and a
    pretrained image ViT computes exactly what it did per frame. Hand-written rather than
    timm's ``Attention`` because it differs: it carries its own pre-norm and residual,
    attends over the T frames at each token position (a [B*S, T] sequence, not the block's
    tokens) and zero-initialises its projection. The pathway skips it when T = 1.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, S, C] -> [B, T, S, C]."""
        B, T, S, C = x.shape
        y = self.norm(x).permute(0, 2, 1, 3).reshape(B * S, T, C)  # [B*S, T, C]
        qkv = self.qkv(y).reshape(B * S, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*S, h, T, C/h]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * S, T, C)
        y = self.proj(y).reshape(B, S, T, C).permute(0, 2, 1, 3)  # [B, T, S, C]
        return x + y
