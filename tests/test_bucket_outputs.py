"""Shard writers into a bucket (moto_server S3 on loopback): each shard uploaded whole
after it is written locally, sizes.json last, an interrupted conversion resumed from the
bucket; `shards check` of the bucket equals the local conversion's counts."""

from __future__ import annotations

import json

from test_frame_shards import _coded_shards

from regionvlp import remote
from regionvlp.cli import main
from regionvlp.data.convert import convert_shards


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
