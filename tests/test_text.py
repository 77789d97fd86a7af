"""The text tower loads the real pretrained MiniLM from its folder, offline."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from regionvlp.config import TextConfig
from regionvlp.errors import UserError
from regionvlp.text import TextTower


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def no_network():
    """Any non-loopback connection during the module fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and "/" not in host:
            raise AssertionError(f"network access to {address}")
        return real_connect(self, address)

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", guarded)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def minilm(minilm_dir, no_network):
    cfg = OmegaConf.structured(TextConfig(name=str(minilm_dir), freeze_embeddings=True, freeze_layers=2))
    return TextTower(cfg, embed_dim=32).eval()


def test_loads_real_minilm_and_projects_every_token(minilm):
    enc = minilm.tokenizer(["a red circle moves left", "hi"], padding="max_length", max_length=10,
                           truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = minilm(enc["input_ids"], enc["attention_mask"])
    assert out.cls.shape == (2, 32) and out.words.shape == (2, 10, 32) and out.word_mask.shape == (2, 10)
    # words: real tokens without [CLS] / [SEP] / padding
    assert out.word_mask.sum(1).tolist() == [5, 1]
    ids = enc["input_ids"]
    assert not out.word_mask[ids == minilm.tokenizer.cls_token_id].any()
    assert not out.word_mask[ids == minilm.tokenizer.sep_token_id].any()
    assert not out.word_mask[enc["attention_mask"] == 0].any()
    torch.testing.assert_close(out.cls, out.words[:, 0])


def test_pretrained_weights_really_loaded(minilm):
    """Mean-pooled MiniLM sentence vectors (how the model was trained) rank a paraphrase
    above an unrelated sentence; random weights would not."""
    sents = ["a dog is running in the park", "a puppy runs across the grass", "the stock market fell today"]
    enc = minilm.tokenizer(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.encoder(**enc).last_hidden_state  # [3, L, H]
    m = enc["attention_mask"][..., None].float()
    emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_freezing_embeddings_and_lower_layers(minilm):
    enc = minilm.encoder
    assert not any(p.requires_grad for p in enc.embeddings.parameters())
    layers = enc.encoder.layer
    assert not any(p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[2:] for p in layer.parameters())
    assert all(p.requires_grad for p in minilm.proj.parameters())


def test_bad_freeze_and_missing_model_are_user_errors(minilm_dir, tmp_path, no_network, monkeypatch):
    with pytest.raises(UserError, match="freeze_layers=7.*6 layers"):
        TextTower(OmegaConf.structured(TextConfig(name=str(minilm_dir), freeze_layers=7)), 8)
    with pytest.raises(UserError, match="does not exist"):
        TextTower(OmegaConf.structured(TextConfig(name=str(tmp_path / "nope"))), 8)
    # a hub name with no local copy, offline: one error that says how to point at a folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="model.text.name to a local folder"):
        TextTower(OmegaConf.structured(TextConfig(name="regionvlp-tests/no-such-model")), 8)
    # a folder that holds no model
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model.text.name to a local folder"):
        TextTower(OmegaConf.structured(TextConfig(name=str(tmp_path / "empty"))), 8)


def test_distilbert_architecture_from_a_folder(minilm_dir, tmp_path, no_network):
    """The default model family (DistilBERT: no token types, `transformer.layer`), random
    init, tiny, saved like a hub folder: loads, freezes and projects the same way."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, hidden_dim=64, n_layers=3, n_heads=2,
                                     max_position_embeddings=32)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    tower = TextTower(OmegaConf.structured(TextConfig(name=str(tmp_path), freeze_embeddings=True,
                                                      freeze_layers=1)), 16)
    layers = tower.encoder.transformer.layer
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in tower.encoder.embeddings.parameters())
    enc = tower.tokenizer(["a small green cube"], padding="max_length", max_length=8, return_tensors="pt")
    out = tower(enc["input_ids"], enc["attention_mask"])
    assert out.words.shape == (1, 8, 16) and out.word_mask.sum().item() == 4
