"""Fewer shards than consumers (ranks × workers): every consumer keeps a disjoint,
balanced share of the samples; evaluation still sees every clip exactly once."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from data_shards import clip_shards
from regionvlp.config import load_config
from regionvlp.data import build_loader
from regionvlp.data.consumer import SampleShare, whole_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_for(spec: str, *extra: str):
    return load_config(None, [f"data.train.urls=['{spec}']", f"data.val.urls=['{spec}']", "data.size=16",
                              "data.num_frames=2", "data.batch_size=1", "data.num_workers=2",
                              "data.shuffle_buffer=4", "data.max_words=8", *extra])


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("few")
    clip_shards(root, shards=2, per_shard=7)  # 14 clips in 2 shards, for 2 ranks x 2 workers
    return root


def per_rank_keys(spec: str, tokenizer, monkeypatch, *, training: bool, epoch: int = 0, **extra):
    keys, batches = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = build_loader(cfg_for(spec, *extra.get("overrides", [])), "val" if not training else "train",
                              training=training, epoch=epoch, tokenizer=tokenizer)
        got = [b["__key__"] for b in loader]
        batches.append(len(got))
        keys.append([k for b in got for k in b])
    return keys, batches


def test_eval_one_shard_two_ranks_two_workers_every_clip_once(few_shards, tokenizer, monkeypatch, caplog):
    spec = str(few_shards / "shard-000.tar")  # 7 clips, 4 consumers
    with caplog.at_level(logging.WARNING, logger="regionvlp.data.loader"):
        keys, _ = per_rank_keys(spec, tokenizer, monkeypatch, training=False)
    seen = keys[0] + keys[1]
    assert Counter(seen) == Counter(f"s0_{i}" for i in range(7))  # each clip exactly once
    assert sorted(len(k) for k in keys) == [3, 4]  # balanced: 7 clips over 2 ranks
    said = [r for r in caplog.records if "keeps 1 sample in 4" in r.getMessage()]
    assert len(said) == 1  # logged once (rank 0), not per loader or worker


def test_training_equal_batches_disjoint_shares(few_shards, tokenizer, monkeypatch):
    spec = str(few_shards / "shard-{000..001}.tar")  # 14 clips, 4 consumers
    for epoch in (0, 1):
        keys, batches = per_rank_keys(spec, tokenizer, monkeypatch, training=True, epoch=epoch)
        seen = keys[0] + keys[1]
        assert len(seen) == len(set(seen)) == 12  # 14 // 4 * 4: the partial last block is left out
        assert batches == [6, 6]  # equal batches on every rank
    # samples (not shards) split also with one worker per rank
    keys, batches = per_rank_keys(str(few_shards / "shard-000.tar"), tokenizer, monkeypatch, training=True,
                                  overrides=["data.num_workers=0"])
    assert batches == [3, 3] and not set(keys[0]) & set(keys[1])


def test_share_keeps_every_count_th_and_whole_blocks():
    shares = [SampleShare(i, 3) for i in range(3)]
    kept = [[s.take() for _ in range(8)] for s in shares]
    assert [[i for i in k if i is not None] for k in kept] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    for count, expected in ((8, [0, 3]), (9, [0, 3, 6])):
        share = SampleShare(0, 3)

        def stream():
            for _ in range(count):
                index = share.take()
                if index is not None:
                    yield {"__index__": index}

        # 8 samples: 6 is in the partial block 6..8 and is left out; 9: the block is whole
        assert [s["__index__"] for s in whole_blocks(stream(), share)] == expected
