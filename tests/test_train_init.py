"""train.init_from: weights-only finetune loading is strict, and a RegionLearner
checkpoint loads into a config with another frame count without dropping any weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regionvlp.config import load_config
from regionvlp.errors import UserError
from regionvlp.model import build_model
from regionvlp.train.finetune import load_init_state

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _model(name: str, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(TINY / f"{name}.yaml", list(overrides)))


def test_learned_init_keeps_every_learner_weight_across_frame_counts() -> None:
    pretrained = _model("learned", "model.learner.max_frames=2", "data.num_frames=1")
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(0.5)  # distinguishable from the fresh init below
    state = pretrained.state_dict()
    finetune = _model("learned", "model.learner.max_frames=4", "data.num_frames=4")
    load_init_state(finetune, state, "pretrained")
    loaded = finetune.state_dict()
    resized = [k for k in state if loaded[k].shape != state[k].shape]
    assert resized and all("time" in k or "temporal" in k for k in resized)
    for key, value in state.items():
        if key not in resized:
            assert torch.equal(loaded[key], value), key
    learner_keys = [k for k in state if ".learner." in k and k not in resized]
    assert len(learner_keys) > 10  # quantizer, masks, interaction: all loaded as they were


def test_init_from_mismatch_is_an_error_naming_keys() -> None:
    source = _model("detector").state_dict()
    target = _model("detector")
    dropped = next(k for k in source if k.startswith("pathway."))
    broken = {k: v for k, v in source.items() if k != dropped}
    with pytest.raises(UserError, match="missing: " + dropped.replace(".", r"\.")):
        load_init_state(target, broken, "ckpt")
    with pytest.raises(UserError, match="unexpected"):
        load_init_state(target, {**source, "pathway.extra.weight": torch.zeros(1)}, "ckpt")
    # a learned checkpoint is no detector initialisation
    with pytest.raises(UserError):
        load_init_state(target, _model("learned").state_dict(), "ckpt")
    load_init_state(target, source, "ckpt")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.items())


def test_init_from_an_older_detector_checkpoint_adapts_its_names() -> None:
    """Checkpoints written before the region transformer used timm's Block name the MLP
    layers mlp.0 / mlp.3; the module's own load hook maps them, init_from included."""
    from regionvlp.detector.transformer import RENAMED_IN_BLOCK

    source = _model("detector").state_dict()
    old_names = {new: old for old, new in RENAMED_IN_BLOCK.items()}
    old = {}
    for k, v in source.items():
        for new, before in old_names.items():
            if k.startswith("pathway.") and f".{new}" in k:
                k = k.replace(f".{new}", f".{before}")
        old[k] = v
    assert old.keys() != source.keys()
    target = _model("detector")
    load_init_state(target, old, "old-ckpt")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.items())
