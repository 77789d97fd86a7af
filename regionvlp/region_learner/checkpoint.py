"""Loading a saved RegionLearner pathway into a (possibly different) config.

Strict: every key of the checkpoint must land in the model and every key of the model
must come from the checkpoint, else a :class:`UserError` lists the missing and
unexpected keys (the RegionLearner weights are never dropped silently). Two planned
differences are adapted instead of refused:

- the temporal tables (``time_embed.weight`` of the backbone and ``time_embed`` of the region interaction,
  ``[max_frames, C]``) are resized when ``max_frames`` changed (1 -> 4 -> 8):
  linear interpolation over the clip span (a single frame is repeated), or ``zeros``:
  copy the common frames and zero-fill the rest;
- temporal-attention weights (``temporal.*``) missing from an image-pretrained
  checkpoint keep their identity initialisation when ``divided_space_time`` is on.

The checkpoint may be the pathway's own ``state_dict`` or a whole model's (the
pathway's keys are found by their common prefix, e.g. ``pathway.`` or ``module.``).
Interaction layers saved before they were timm Blocks load under their new names
(:func:`regionvlp.region_learner.interaction.adapt_state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp.errors import UserError
from regionvlp.runtime import load_state_strict
from regionvlp.region_learner.interaction import adapt_state


TEMPORAL_RESIZE = ("interpolate", "zeros")
_ANCHOR = "learner.quantizer.embed"  # a key only a RegionLearner pathway has
_TIME_KEYS = ("time_embed.weight", "learner.interaction.time_embed")


def resize_time_embed(table: torch.Tensor, frames: int, mode: str = "interpolate") -> torch.Tensor:
    """[T0, C] -> [frames, C]."""
    if mode not in TEMPORAL_RESIZE:
        raise UserError(f"temporal resize mode must be one of {', '.join(TEMPORAL_RESIZE)}, got {mode!r}")
    t0 = table.shape[0]
    if t0 == frames:
        return table.clone()
    if mode == "zeros":
        out = table.new_zeros(frames, table.shape[1])
        n = min(t0, frames)
        out[:n] = table[:n]
        return out
    if t0 == 1:
        return table.expand(frames, -1).clone()
    src = table.float().t()[None]  # [1, C, T0]
    out = F.interpolate(src, size=frames, mode="linear", align_corners=True)[0].t()  # [frames, C]
    return out.to(table.dtype).contiguous()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, a torch checkpoint file (plain state dict or
    one nested under ``module``/``state_dict``/``model``, as DeepSpeed and others save),
    or a folder: its ``model.safetensors`` (a ``regionvlp export`` folder) or its only
    ``*.safetensors`` / ``*.pt`` / ``*.pth`` / ``*.bin`` file."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():  # a `regionvlp export` folder
        path = path / "model.safetensors"
    if path.is_dir():
        found = [p for ext in ("*.safetensors", "*.pt", "*.pth", "*.bin") for p in sorted(path.glob(ext))]
        if len(found) != 1:
            raise UserError(f"checkpoint folder {path} must hold exactly one weights file "
                            f"(*.safetensors, *.pt, *.pth, *.bin), found {len(found)}; pass the file")
        path = found[0]
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {' '.join(str(err).split())[:200]}") from None
    for key in ("module", "state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def pathway_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pathway's own keys out of a pathway or whole-model state dict."""
    anchors = [k for k in state if k == _ANCHOR or k.endswith("." + _ANCHOR)]
    if not anchors:
        raise UserError(f"the checkpoint holds no RegionLearner pathway (no '{_ANCHOR}' key); "
                        "was it saved from a model.regions=learned run?")
    if len(anchors) > 1:
        raise UserError(f"the checkpoint holds several RegionLearner pathways ({', '.join(anchors)}); "
                        "extract one state dict first")
    prefix = anchors[0][: -len(_ANCHOR)]
    return adapt_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def load_pathway_state(model: nn.Module, state: Mapping[str, torch.Tensor], *,
                       temporal: str = "interpolate") -> dict[str, list[str]]:
    """Strictly load ``state`` into a RegionLearner pathway (see the module doc).

    Returns ``{"resized": [...], "kept_init": [...]}`` naming the adapted keys.
    Raises :class:`UserError` listing missing/unexpected keys or shape mismatches."""
    state = dict(pathway_state(state))
    own = model.state_dict()
    kept_init = [k for k in own if k not in state and k.startswith("temporal.")]  # identity-initialised
    resized: list[str] = []
    for key in _TIME_KEYS:
        value, target = state.get(key), own.get(key)
        if value is not None and target is not None and value.dim() == 2 and value.shape[1] == target.shape[1] \
                and value.shape[0] != target.shape[0]:
            state[key] = resize_time_embed(value, target.shape[0], temporal)
            resized.append(key)
    load_state_strict(model, state, "checkpoint does not match the RegionLearner config (backbone, codebook_size, "
                                    "code_dim, num_regions, interaction_layers must be the same)",
                      allow_missing=("temporal.",))
    return {"resized": resized, "kept_init": kept_init}


def load_checkpoint(model: nn.Module, path: str | Path, *, temporal: str = "interpolate") -> dict[str, list[str]]:
    """:func:`read_state_dict` then :func:`load_pathway_state`."""
    return load_pathway_state(model, read_state_dict(path), temporal=temporal)
