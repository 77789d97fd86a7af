"""The eval protocol stamped on every result, dual-softmax re-scoring against a
hand-computed example, test-time clip averaging, and results that do not depend on the
eval batch size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from regionvlp.config import load_config
from regionvlp.evaluation import dual_softmax, evaluate_model, retrieval_metrics
from regionvlp.evaluation.embed import encode_clips
from regionvlp.outputs import VideoOutput
from tests.test_evaluate import N_SAMPLES, TinyDual, batches, fake_tokenize, make_samples

PROTOCOL_KEYS = {"task", "dataset", "split", "eval_split", "clips", "captions", "frames", "sampling", "size",
                 "clips_per_video", "caption_mode", "similarity", "local_weight", "rescore",
                 "rescore_temperature", "ties", "checkpoint", "checkpoint_sha256"}


def test_dual_softmax_matches_a_hand_computed_3x3_example():
    sim = torch.tensor([[0.90, 0.20, 0.40],
                        [0.85, 0.84, 0.83],  # a hub video: close to every text
                        [0.10, 0.20, 0.50]])  # [video, text]; text j belongs to video j
    tau = 0.1
    t2v, v2t = dual_softmax(sim, tau)
    e = [[math.exp(v / tau) for v in row] for row in sim.tolist()]
    for i in range(3):
        for j in range(3):
            over_texts = e[i][j] / sum(e[i])  # softmax over the texts of video i
            over_videos = e[i][j] / sum(e[k][j] for k in range(3))  # over the videos of text j
            assert float(t2v[i, j]) == pytest.approx(sim[i, j].item() * over_texts, rel=1e-6)
            assert float(v2t[i, j]) == pytest.approx(sim[i, j].item() * over_videos, rel=1e-6)
    # text 2: raw, the hub video wins (0.83 > 0.50); re-scored, 0.5 * e^5 / (e^1 + e^2 + e^5) = 0.4681
    # beats 0.83 * e^8.3 / (e^8.5 + e^8.4 + e^8.3) = 0.2495
    assert float(t2v[2, 2]) == pytest.approx(0.4681, abs=1e-4) and float(t2v[1, 2]) == pytest.approx(0.2495, abs=1e-4)
    raw = retrieval_metrics(sim, torch.arange(3))
    rescored = retrieval_metrics(t2v, torch.arange(3), v2t)
    assert (raw["t2v_r1"], raw["v2t_r1"]) == (pytest.approx(200 / 3), pytest.approx(200 / 3))
    assert (rescored["t2v_r1"], rescored["v2t_r1"]) == (100.0, 100.0)


def _eval(tmp_path: Path, samples: list[dict], batch_size: int, *overrides: str) -> dict:
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "dataset.json").write_text(json.dumps({"name": "msrvtt", "split": "test_1ka", "counts": {}}))
    cfg = load_config(overrides=[f"data.val.urls=[\"{shards}/{{000000..000001}}.tar\"]", *overrides])
    return evaluate_model(TinyDual(), cfg, "val", device="cpu", loader=batches(samples, batch_size),
                          tokenize=fake_tokenize, progress=False)


def test_protocol_is_complete_and_reads_dataset_json(tmp_path):
    m = _eval(tmp_path, make_samples(N_SAMPLES), 2, "eval.rescore=dual_softmax", "data.num_frames=8")
    p = m["protocol"]
    assert set(p) == PROTOCOL_KEYS
    assert (p["dataset"], p["split"], p["eval_split"]) == ("msrvtt", "test_1ka", "val")
    assert (p["clips"], p["captions"]) == (m["num_videos"], m["num_texts"]) == (N_SAMPLES, 13)
    assert (p["frames"], p["sampling"], p["clips_per_video"], p["caption_mode"]) == (8, "uniform", 1, "all")
    assert p["rescore"] == "dual_softmax" and p["rescore_temperature"] == 0.01
    assert p["similarity"] == "global + λ·local" and p["local_weight"] == 1.0  # the config's λ (TinyDual has none)
    assert p["ties"].startswith("pessimistic")
    first = _eval(tmp_path, make_samples(N_SAMPLES), 2, "eval.captions=first")
    assert first["num_texts"] == N_SAMPLES and first["protocol"]["caption_mode"] == "first"
    assert first["protocol"]["rescore"] == "none" and first["protocol"]["rescore_temperature"] is None


def test_eval_batch_size_1_and_7_give_the_same_metrics(tmp_path):
    one = _eval(tmp_path, make_samples(N_SAMPLES), 1)
    seven = _eval(tmp_path, make_samples(N_SAMPLES), 7)
    for key, value in one.items():
        if isinstance(value, float):  # rank metrics: identical (no score is within 1e-6 of another here)
            assert seven[key] == value, key
    assert one["protocol"] == seven["protocol"]


def test_eval_batch_size_does_not_change_a_real_model_on_real_shards(tmp_path, minilm_dir):
    """The tiny detector pathway (frozen detector in the loop, batched) on synthetic shards."""
    from regionvlp.data.synth import synth
    from regionvlp.model import build_batch_transform, build_model

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "detector.yaml"
    urls = synth(tmp_path / "synth", videos=1, val_videos=N_SAMPLES, size=64, frames=4, shard_size=4,
                 progress=False)["val"]["urls"]
    results = []
    for batch in (1, 7):
        cfg = load_config(tiny, [f"data.val.urls={json.dumps([urls] if isinstance(urls, str) else urls)}", f"data.batch_size={batch}"])
        torch.manual_seed(0)
        model = build_model(cfg)
        results.append(evaluate_model(model, cfg, "val", batch_transform=build_batch_transform(cfg), device="cpu",
                                      progress=False))
    one, seven = results
    assert one["num_videos"] == seven["num_videos"] == N_SAMPLES
    for key in [k for k in one if k.startswith(("t2v_", "v2t_"))]:
        assert seven[key] == one[key], key  # ranks: the same; scores agree to ~1e-6 (reduction order)


class ClipModel(torch.nn.Module):
    """encode_video: one region per frame (the frame's mean pixel, 3-d), [CLS] their mean."""

    def encode_video(self, batch: dict) -> VideoOutput:
        frames = batch["frames"].float()  # [B, T, 3, H, W]
        regions = F.normalize(frames.mean((-1, -2)) + 1.0, dim=-1)  # [B, T, 3]
        return VideoOutput(cls=F.normalize(regions.mean(1), dim=-1), regions=regions,
                           region_mask=torch.ones(regions.shape[:2], dtype=torch.bool))


def test_clips_per_video_averages_evenly_spaced_clips():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 255, (2, 6, 3, 4, 4), generator=g, dtype=torch.uint8)  # 3 clips x 2 frames
    model = ClipModel()
    video = encode_clips(model, {"frames": frames}, None, torch.device("cpu"), 3)
    clips = [model.encode_video({"frames": frames[:, 2 * j: 2 * j + 2]}) for j in range(3)]
    want = F.normalize(torch.stack([c.cls for c in clips], 1).mean(1), dim=-1)
    torch.testing.assert_close(video.cls, want)
    assert video.regions.shape == (2, 6, 3) and video.region_mask.shape == (2, 6)
    torch.testing.assert_close(video.regions[:, 2:4], clips[1].regions)
    with pytest.raises(Exception, match="clips_per_video=4"):
        encode_clips(model, {"frames": frames}, None, torch.device("cpu"), 4)


def test_checkpoint_stamp_hashes_what_was_loaded(tmp_path):
    import hashlib

    from regionvlp.evaluation import checkpoint_stamp, loaded_weights

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights")
    stamp = checkpoint_stamp(str(export), loaded_weights(export))
    assert stamp == {"checkpoint": str(export), "checkpoint_sha256": hashlib.sha256(b"weights").hexdigest()}
    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tag / "client_state.done").write_text("")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"a")
    first = checkpoint_stamp("run", tag)["checkpoint_sha256"]
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"b")
    assert checkpoint_stamp("run", tag)["checkpoint_sha256"] != first  # the content, not the names


def test_compare_report_prints_each_runs_protocol(tmp_path):
    from regionvlp.report import RunResult, write_report

    runs = [RunResult(name=n, run_dir=str(tmp_path / n), val=[{"step": 1, "elapsed": 1.0, "t2v_r1": 10.0}],
                      loss=[(1, 2.0)], final={"t2v_r1": 10.0, "num_videos": 4, "protocol": {
                          "frames": 8, "rescore": "none", "checkpoint_sha256": f"sha-{n}"}})
            for n in ("detector", "learned")]
    write_report(runs, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Protocol" in text and "| checkpoint_sha256 | sha-detector | sha-learned |" in text
    assert "| frames | 8 | 8 |" in text
