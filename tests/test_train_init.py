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
    with pytest.raises(UserError, match="missing keys: " + dropped.replace(".", r"\.")):
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


def _export(model: torch.nn.Module, cfg, folder: Path) -> Path:
    """An export-like folder: model.safetensors + the run's config.yaml."""
    from safetensors.torch import save_file

    from regionvlp.config import to_yaml

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder


def _regions(frames: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"region_feats": torch.randn(2, frames, 4, 1024, generator=g),
            "region_boxes": torch.rand(2, frames, 4, 4, generator=g).sort(-1).values,
            "region_mask": torch.ones(2, frames, 4, dtype=torch.bool)}


@pytest.mark.parametrize("mode", ["zeros", "interpolate"])
def test_detector_init_from_fewer_frames_zero_fills_or_repeats_the_untrained_rows(tmp_path, mode) -> None:
    from regionvlp.train.finetune import init_weights

    assert not _model("detector").pathway.temporal.pos_embed.any()  # zero at init
    one_cfg = load_config(TINY / "detector.yaml", ["data.num_frames=1", "model.region_transformer.max_frames=8"])
    one = _model("detector", "data.num_frames=1", "model.region_transformer.max_frames=8")
    with torch.no_grad():  # as a checkpoint whose rows were trunc-normal at init: rows 1-7 never trained
        one.pathway.temporal.pos_embed.normal_(std=0.02)
    source = _export(one, one_cfg, tmp_path / "one_frame")
    eight = _model("detector", "data.num_frames=8", "model.region_transformer.max_frames=8",
                   f"model.region_transformer.temporal_resize={mode}")
    init_weights(eight, source)
    table, row0 = eight.pathway.temporal.pos_embed.detach(), one.pathway.temporal.pos_embed.detach()[0]
    if mode == "zeros":
        assert torch.equal(table[0], row0) and not table[1:].any()
    else:
        assert torch.equal(table, row0.expand(8, -1))
    one.eval(), eight.eval()
    with torch.no_grad():
        a, b = one.pathway(_regions(1)), eight.pathway(_regions(1))
    torch.testing.assert_close(b.cls, a.cls, rtol=0, atol=0)  # the same function at T = 1
    torch.testing.assert_close(b.regions, a.regions, rtol=0, atol=0)
