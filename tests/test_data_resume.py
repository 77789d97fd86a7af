"""Resume by position: every batch carries its consumer's position; a loader opened at
those positions continues with exactly the batches an uninterrupted epoch would have
given, without decoding anything before them (plain, compressed and sample-split shards)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from data_shards import clip_shards
from regionvlp.config import load_config
from regionvlp.data import build_loader
from regionvlp.data import decode as dec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_for(spec: str, *extra: str):
    return load_config(None, [f"data.train.urls=['{spec}']", "data.size=16", "data.num_frames=2",
                              "data.batch_size=2", "data.num_workers=2", "data.shuffle_buffer=5",
                              "data.max_words=8", *extra])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    paths = clip_shards(root, shards=3, per_shard=6)
    (root / "gz").mkdir()
    (root / "gz" / "shard-000.tar.gz").write_bytes(gzip.compress(paths[0].read_bytes()))
    return root


def epoch(cfg, tokenizer, **kw) -> list[dict]:
    return list(build_loader(cfg, "train", training=True, epoch=1, tokenizer=tokenizer, **kw))


def resume_after(batches: list[dict], k: int, num_workers: int) -> tuple[dict[int, dict], int]:
    """Positions after the first ``k`` batches, and the consumer due next."""
    positions: dict[int, dict] = {}
    for b in batches[:k]:
        positions[b["__position__"]["worker"]] = b["__position__"]
    last = batches[k - 1]["__position__"]["worker"]
    return positions, (last + 1) % max(1, num_workers)


def same(a: list[dict], b: list[dict]) -> None:
    assert [x["__key__"] for x in a] == [x["__key__"] for x in b]
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["frames"], y["frames"])  # same decode of the same bytes with the same random state


@pytest.mark.parametrize("spec,extra", [
    ("shard-{000..002}.tar", []),  # shards split over 2 workers
    ("shard-{000..002}.tar", ["data.num_workers=0"]),
    ("shard-000.tar", ["data.num_workers=2", "data.batch_size=1"]),  # 1 shard, 2 workers: samples split
    ("gz/shard-000.tar.gz", ["data.num_workers=0"]),  # compressed: reached by skipping headers
])
def test_loader_resumes_at_every_batch(shard_dir, tokenizer, spec, extra):
    cfg = cfg_for(str(shard_dir / spec), *extra)
    workers = int(cfg.data.num_workers)
    full = epoch(cfg, tokenizer)
    assert len(full) >= 3
    for k in range(1, len(full)):
        positions, nxt = resume_after(full, k, workers)
        rest = epoch(cfg, tokenizer, positions=positions, worker_offset=nxt)
        same(rest, full[k:])


def test_resume_decodes_only_what_comes_after(shard_dir, tokenizer, monkeypatch):
    cfg = cfg_for(str(shard_dir / "shard-{000..002}.tar"), "data.num_workers=0", "data.shuffle_buffer=4")
    full = epoch(cfg, tokenizer)  # 18 clips, batch 2: 9 batches
    calls = []
    real = dec.decode_video
    monkeypatch.setattr(dec, "decode_video", lambda *a, **k: calls.append(1) or real(*a, **k))
    positions, nxt = resume_after(full, 7, 0)
    rest = epoch(cfg, tokenizer, positions=positions, worker_offset=nxt)
    same(rest, full[7:])
    assert len(calls) == 4  # the 2 remaining batches of 2; none of the 14 clips before them
    pos = full[6]["__position__"]
    assert len(pos["buffer"]) == 4 and pos["cursor"][0] >= 1  # shuffle buffer by reference, reader in shard 1+


def test_bench_resume_reports_both_variants():
    from regionvlp.bench.resume import bench_resume

    out = bench_resume(samples=6, shard_size=4, frames=2, size=32, shuffle_buffer=2, seconds=0.5, repeats=1)
    assert out["bench"] == "resume" and out["baseline"] == "decode" and out["same_sample"] is True
    assert out["samples"] == 6 and out["shuffle_buffer"] == 2 and out["shards"] == 4  # 6 + 2 + 8 spare clips of 4
    assert out["position_per_s"] > 0 and out["decode_per_s"] > 0 and out["speedup"] > 0
