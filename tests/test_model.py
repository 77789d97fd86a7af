"""The dual encoder with a tiny test pathway and a tiny random-init BERT saved to a folder."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from regionvlp.config import LossConfig, TextConfig, load_config
from regionvlp.model import DualEncoder, build_batch_transform, build_model, prepare_batch
from regionvlp.losses import AlignmentLoss, region_word_scores
from regionvlp.outputs import VideoOutput
from regionvlp.text import TextTower


pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 16


class TinyPathway(nn.Module):
    """frames uint8 [B, T, 3, H, W] -> 4 regions per frame from a 2x2 average pool."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.region = nn.Linear(3, dim)
        self.cls = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch) -> VideoOutput:
        frames = batch["frames"].float() / 255.0  # [B, T, 3, H, W]
        b, t = frames.shape[:2]
        pooled = nn.functional.adaptive_avg_pool2d(frames.flatten(0, 1), 2)  # [B*T, 3, 2, 2]
        regions = self.region(pooled.flatten(2).transpose(1, 2)).reshape(b, t * 4, -1)  # [B, T*4, D]
        mask = torch.ones(b, t * 4, dtype=torch.bool)
        mask[:, -1] = False  # one padded region per clip
        cls = self.cls(regions[:, :-1].mean(1))  # [B, D]
        aux = {"scale": (self.scale - 1.0).pow(2) + 0.25}
        return VideoOutput(cls=cls, regions=regions, region_mask=mask, aux_losses=aux, logs={"clips": float(b)})


@pytest.fixture(scope="module")
def tiny_bert_dir(minilm_dir, tmp_path_factory):
    """A 2-layer random-init BERT with the real MiniLM tokenizer, saved like a hub folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out


@pytest.fixture()
def model(tiny_bert_dir):
    torch.manual_seed(0)
    text = TextTower(OmegaConf.structured(TextConfig(name=str(tiny_bert_dir))), D)
    loss = AlignmentLoss(OmegaConf.structured(LossConfig(local_weight=0.5, chunk_size=2)))
    return DualEncoder(TinyPathway(), text, loss)


def make_batch(model, captions, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = model.text_tower.tokenizer(captions, padding="max_length", max_length=12, truncation=True,
                                     return_tensors="pt")
    blocks = torch.randint(0, 256, (len(captions), 2, 3, 2, 2), generator=g, dtype=torch.uint8)
    frames = blocks.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)  # [B, 2, 3, 8, 8] 2x2 colour blocks
    return {"frames": frames, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "caption": captions}


CAPTIONS = ["a red circle moves left", "a blue square", "green triangle rises slowly", "two shapes"]


def test_encoders_normalise(model):
    batch = make_batch(model, CAPTIONS)
    v = model.encode_video(batch)
    t = model.encode_text(batch["input_ids"], batch["attention_mask"])
    for x in (v.cls, v.regions, t.cls, t.words):
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))
    assert v.region_mask.dtype == torch.bool and t.word_mask.dtype == torch.bool
    assert t.word_mask.sum(1).tolist() == [5, 3, 4, 2]


def test_forward_terms_add_up_and_gradients_reach_both_towers(model):
    batch = make_batch(model, CAPTIONS)
    out = model(batch)
    assert {"loss", "global", "local", "aux_scale", "temperature", "clips"} <= set(out)
    torch.testing.assert_close(out["loss"], out["global"] + 0.5 * out["local"] + out["aux_scale"])
    assert out["aux_scale"].item() == pytest.approx(0.25)
    out["loss"].backward()
    assert model.pathway.region.weight.grad.abs().sum() > 0
    assert model.text_tower.proj.weight.grad.abs().sum() > 0
    assert model.text_tower.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_similarity_is_global_plus_local(model):
    batch = make_batch(model, CAPTIONS)
    with torch.no_grad():
        v = model.encode_video(batch)
        t = model.encode_text(batch["input_ids"], batch["attention_mask"])
    sim = model.similarity(v, t)
    assert sim.shape == (4, 4)
    s_vt, s_tv = region_word_scores(v.regions, v.region_mask, t.words, t.word_mask, 0.05, chunk_size=1)
    torch.testing.assert_close(sim, v.cls @ t.cls.T + 0.5 * 0.5 * (s_vt + s_tv))
    model.loss.local_weight = 0.0
    torch.testing.assert_close(model.similarity(v, t), v.cls @ t.cls.T)


def test_a_few_steps_fit_the_batch(model):
    batch = make_batch(model, CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for _ in range(20):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["global"] + out["local"]).item())
    assert history[-1] < 0.5 * history[0], history
    with torch.no_grad():
        v = model.encode_video(batch)
        t = model.encode_text(batch["input_ids"], batch["attention_mask"])
        sim = model.similarity(v, t)
    assert (sim.argmax(1) == torch.arange(4)).all()


def test_build_model_dispatches_on_regions(tiny_bert_dir):
    overrides = [f"model.text.name={tiny_bert_dir}", "model.embed_dim=16", "data.num_frames=2",
                 "model.learner.backbone=vit_tiny_patch16_224", "model.learner.img_size=32",
                 "model.learner.codebook_size=8", "model.learner.code_dim=8", "model.learner.num_regions=2",
                 "model.region_transformer.hidden=16", "model.region_transformer.layers=1",
                 "model.region_transformer.heads=2", "model.region_transformer.feature_dim=8"]
    learned = build_model(load_config(None, overrides + ["model.regions=learned"]))
    assert type(learned.pathway).__module__.startswith("regionvlp.region_learner")
    assert build_batch_transform(load_config(None, overrides + ["model.regions=learned"])) is None
    detector = build_model(load_config(None, overrides + ["model.regions=detector"]))
    assert type(detector.pathway).__module__.startswith("regionvlp.detector")
    with pytest.raises(Exception, match="chunk_size"):
        build_model(load_config(None, overrides + ["loss.chunk_size=0"]))


def test_prepare_batch_applies_transform_only_to_frames():
    calls = []

    def transform(frames):
        calls.append(frames.shape)
        return {"region_feats": torch.zeros(1, 2, 3, 4), "region_mask": torch.ones(1, 2, 3, dtype=torch.bool)}

    batch = {"frames": torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)}
    assert "region_feats" in prepare_batch(batch, transform) and len(calls) == 1
    prepare_batch(batch, transform)  # already has regions: untouched
    assert len(calls) == 1
    assert prepare_batch({"region_feats": 1}, None) == {"region_feats": 1}


def test_train_step_under_bf16_autocast_matches_fp32(model):
    """A whole train step (forward, loss, backward) under CPU bf16 autocast, the proxy for
    the trainer's GPU autocast, against fp32: the towers run in bf16 (their matmuls round
    to 8 mantissa bits), the loss in fp32, so the loss agrees within 2 % and every
    gradient points the same way (cosine > 0.99); the loss terms come back in fp32."""
    batch = make_batch(model, CAPTIONS)

    def step(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ref, ref_grads), (got, got_grads) = step(False), step(True)
    assert all(got[k].dtype == torch.float32 for k in ("loss", "global", "local"))
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)
    assert ref_grads.keys() == got_grads.keys()
    for name, want in ref_grads.items():
        if want.norm() > 1e-6:
            cos = torch.nn.functional.cosine_similarity(got_grads[name].flatten(), want.flatten(), dim=0)
            assert cos > 0.99, (name, float(cos))
