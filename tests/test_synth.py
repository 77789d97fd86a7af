"""The synthetic world: deterministic, boxes exact, captions name the objects, splits disjoint."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from regionvlp.data.synth import (CLASSES, COLORS, MOTIONS, SHAPES, held_out_pairs, render_clip,
                                  synth)


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.tar"))}


def test_classes_contract():
    assert CLASSES[0] == "__background__"
    assert CLASSES[1:] == SHAPES and len(set(CLASSES)) == len(CLASSES)


def test_deterministic_per_seed_whatever_the_workers(tmp_path):
    a = synth(tmp_path / "a", videos=12, val_videos=4, seed=3, size=64, frames=4, shard_size=5,
              workers=1, progress=False)
    b = synth(tmp_path / "b", videos=12, val_videos=4, seed=3, size=64, frames=4, shard_size=5,
              workers=2, progress=False)
    c = synth(tmp_path / "c", videos=12, val_videos=4, seed=4, size=64, frames=4, shard_size=5,
              workers=1, progress=False)
    assert a["samples"] == 16 and a["skipped"] == {} and a["shards"] == 3 + 1
    assert a["train"]["shards"] == 3 and a["val"]["shards"] == 1
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db and len(da) == 4
    assert da != dc
    sizes = json.loads((tmp_path / "a" / "train" / "sizes.json").read_text())
    assert sizes == {"000000.tar": 5, "000001.tar": 5, "000002.tar": 2}
    assert json.loads((tmp_path / "a" / "val" / "sizes.json").read_text()) == {"000000.tar": 4}
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_sample_json_contract_and_mp4_decodes(tmp_path):
    import av

    synth(tmp_path, videos=6, val_videos=1, seed=0, size=64, frames=5, fps=10, shard_size=10,
          progress=False)
    samples = _read_tar(tmp_path / "train" / "000000.tar")
    assert sorted(samples) == [f"synth_train_{i:07d}" for i in range(6)]
    for key, s in samples.items():
        assert set(s) == {"mp4", "txt", "json"}
        meta = json.loads(s["json"])
        assert meta["status"] == "success"
        assert meta["caption"] == s["txt"].decode() == meta["captions"][0]
        assert len(meta["captions"]) >= 3 and len(set(meta["captions"])) == len(meta["captions"])
        assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (64, 64, 5, 10)
        n = len(meta["objects"])
        assert 1 <= n <= 3 and meta["labels"] == [o["label"] for o in meta["objects"]]
        assert len(meta["boxes"]) == 5 and all(len(frame) == n for frame in meta["boxes"])
        for obj in meta["objects"]:
            assert CLASSES[obj["label"]] == obj["shape"] and obj["motion"] in MOTIONS
            for caption in meta["captions"]:  # every phrasing names every object's shape and colour
                assert obj["shape"] in caption and obj["color"] in caption and obj["size"] in caption
        for frame in meta["boxes"]:
            for x1, y1, x2, y2 in frame:
                assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        with av.open(io.BytesIO(s["mp4"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
        # the encoded colours survive: mean colour over the object's pixels is near its colour
        clip = render_clip(0, "train", int(key[-7:]), size=64, frames=5)
        for j, obj in enumerate(clip.objects):
            pix = frames[0][clip.ids[0] == j].astype(float).mean(axis=0)
            assert np.abs(pix - np.array(COLORS[obj.color])).max() < 40, (key, obj, pix)


@pytest.mark.parametrize("size", [64, 128])
def test_boxes_hold_their_object_and_nothing_of_the_others(size):
    for index in range(40):
        clip = render_clip(11, "train", index, size=size, frames=6)
        for f in range(6):
            for j, obj in enumerate(clip.objects):
                x1, y1, x2, y2 = (int(v) for v in clip.boxes[f][j])
                own = clip.ids[f] == j
                assert own.sum() > 20  # big enough to detect
                inside = np.zeros_like(own)
                inside[y1:y2, x1:x2] = True
                assert own[inside].sum() == own.sum()  # every pixel of the object lies in its box
                assert own[y1:y2, x1:x1 + 1].any() and own[y1:y1 + 1, x1:x2].any()  # tight
                patch_ids = clip.ids[f, y1:y2, x1:x2]
                assert set(np.unique(patch_ids)) <= {-1, j}
                patch = clip.frames[f, y1:y2, x1:x2].reshape(-1, 3)
                for k, other in enumerate(clip.objects):
                    if k != j and other.color != obj.color:
                        assert not (patch == np.array(COLORS[other.color], np.uint8)).all(axis=1).any()
                # the object's own pixels carry its colour
                assert (clip.frames[f][own] == np.array(COLORS[obj.color], np.uint8)).all()


def test_motions_move_boxes_the_way_the_caption_says():
    seen = set()
    for index in range(60):
        clip = render_clip(5, "train", index, size=64, frames=4)
        for j, obj in enumerate(clip.objects):
            b0, b1 = np.array(clip.boxes[0][j]), np.array(clip.boxes[-1][j])
            c0, c1 = (b0[:2] + b0[2:]) / 2, (b1[:2] + b1[2:]) / 2
            w0, w1 = b0[2] - b0[0], b1[2] - b1[0]
            seen.add(obj.motion)
            if obj.motion == "left":
                assert c1[0] < c0[0] - 10
            elif obj.motion == "right":
                assert c1[0] > c0[0] + 10
            elif obj.motion == "up":
                assert c1[1] < c0[1] - 10
            elif obj.motion == "down":
                assert c1[1] > c0[1] + 10
            elif obj.motion == "grow":
                assert w1 > w0 + 4
            elif obj.motion == "shrink":
                assert w1 < w0 - 4
            else:
                assert np.allclose(b0, b1)
    assert seen == set(MOTIONS)


def test_compositional_split_is_disjoint(tmp_path):
    held = held_out_pairs(2)
    assert len(held) == len(SHAPES)
    assert len({c for _, c in held}) == len(SHAPES)  # one colour per shape, all different
    out = synth(tmp_path, videos=40, val_videos=15, seed=2, size=64, frames=2, shard_size=100,
                compositional=True, progress=False)
    assert out["compositional"] is True
    world = json.loads((tmp_path / "world.json").read_text())
    assert {tuple(p) for p in world["held_out_pairs"]} == held
    train_pairs, val_pairs = set(), set()
    for key, s in _read_tar(tmp_path / "train" / "000000.tar").items():
        pairs = {(o["shape"], o["color"]) for o in json.loads(s["json"])["objects"]}
        assert not pairs & held, key
        train_pairs |= pairs
    for key, s in _read_tar(tmp_path / "val" / "000000.tar").items():
        pairs = {(o["shape"], o["color"]) for o in json.loads(s["json"])["objects"]}
        assert pairs & held, key
        val_pairs |= pairs
    # every shape and every colour still shows up in training, just not in the held-out pairs
    assert {s for s, _ in train_pairs} == set(SHAPES)
    assert len({c for _, c in train_pairs}) >= len(COLORS) - 1


def test_cli_prints_one_json_summary_last(tmp_path, capsys):
    from regionvlp.cli import main

    assert main(["synth", str(tmp_path / "s"), "--videos", "3", "--val-videos", "2", "--size", "64",
                 "--frames", "2", "--seed", "1", "--workers", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[-1])
    assert summary["samples"] == 5 and summary["skipped"] == {} and summary["shards"] == 2
    assert main(["synth", str(tmp_path / "x"), "--videos", "2", "--size", "63"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "even" in captured.err and "Traceback" not in captured.err


def test_a_second_synth_into_a_held_out_is_refused(tmp_path):
    """OUT is locked while synth writes it (a second one would clear its splits)."""
    from regionvlp.errors import UserError
    from regionvlp.runfolder import FolderLock

    (tmp_path / "world").mkdir()
    with FolderLock(tmp_path / "world", "synth OUT"):  # another synth holds it
        with pytest.raises(UserError, match=r"synth OUT=.*world is in use by pid"):
            synth(tmp_path / "world", videos=2, val_videos=1, size=32, frames=2, progress=False)
    assert not list((tmp_path / "world").glob("*/*.tar"))  # nothing written, nothing cleared
    assert synth(tmp_path / "world", videos=2, val_videos=1, size=32, frames=2, progress=False)["samples"] == 3
