"""Region transformer semantics and a frozen detector inside whole-model training steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regionvlp.config import load_config
from regionvlp.detector import build_extractor, build_pathway
from regionvlp.detector.transformer import RegionTransformer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "detector.yaml"


def _batch(b=2, t=3, k=5, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, t, k, 2, generator=g) * 0.5
    mask = torch.rand(b, t, k, generator=g) > 0.4
    mask[0, 0] = False  # a frame where nothing survived
    return {
        "region_feats": torch.randn(b, t, k, f, generator=g),
        "region_boxes": torch.cat([xy, xy + 0.3], -1),
        "region_mask": mask,
    }


def _model(frame_local: bool, f=16, layers=2):
    torch.manual_seed(0)
    return RegionTransformer(feature_dim=f, hidden=32, layers=layers, heads=4, dropout=0.1, max_frames=4,
                             frame_local=frame_local, embed_dim=24).eval()


@pytest.mark.parametrize("frame_local", [False, True])
def test_padded_regions_change_nothing(frame_local):
    model = _model(frame_local)
    batch = _batch()
    out = model(batch)
    assert out.cls.shape == (2, 24) and out.regions.shape == (2, 15, 24)
    assert torch.equal(out.region_mask, batch["region_mask"].reshape(2, 15))
    poked = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["region_mask"]
    poked["region_feats"][pad] = 1e4 * torch.randn_like(poked["region_feats"][pad])
    poked["region_boxes"][pad] = torch.rand_like(poked["region_boxes"][pad])
    poked["region_feats"][0, 0, 0, 0] = float("nan")  # even garbage in padding (frame 0 is all padding)
    out2 = model(poked)
    assert torch.equal(out.cls, out2.cls)
    assert torch.equal(out.regions, out2.regions)
    assert (out.regions[~out.region_mask] == 0).all()
    # a real region does matter
    poked["region_feats"][batch["region_mask"]] += 1.0
    assert not torch.allclose(model(poked).cls, out.cls)


def test_no_region_at_all_is_finite_and_trains():
    model = _model(False).train()
    batch = _batch()
    batch["region_mask"][:] = False
    out = model(batch)
    assert torch.isfinite(out.cls).all() and torch.isfinite(out.regions).all()
    out.cls.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_frame_local_keeps_regions_within_their_frame():
    batch = _batch()
    batch["region_mask"][:] = True
    poked = {k: v.clone() for k, v in batch.items()}
    poked["region_feats"][:, 1] += 3.0  # change frame 1 only
    # one layer: regions see [CLS] too, which only carries other frames from the second layer on
    local, glob = _model(True, layers=1), _model(False, layers=1)
    a, b = local(batch), local(poked)
    k = batch["region_mask"].shape[-1]
    assert torch.allclose(a.regions[:, :k], b.regions[:, :k])  # frame 0 regions unchanged
    assert not torch.allclose(a.regions[:, k : 2 * k], b.regions[:, k : 2 * k])
    assert not torch.allclose(a.cls, b.cls)  # [CLS] sees every frame
    g1, g2 = glob(batch), glob(poked)
    assert not torch.allclose(g1.regions[:, :k], g2.regions[:, :k])  # without frame_local they mix


def test_missing_region_feats_is_a_user_error():
    from regionvlp.errors import UserError

    with pytest.raises(UserError, match="region_feats"):
        _model(False)({"frames": torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)})


def test_detector_bit_identical_after_whole_model_steps():
    """Pathway + text tower + loss trained through the frozen extractor: the detector
    (weights and BatchNorm buffers) does not move, and is nowhere in the model."""
    from regionvlp.model import build_batch_transform, build_model, prepare_batch

    cfg = load_config(TINY)
    model = build_model(cfg)
    extractor = build_batch_transform(cfg)
    model.extractor_ref = extractor  # even held as an attribute it is no child
    before = {k: v.clone() for k, v in extractor.detector.state_dict().items()}
    assert any("running_mean" in k for k in before)
    det_ids = {id(p) for p in extractor.detector.parameters()}
    assert not det_ids & {id(p) for p in model.parameters()}
    assert not any(k.startswith("extractor") or "backbone.body" in k for k in model.state_dict())

    from regionvlp.data import load_tokenizer, tokenize

    tok = load_tokenizer(cfg.model.text.name)
    captions = ["a red circle moves left", "a blue square", "a green triangle", "a cross"]
    ids, att = tokenize(tok, captions, cfg.data.max_words)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    extractor.train()
    for step in range(2):
        frames = torch.randint(0, 256, (4, 2, 3, 64, 64), dtype=torch.uint8, generator=g)
        batch = prepare_batch({"frames": frames, "input_ids": ids, "attention_mask": att}, extractor)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = extractor.detector.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not extractor.detector.training


def test_build_pathway_from_config():
    cfg = load_config(TINY)
    p = build_pathway(cfg)
    assert p.feature_dim == build_extractor(cfg).feature_dim == 1024
    assert p.proj.out_features == cfg.model.embed_dim


def test_frame_local_regions_see_cls():
    from regionvlp.detector.transformer import attention_mask

    mask = torch.ones(1, 2, 3, dtype=torch.bool)
    allowed = attention_mask(mask, frame_local=True)[0]  # [7, 7] tokens: CLS, frame 0 x3, frame 1 x3
    assert allowed[0].all()  # [CLS] sees everything
    assert allowed[1:, 0].all()  # every region sees [CLS]
    assert allowed[1, 1:4].all() and not allowed[1, 4:].any()  # and only its own frame's regions


def test_old_checkpoints_with_hand_written_blocks_load():
    model = _model(False)
    state = model.state_dict()
    old = {k.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
           .replace("temporal.pos_embed", "temporal").replace("cls.cls_token", "cls_token"): v
           for k, v in state.items()}
    assert "blocks.0.mlp.0.weight" in old and "temporal" in old
    fresh = RegionTransformer(feature_dim=16, hidden=32, layers=2, heads=4, max_frames=4, embed_dim=24)
    fresh.load_state_dict(old, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_init_from_a_local_vit_file(tmp_path):
    import timm

    from regionvlp.errors import UserError

    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, num_classes=0, img_size=32)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    base = [f"model.region_transformer.init={path}", "model.region_transformer.hidden=192",
            "model.region_transformer.heads=3"]
    model = build_pathway(load_config(TINY, base + ["model.region_transformer.layers=2"]))
    for i in range(2):
        for name, p in model.blocks[i].named_parameters():
            assert torch.equal(p, vit.blocks[i].get_parameter(name)), (i, name)
    assert torch.equal(model.norm.weight, vit.norm.weight)
    with pytest.raises(UserError, match="has 3 blocks"):
        build_pathway(load_config(TINY, base + ["model.region_transformer.layers=4"]))
    with pytest.raises(UserError, match="hidden must be the ViT's width"):
        build_pathway(load_config(TINY, base[:1] + ["model.region_transformer.hidden=64"]))
    with pytest.raises(UserError, match="neither a file nor a timm model name"):
        build_pathway(load_config(TINY, ["model.region_transformer.init=/no/such/vit.pth"]))


def test_region_transformer_forward_makes_no_host_syncs():
    from host_syncs import host_syncs

    model = _model(True).train()
    batch = _batch()
    n, names = host_syncs(lambda: model(batch))
    assert n == 0, names
    assert torch.is_tensor(model(batch).logs["regions_per_frame"])
