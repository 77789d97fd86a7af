"""Resume by position when the shards changed since the position was taken: each position
records the identity (URL, size, first-block hash) of the shards it names; a shard that
is no longer the same (another shard at its place in the order, or rewritten) is read
from its start with one warning naming it — never at a stale byte offset, never counted
as a corrupt shard. Unchanged shards still resume exactly."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from data_shards import clip_shards, encode_clip, write_tar
from regionvlp.config import load_config
from regionvlp.data import build_loader
from regionvlp.data.consumer import check_position, identity_change, shard_identity, shard_order
from regionvlp.data.loader import ClipDataset, ConsumerStream
from regionvlp.data.reader import ReadOptions, read_refs, tar_samples
from regionvlp.data.skips import SkipCounter
from regionvlp.data.sources import parse_specs
from regionvlp.errors import UserError
from regionvlp.train.data import read_loader_position

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TAKEN = 5  # samples taken before the position: with a buffer of 3 the reader is 8 in, inside the 2nd shard


def config(seed: int = 0):
    return load_config(None, [f"seed={seed}", "data.size=16", "data.num_frames=2", "data.shuffle_buffer=3",
                              "data.num_workers=0", "data.max_words=8", "data.retries=0"])


def stream(cfg, urls: list[str], saved: dict | None = None) -> ConsumerStream:
    ds = ClipDataset(cfg, parse_specs(urls), training=True, epoch=1, num_frames=None, tokenizer=None,
                     rank=0, world=1)
    return ConsumerStream(ds, 0, 1, saved)


def take(s: ConsumerStream, n: int) -> tuple[list[dict], dict]:
    """The first ``n`` samples and the position right after them, as a checkpoint keeps it."""
    it = s.samples()
    got = [next(it) for _ in range(n)]
    return got, json.loads(json.dumps(s.position()))


def other_shard(path: Path, prefix: str, count: int, pad: int = 0) -> Path:
    """A shard laid out unlike :func:`clip_shards`' (longer clips and captions); ``pad``
    random bytes in its first sample (``pad.bin``) put the first ``pad`` bytes inside
    one member's data, where no byte offset is a tar header."""
    clip = encode_clip(6, 16, 16, gop=3)
    samples = [{"__key__": f"{prefix}{i}", "mp4": clip, "txt": f"{prefix} caption number {i} " * 3,
                "json": {"status": "success"}} for i in range(count)]
    if pad:
        samples[0]["bin"] = random.Random(0).randbytes(pad)
    return write_tar(path, samples)


@pytest.fixture
def shards(tmp_path) -> list[str]:
    return [str(p) for p in clip_shards(tmp_path, shards=2, per_shard=6)]


def resume_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]


def test_unchanged_shards_resume_exactly(shards, caplog):
    cfg = config()
    full = list(stream(cfg, shards).samples())
    assert len(full) == 12
    for k in (1, TAKEN, 9):
        _, saved = take(stream(cfg, shards), k)
        assert saved["shards"] and all(v["size"] == Path(v["url"]).stat().st_size for v in saved["shards"].values())
        s = stream(cfg, shards, saved)
        rest = list(s.samples())
        assert [x["__key__"] for x in rest] == [x["__key__"] for x in full[k:]]
        for x, y in zip(rest, full[k:]):
            assert torch.equal(x["frames"], y["frames"])  # same bytes, same random state
        assert not s.counter.total
    assert not resume_warnings(caplog)


def test_position_from_before_identities_still_resumes(shards):
    cfg = config()
    full = list(stream(cfg, shards).samples())
    _, saved = take(stream(cfg, shards), TAKEN)
    del saved["shards"]  # as positions were saved before shard identities
    rest = list(stream(cfg, shards, saved).samples())
    assert [x["__key__"] for x in rest] == [x["__key__"] for x in full[TAKEN:]]


def insertion_before_cursor(shards: list[str], new: str) -> tuple[int, list[str]]:
    """A seed and a list with ``new`` inserted so that the epoch's shard order gets it
    right before the second shard of the old order (where the position will stand)."""
    for seed in range(200):
        old = shard_order(shards, seed=seed, epoch=1, shuffle=True)
        for i in range(len(shards) + 1):
            urls = shards[:i] + [new] + shards[i:]
            if shard_order(urls, seed=seed, epoch=1, shuffle=True) == [old[0], new, old[1]]:
                return seed, urls
    raise AssertionError("no seed puts the new shard before the cursor's")


def test_shard_inserted_before_the_cursor(shards, tmp_path, caplog):
    new = str(tmp_path / "extra" / "new.tar")
    seed, urls = insertion_before_cursor(shards, new)
    cfg = config(seed)
    first, saved = take(stream(cfg, shards), TAKEN)
    cursor_url = shard_order(shards, seed=seed, epoch=1, shuffle=True)[1]
    assert saved["cursor"][0] == 1 and saved["cursor"][1] > 0  # inside the second shard, at a byte offset
    other_shard(Path(new), "n", 5, pad=saved["cursor"][1] + 4096)  # no tar header at the saved offset
    caplog.set_level(logging.WARNING)
    s = stream(cfg, urls, saved)
    rest = list(s.samples())
    assert "corrupt_shard" not in s.counter.total and not s.counter.total
    warned = resume_warnings(caplog)
    assert len(warned) == 1 and "shard list changed" in warned[0] and new in warned[0] and cursor_url in warned[0]
    assert "reading it from its start" in warned[0]
    keys = [x["__key__"] for x in first + rest]
    want = {f"s{s}_{i}" for s in range(2) for i in range(6)} | {f"n{i}" for i in range(5)}
    assert set(keys) == want  # none lost; the cursor's shard is read again from its start


def test_cursor_shard_rewritten(shards, caplog):
    cfg = config()
    first, saved = take(stream(cfg, shards), TAKEN)
    assert saved["cursor"][0] == 1 and saved["cursor"][1] > 0
    cursor_url = shard_order(shards, seed=0, epoch=1, shuffle=True)[1]
    before = Path(cursor_url).stat().st_size
    other_shard(Path(cursor_url), "r", 4, pad=saved["cursor"][1] + 4096)  # same name, other content and size
    caplog.set_level(logging.WARNING)
    s = stream(cfg, shards, saved)
    rest = list(s.samples())
    assert not s.counter.total  # no corrupt_shard: nothing read at the stale offset
    warned = resume_warnings(caplog)
    assert len(warned) == 1 and cursor_url in warned[0] and f"size {before} -> " in warned[0]
    assert "reading it from its start" in warned[0]
    keys = [x["__key__"] for x in first + rest]
    first_shard = shard_order(shards, seed=0, epoch=1, shuffle=True)[0]
    s0 = Path(first_shard).stem[-1]
    assert {f"s{s0}_{i}" for i in range(6)} <= set(keys)  # the other shard's buffered samples kept
    assert {f"r{i}" for i in range(4)} <= set(keys[len(first):])  # the rewritten shard read whole


def test_rewrite_seen_without_identities(shards, caplog):
    """A position without identities (older checkpoint) into a rewritten shard: the byte
    offset holds no tar header, so the shard is read from its start (no corrupt_shard)."""
    cfg = config()
    _, saved = take(stream(cfg, shards), TAKEN)
    del saved["shards"]
    cursor_url = shard_order(shards, seed=0, epoch=1, shuffle=True)[1]
    other_shard(Path(cursor_url), "r", 4, pad=saved["cursor"][1] + 4096)  # the saved offset: inside r0's data
    caplog.set_level(logging.WARNING)
    s = stream(cfg, shards, saved)
    keys = [x["__key__"] for x in s.samples()]
    assert "corrupt_shard" not in s.counter.total
    assert {f"r{i}" for i in range(4)} <= set(keys)
    assert any("no tar header" in m and cursor_url in m for m in resume_warnings(caplog))


def test_identity_change_reasons():
    same = shard_identity("a.tar", 1024, b"x" * 512)
    assert identity_change(same, shard_identity("a.tar", 1024, b"x" * 512), "a.tar") is None
    assert identity_change(same, None, "a.tar") is None  # could not read it now: nothing to tell
    assert "size 1024 -> 2048" in identity_change(same, shard_identity("a.tar", 2048, b"x" * 512), "a.tar")
    assert "first tar block" in identity_change(same, shard_identity("a.tar", 1024, b"y" * 512), "a.tar")
    assert "first tar block" in identity_change(shard_identity("p", None, b"x"), shard_identity("p", None, b"y"), "p")
    assert "shard list changed" in identity_change(same, None, "b.tar")
    assert "no longer reach" in identity_change(same, None, None)


def test_hostile_positions_are_refused(shards, tmp_path, tokenizer, caplog):
    cfg = config()
    _, good = take(stream(cfg, shards), 2)
    assert check_position(good) is good
    bad = [
        "not a dict",
        {k: v for k, v in good.items() if k != "rng"},
        dict(good, cursor=[0, "12", 0, True]),
        dict(good, cursor=[0, -5, 0, True]),
        dict(good, buffer=[[0, 0, 0]]),
        dict(good, buffer=[[good["cursor"][0] + 5, 0, -1, True]]),
        dict(good, rng=[3, [1] * 10, None]),
        dict(good, shards={"0": {"url": 3, "size": 1, "head": "ab"}}),
        dict(good, shards={"x": {"url": "a", "size": 1, "head": "ab"}}),
        dict(good, shards=[]),
    ]
    for pos in bad:
        with pytest.raises(ValueError):
            check_position(pos)
    bcfg = load_config(None, [f"data.train.urls=['{shards[0]}']", "data.size=16", "data.num_frames=2",
                              "data.num_workers=0", "data.batch_size=2", "data.max_words=8"])
    with pytest.raises(UserError, match="data position of worker 0: .*cursor"):
        build_loader(bcfg, "train", training=True, tokenizer=tokenizer, positions={0: bad[2]})
    tag = tmp_path / "tag"
    tag.mkdir()
    (tag / "loader_rank0.json").write_text(json.dumps({"epoch": 0, "batch_in_epoch": 1, "world": 1, "num_workers": 1,
                                                       "next_worker": 0, "workers": {"0": bad[5]}}))
    caplog.set_level(logging.WARNING)
    assert read_loader_position(tag, 0) is None
    assert any("loader_rank0.json ignored" in r.getMessage() and "after the cursor" in r.getMessage()
               for r in caplog.records)


def test_refs_into_several_compressed_shards_are_all_read(shards, tmp_path):
    """Buffered samples in compressed shards are found by reading each shard from its
    start: every shard's wanted samples, not a count over all shards, ends that read."""
    gz = []
    for i, url in enumerate(shards):
        gz.append(tmp_path / "gz" / f"{i}.tar.gz")
        gz[-1].parent.mkdir(exist_ok=True)
        gz[-1].write_bytes(gzip.compress(Path(url).read_bytes()))
    raw = list(tar_samples([str(p) for p in gz], SkipCounter()))
    refs = [raw[1]["__ref__"], raw[7]["__ref__"], raw[10]["__ref__"]]  # 1 in the first shard, 2 in the second
    assert [r[0] for r in refs] == [0, 1, 1] and not any(r[3] for r in refs)
    got = read_refs(lambda pos: str(gz[pos]), refs, SkipCounter(), ReadOptions())
    assert [s["__key__"] if s else None for s in got] == [raw[i]["__key__"] for i in (1, 7, 10)]
