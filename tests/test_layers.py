"""regionvlp.layers: the per-frame embedding and [CLS] token both pathways share, under
the state-dict names each pathway's checkpoints were saved with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regionvlp.config import load_config
from regionvlp.layers import ClsToken, FrameEmbedding

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def test_frame_embedding_adds_one_row_per_frame():
    emb = FrameEmbedding(4, 3, init="trunc_normal")
    assert emb.table.std() > 0 and emb.no_weight_decay() == {"weight"}
    x = torch.zeros(2, 3, 5, 3)  # [B, T, K, C]
    out = emb(x)
    for t in range(3):
        assert torch.equal(out[:, t], emb.weight[t].expand(2, 5, 3))
    named = FrameEmbedding(4, 3, param="pos_embed")
    assert list(named.state_dict()) == ["pos_embed"] and not named.pos_embed.any()  # zeros by default
    assert named(torch.ones(1, 2, 3)).shape == (1, 2, 3)  # [B, T, C]: no middle axis
    with pytest.raises(ValueError, match="init"):
        FrameEmbedding(2, 2, init="ones")


def test_cls_token_goes_first():
    cls = ClsToken(3)
    cls.cls_token.data.fill_(7.0)
    out = cls(torch.zeros(2, 4, 3))
    assert out.shape == (2, 5, 3) and torch.equal(out[:, 0], torch.full((2, 3), 7.0)) and not out[:, 1:].any()


@pytest.mark.parametrize("name, key", [("detector", "temporal.pos_embed"), ("learned", "time_embed.weight")])
def test_both_pathways_use_the_shared_table_under_their_saved_names(name, key):
    from regionvlp.model import build_pathway

    pathway = build_pathway(load_config(TINY / f"{name}.yaml"))
    owner = pathway.temporal if name == "detector" else pathway.time_embed
    assert isinstance(owner, FrameEmbedding)
    state = pathway.state_dict()
    assert key in state and state[key].shape[0] == 4  # max_frames of the tiny configs
    pathway.load_state_dict(state, strict=True)  # a checkpoint of the pathway loads back unchanged
