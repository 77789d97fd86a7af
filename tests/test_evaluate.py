"""Retrieval / multiple-choice metrics against hand-computed ranks, and the distributed
eval (2 gloo ranks over a set not divisible by the world size == 1 rank)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regionvlp.config import load_config
from regionvlp.evaluation import (
    evaluate_model,
    mc_accuracy,
    rank_metrics,
    retrieval_metrics,
    t2v_ranks,
    v2t_ranks,
)
from regionvlp.outputs import TextOutput, VideoOutput

# 3 videos x 4 captions; captions 0,1 belong to video 0, caption 2 to video 1, 3 to video 2
SIM = torch.tensor([
    [0.9, 0.1, 0.5, 0.2],
    [0.3, 0.2, 0.4, 0.4],
    [0.9, 0.8, 0.1, 0.6],
])
T2V = torch.tensor([0, 0, 1, 2])


def test_t2v_ranks_hand_computed_pessimistic_ties():
    # text 0: right 0.9, video 2 ties at 0.9 -> rank 2 (ties count against us)
    # text 1: right 0.1, both others above -> 3; text 2: 0.4 vs 0.5 above -> 2; text 3: best -> 1
    assert t2v_ranks(SIM, T2V).tolist() == [2, 3, 2, 1]


def test_v2t_ranks_best_caption_and_ties():
    # video 0: best own caption 0.9, no other text >= 0.9 -> 1
    # video 1: own 0.4, text 3 (video 2's) ties at 0.4 -> 2
    # video 2: own 0.6, texts 0 and 1 above -> 3
    assert v2t_ranks(SIM, T2V).tolist() == [1, 2, 3]


def test_retrieval_metrics_keys_and_values():
    m = retrieval_metrics(SIM, T2V)
    assert m["t2v_r1"] == pytest.approx(25.0)
    assert m["t2v_r5"] == m["t2v_r10"] == m["t2v_r50"] == 100.0
    assert m["t2v_medr"] == 2.0 and m["t2v_meanr"] == 2.0
    assert m["v2t_r1"] == pytest.approx(100 / 3)
    assert m["v2t_medr"] == 2.0 and m["v2t_meanr"] == 2.0
    assert m["num_videos"] == 3 and m["num_texts"] == 4


def test_ties_among_own_captions_do_not_hurt_v2t():
    sim = torch.tensor([[0.7, 0.7, 0.1], [0.2, 0.3, 0.9]])
    assert v2t_ranks(sim, torch.tensor([0, 0, 1])).tolist() == [1, 1]


def test_collapsed_model_gets_worst_ranks():
    sim = torch.ones(4, 6)
    t2v = torch.tensor([0, 0, 1, 2, 3, 3])
    assert t2v_ranks(sim, t2v).tolist() == [4] * 6
    # v2t: every other video's caption ties -> 1 + (6 - own)
    assert v2t_ranks(sim, t2v).tolist() == [5, 6, 6, 5]
    m = retrieval_metrics(sim, t2v)
    assert m["t2v_r1"] == 0.0 and m["v2t_r1"] == 0.0


def test_nan_scores_never_help():
    sim = torch.tensor([[float("nan"), 0.1], [0.5, 0.2]])
    # text 0's right video scores NaN -> ranked below video 1
    assert t2v_ranks(sim, torch.tensor([0, 1])).tolist() == [2, 1]


def test_medr_even_count_and_recall_at_k():
    m = rank_metrics(torch.tensor([1, 4, 6, 60]), "t2v")
    assert m["t2v_medr"] == 5.0
    assert m["t2v_r1"] == 25.0 and m["t2v_r5"] == 50.0 and m["t2v_r10"] == 75.0 and m["t2v_r50"] == 75.0
    assert m["t2v_meanr"] == pytest.approx(71 / 4)


def test_video_without_caption_is_an_error():
    with pytest.raises(ValueError, match="without a caption"):
        v2t_ranks(torch.rand(3, 2), torch.tensor([0, 2]))


def test_mc_accuracy_ties_wrong_and_ragged_options():
    scores = [torch.tensor([0.1, 0.9, 0.3]), torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.1, 0.0, -1.0])]
    assert mc_accuracy(scores, [1, 0, 0]) == pytest.approx(200 / 3)
    assert mc_accuracy(torch.tensor([[0.2, 0.1], [0.0, 1.0]]), torch.tensor([0, 0])) == 50.0
    with pytest.raises(ValueError):
        mc_accuracy([torch.tensor([0.1, 0.2])], [2])


# ------------------------------------------------------------ a small dual encoder
VOCAB = 50


def fake_tokenize(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word → id by a stable hash; [CLS]=1; pad 0 to the longest caption in the call."""
    rows = [[1] + [2 + sum(map(ord, w)) % (VOCAB - 2) for w in c.split()] for c in captions]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


class TinyDual(nn.Module):
    """DualEncoder interface: normalised outputs; similarity = global + 0.5 * local."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.video = nn.Parameter(torch.randn(6, 8, generator=g))
        self.words = nn.Parameter(torch.randn(VOCAB, 8, generator=g))

    def encode_video(self, batch: dict) -> VideoOutput:
        feats = batch["feats"]  # [B, R, 6]
        regions = F.normalize(feats @ self.video, dim=-1)  # [B, R, 8]
        mask = batch["region_mask"]  # [B, R]
        cls = F.normalize((regions * mask[..., None]).sum(1), dim=-1)  # [B, 8]
        return VideoOutput(cls=cls, regions=regions, region_mask=mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        words = F.normalize(self.words[input_ids], dim=-1)  # [B, L, 8]
        mask = attention_mask.bool()
        cls = F.normalize((words * mask[..., None]).sum(1), dim=-1)
        return TextOutput(cls=cls, words=words, word_mask=mask)

    def similarity(self, video: VideoOutput, text: TextOutput) -> torch.Tensor:
        glob = video.cls @ text.cls.T  # [Nv, Nt]
        rw = torch.einsum("vrd,tld->vtrl", video.regions, text.words)  # [Nv, Nt, R, L]
        rw = rw.masked_fill(~video.region_mask[:, None, :, None], -1e4)
        best = rw.amax(2)  # [Nv, Nt, L]
        m = text.word_mask[None].float()
        local = (best * m).sum(-1) / m.sum(-1)
        return glob + 0.5 * local


WORDS = "red blue green square circle moves left right up down slowly fast big small".split()


def make_samples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ncap = 1 + i % 3
        caps = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist()) for _ in range(ncap)]
        r = 2 + i % 2  # region count differs between samples
        meta: dict = {}
        if i % 2 == 0:  # every other sample is a multiple-choice question
            opts = [caps[0]] + [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist())
                                for _ in range(3)]
            meta = {"options": opts[1:2] + opts[:1] + opts[2:], "answer": 1}
        out.append({"__key__": f"clip{i:03d}", "feats": torch.randn(r, 6, generator=g), "captions": caps, "meta": meta})
    return out


def batches(samples: list[dict], batch_size: int):
    """Collate like the data loader: pad regions, keep the last partial batch."""
    for s in range(0, len(samples), batch_size):
        part = samples[s : s + batch_size]
        r = max(p["feats"].shape[0] for p in part)
        feats = torch.zeros(len(part), r, 6)
        mask = torch.zeros(len(part), r, dtype=torch.bool)
        for i, p in enumerate(part):
            feats[i, : p["feats"].shape[0]] = p["feats"]
            mask[i, : p["feats"].shape[0]] = True
        yield {"__key__": [p["__key__"] for p in part], "feats": feats, "region_mask": mask,
               "captions": [p["captions"] for p in part], "caption": [p["captions"][0] for p in part],
               "meta": [p["meta"] for p in part], "skipped": {"corrupt": 1} if s == 0 else {}}


@torch.no_grad()
def brute_force(samples: list[dict]) -> dict:
    model = TinyDual()
    videos = [model.encode_video(next(batches([p], 1))) for p in samples]
    caps = [(i, c) for i, p in enumerate(samples) for c in p["captions"]]
    texts = [model.encode_text(*fake_tokenize([c])) for _, c in caps]
    sim = torch.tensor([[model.similarity(v, t).item() for t in texts] for v in videos])
    out = retrieval_metrics(sim, torch.tensor([i for i, _ in caps]))
    scores, answers = [], []
    for v, p in zip(videos, samples):
        if p["meta"]:
            scores.append(torch.tensor([model.similarity(v, model.encode_text(*fake_tokenize([o]))).item()
                                        for o in p["meta"]["options"]]))
            answers.append(p["meta"]["answer"])
    out["mc_accuracy"] = mc_accuracy(scores, answers)
    return out


N_SAMPLES = 7  # not divisible by the world size


def run_eval(samples: list[dict], cache_dir=None) -> dict:
    cfg = load_config(overrides=["data.val.urls=[fake]"])
    return evaluate_model(TinyDual(), cfg, "val", device="cpu", loader=batches(samples, 2),
                          tokenize=fake_tokenize, cache_dir=cache_dir, progress=False)


class FrameDual(TinyDual):
    """TinyDual over real decoded frames: 4x4-pooled pixels per frame are the regions."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.video = nn.Parameter(torch.randn(3, 8, generator=g))
        self.words = nn.Parameter(torch.randn(30522, 8, generator=g))

    def encode_video(self, batch: dict) -> VideoOutput:
        frames = batch["frames"].float() / 255  # [B, T, 3, H, W]
        b, t = frames.shape[:2]
        cells = F.adaptive_avg_pool2d(frames.flatten(0, 1), 2).flatten(2).transpose(1, 2)  # [B*T, 4, 3]
        regions = F.normalize(cells @ self.video, dim=-1).reshape(b, t * 4, 8)  # [B, T*4, 8]
        mask = torch.ones(b, t * 4, dtype=torch.bool)
        return VideoOutput(cls=F.normalize(regions.mean(1), dim=-1), regions=regions, region_mask=mask)


def shard_cfg(shards: str, text_model: str, workers: int):
    cfg = load_config(overrides=[f"model.text.name={text_model}", "data.size=32", "data.num_frames=2",
                                 "data.batch_size=2", f"data.num_workers={workers}"])
    cfg.data.val.urls = [shards]
    return cfg


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        samples = make_samples(N_SAMPLES)
        results = {
            "strided": run_eval(samples[rank::world]),  # like a shard/worker split
            "one_rank_empty": run_eval(samples if rank == 0 else []),  # fewer shards than ranks
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_rank_eval_counts_every_sample_and_mc(tmp_path):
    m = run_eval(make_samples(N_SAMPLES))
    assert m["num_videos"] == N_SAMPLES
    assert m["num_texts"] == sum(1 + i % 3 for i in range(N_SAMPLES))
    assert m["mc_questions"] == 4
    assert 0.0 <= m["mc_accuracy"] <= 100.0 and m["mc_accuracy"] % 25 == 0
    assert m["skipped"] == {"corrupt": 1}
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_r50", "t2v_medr", "t2v_meanr",
                "v2t_r1", "v2t_r5", "v2t_r10", "v2t_r50", "v2t_medr", "v2t_meanr"):
        assert isinstance(m[key], float) and not math.isnan(m[key])
    # brute force, one sample and one caption at a time, gives the same numbers
    ref = brute_force(make_samples(N_SAMPLES))
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-6), key
    # embedding cache: second call reuses the file and gives the same numbers
    first = run_eval(make_samples(N_SAMPLES), cache_dir=tmp_path)
    assert not first["cached"] and list(tmp_path.glob("embeddings-val-*.safetensors"))
    again = run_eval([], cache_dir=tmp_path)  # loader would be empty: must come from the cache
    assert again["cached"]
    assert {k: again[k] for k in m if k != "cached"} == {k: m[k] for k in m if k != "cached"}


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """7 synthetic val clips (5 captions each) in 3 shards: not divisible by 2 ranks."""
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    summary = synth(out, videos=1, val_videos=N_SAMPLES, size=32, frames=4, shard_size=3, progress=False)
    assert summary["val"]["shards"] == 3
    return summary["val"]["urls"]


def test_real_loader_split_over_ranks_counts_each_clip_once(val_shards, minilm_dir, monkeypatch):
    """The data pipeline's rank split (3 shards over 2 ranks) merged as
    gather_embeddings does == 1 rank."""
    from regionvlp.data import build_loader
    from regionvlp.evaluation import Tokenize, embed_local, merge_embeddings, metrics_from_embeddings

    model = FrameDual()
    ref = evaluate_model(model, shard_cfg(val_shards, str(minilm_dir), workers=0), "val", device="cpu", progress=False)
    assert ref["num_videos"] == N_SAMPLES and ref["num_texts"] >= 2 * N_SAMPLES  # several captions each
    cfg = shard_cfg(val_shards, str(minilm_dir), workers=0)
    tok = Tokenize(cfg)
    import regionvlp.dist

    parts = []
    for rank in (0, 1):
        with monkeypatch.context() as m:  # the loader sees rank `rank` of 2
            m.setattr(regionvlp.dist, "rank", lambda: rank)
            m.setattr(regionvlp.dist, "world_size", lambda: 2)
            parts.append(embed_local(model, build_loader(cfg, "val", training=False, tokenizer=tok.tokenizer), tok))
    assert sorted(len(p.keys) for p in parts) == [3, 4]
    merged = merge_embeddings(parts)
    assert len(set(merged.keys)) == N_SAMPLES
    got = metrics_from_embeddings(model, merged)
    for key, value in ref.items():
        if key not in ("cached", "protocol"):  # the protocol is stamped by evaluate_model
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_two_rank_eval_equals_one_rank(tmp_path):
    import torch.multiprocessing as mp

    ref = run_eval(make_samples(N_SAMPLES))
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in ("strided", "one_rank_empty"):
            res = got[case]
            assert res["num_videos"] == ref["num_videos"] and res["num_texts"] == ref["num_texts"], case
            assert res["mc_questions"] == ref["mc_questions"]
            for key, value in ref.items():
                if key == "skipped":
                    continue
                assert res[key] == pytest.approx(value, abs=1e-9), (case, key)
    # skip counts are summed over ranks (each rank's first batch reports one)
    assert got["strided"]["skipped"] == {"corrupt": 2}


@pytest.mark.parametrize("name", [f"{d}_{m}" for d in ("msrvtt", "lsmdc", "msvd") for m in ("zeroshot", "finetune")])
def test_downstream_configs_load(name):
    root = Path(__file__).resolve().parents[1] / "configs" / "downstream"
    cfg = load_config(root / f"{name}.yaml")
    assert list(cfg.data.val.urls) and cfg.data.eval_sampling == "uniform" and cfg.data.num_frames == 8
    if name.endswith("finetune"):
        assert list(cfg.data.train.urls) and cfg.train.init_from != "none"
