"""``train.init_from``: start a run from another run's weights (no optimizer, no step)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from regionvlp.checkpoint import consolidated_state_dict, find_checkpoint
from regionvlp.errors import UserError
from regionvlp.remote_run import local_weights
from regionvlp.runtime import load_state_strict


def init_weights(model: torch.nn.Module, source: str | Path) -> None:
    """``train.init_from``: weights only (no optimizer, no step) from an export folder,
    a run dir or a checkpoint, or one of those in a bucket (``s3://`` / ``gs://``,
    downloaded first); loaded before DeepSpeed wraps the model, so any ZeRO stage."""
    source = local_weights(str(source), "train.init_from")
    if (source / "model.safetensors").is_file():
        state = load_file(str(source / "model.safetensors"))
    elif source.is_dir():
        state = consolidated_state_dict(*find_checkpoint(source, None))
    else:
        raise UserError(f"train.init_from={source}: not an export folder or run directory")
    load_init_state(model, state, str(source), source_frames(source))


def source_frames(source: Path) -> int | None:
    """The most frames a clip of the source run had (its ``config.yaml``: ``data.num_frames``
    and ``train.frame_curriculum``), None when the folder has no readable config."""
    path = source / "config.yaml" if source.is_dir() else source.parent / "config.yaml"
    if not path.is_file() or path.stat().st_size > 1 << 20:
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
        frames = [int(data["data"]["num_frames"])]
        frames += [int(t) for _, t in (data.get("train", {}).get("frame_curriculum") or [])]
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return max(frames)


def load_init_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                    frames: int | None = None) -> None:
    """Strict weights-only load for finetuning. A RegionLearner pathway goes through its own
    loader (temporal embeddings resized to the new frame count, identity-initialised
    temporal attention kept); every other key must match by name and shape after the
    modules' own adaptation of older checkpoints (their load hooks rename what moved), so
    no pretrained weight is silently dropped. A retrieval checkpoint leaves a QA head at
    its fresh init. Mismatches are one UserError naming the keys. ``frames``: the most
    frames the source run's clips had, for a pathway whose frame table adapts to it."""
    rest = dict(state)
    skip = ["qa_head."] if not any(k.startswith("qa_head.") for k in rest) else []
    load_own = getattr(getattr(model, "pathway", None), "load_pretrained", None)
    adapt = getattr(getattr(model, "pathway", None), "checkpoint_filter", None)
    if callable(adapt):  # a pathway that adapts its part of the checkpoint, then loads strictly below
        own = adapt({k[len("pathway."):]: v for k, v in rest.items() if k.startswith("pathway.")}, frames)
        rest = {k: v for k, v in rest.items() if not k.startswith("pathway.")} | {f"pathway.{k}": v
                                                                                   for k, v in own.items()}
    if callable(load_own):  # a pathway that adapts older/other-sized checkpoints itself
        load_own({k[len("pathway."):]: v for k, v in state.items() if k.startswith("pathway.")})
        rest = {k: v for k, v in rest.items() if not k.startswith("pathway.")}
        skip.append("pathway.")
    load_state_strict(model, rest, f"train.init_from={source} does not match this config's model (use a checkpoint "
                                   "of the same pathway, text model and sizes)", allow_missing=tuple(skip))
