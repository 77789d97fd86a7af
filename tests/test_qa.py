"""Open-ended video QA: samples and bad ones, the vocabulary, synthetic QA, the head's
host syncs, tiny runs of both pathways against the majority baseline, export ->
load_model -> answer, evaluation exactly once over 2 ranks, shards write --qa."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data_shards import encode_clip, write_tar
from regionvlp.config import load_config
from regionvlp.data.qa import QAVocab, load_vocab, qa_pairs, question_type
from regionvlp.errors import UserError
from regionvlp.qa.metrics import qa_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qa_shards(tmp_path_factory) -> Path:
    """48 train clips (shards of 8), 12 val clips in 3 shards (5, 5, 2): QA pairs in every json."""
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("qa_synth")
    synth(out / "train_set", videos=48, val_videos=0, size=64, frames=4, shard_size=8, qa=True, progress=False)
    synth(out / "val_set", videos=1, val_videos=12, size=64, frames=4, shard_size=5, qa=True, progress=False)
    return out


def _urls(root: Path, n: int) -> str:
    return "[" + ",".join(f'"{root}/{i:06d}.tar"' for i in range(n)) + "]"


def qa_cfg(pathway: str, qa_shards: Path, run: Path, *extra: str):
    return load_config(TINY / f"qa_{pathway}.yaml", [
        f"data.train.urls={_urls(qa_shards / 'train_set' / 'train', 6)}",
        f"data.val.urls={_urls(qa_shards / 'val_set' / 'val', 3)}", f"run.out_dir={run}", *extra])


# ------------------------------------------------------------------- pure parts
def test_pairs_question_types_and_metrics():
    pairs, bad = qa_pairs({"qa": [{"question": " what  is it? ", "answer": " Red "}, {"question": "", "answer": "x"},
                                  {"question": "who?"}, "nope"]})
    assert [(p.question, p.answer) for p in pairs] == [("what is it?", "red")]
    assert len(bad) == 3
    top, _ = qa_pairs({"question": "How many?", "answer": 2})
    assert [(p.question, p.answer) for p in top] == [("How many?", "2")]
    assert qa_pairs({"caption": "no qa"}) == ([], [])
    kinds = [question_type(q) for q in ("What is", "who", "HOW many", "when?", "where does", "which shape", "")]
    assert kinds == ["what", "who", "how", "when", "where", "other", "other"]
    m = qa_metrics(["red", "two", "up"], ["red", "one", "up"], ["what color", "how many", "where"], majority="one")
    assert m["qa_accuracy"] == pytest.approx(200 / 3) and m["qa_majority_accuracy"] == pytest.approx(100 / 3)
    assert m["qa_accuracy_how"] == 0.0 and m["qa_accuracy_what"] == 100.0 and m["qa_accuracy_who"] is None
    assert m["qa_count_where"] == 1 and m["num_questions"] == 3


def test_qa_samples_decode_bad_ones_skipped_and_counted(tmp_path, minilm_dir):
    from regionvlp.data import build_loader

    clip = encode_clip(4, 32, 32, gop=2)
    samples = [
        {"__key__": "a", "mp4": clip, "txt": "cap", "json": {"qa": [
            {"question": "what color is it?", "answer": "red"}, {"question": "how many?", "answer": "two"},
            {"question": "who is it?"}]}},  # missing answer: that pair skipped
        {"__key__": "b", "mp4": clip, "json": {"question": "where does it go?", "answer": "left"}},  # no caption
        {"__key__": "c", "mp4": clip, "json": {"qa": [{"question": "  ", "answer": "x"}]}},  # empty question
        {"__key__": "d", "mp4": clip, "txt": "only a caption"},  # no QA at all
        {"__key__": "e", "mp4": clip, "json": {"qa": [{"question": "what is it?", "answer": "zebra"}]}},  # OOV
    ]
    shard = write_tar(tmp_path / "qa.tar", samples)
    QAVocab(["red", "two", "left"], [3, 2, 1]).save(tmp_path / "v.json")
    over = [f"data.val.urls=[{shard}]", f"data.train.urls=[{shard}]", f"model.text.name={minilm_dir}", "data.size=32",
            "data.num_frames=2", "data.num_workers=0", "data.batch_size=8", "data.shuffle_buffer=0",
            "qa.enabled=true", f"qa.vocab={tmp_path / 'v.json'}"]
    cfg = load_config(overrides=over)
    batches = list(build_loader(cfg, "val", training=False))
    assert len(batches) == 1
    b = batches[0]
    assert [(k, q, a) for k, q, a in zip(b["__key__"], b["question"], b["answer"])] == [
        ("a", "what color is it?", "red"), ("a", "how many?", "two"), ("b", "where does it go?", "left"),
        ("e", "what is it?", "zebra")]
    assert b["answer_ids"].tolist() == [0, 1, 2, -1]  # out of vocabulary: kept in eval, never predictable
    assert b["frames"].shape[:2] == (4, 2) and b["input_ids"].shape[0] == 4 and b["qa_index"] == [0, 1, 0, 0]
    assert b["skipped"] == {"bad_qa": 2, "no_qa": 1}
    cfg.data.batch_size = 1
    train = list(build_loader(cfg, "train", training=True))  # one pair per clip visit; OOV skipped
    assert sorted(x["__key__"][0] for x in train) == ["a", "b"]
    assert sum(sum(x["skipped"].values()) for x in train) == 4
    assert {k for x in train for k in x["skipped"]} == {"bad_qa", "no_qa", "qa_answer_not_in_vocab"}
    cfg.data.qa_pairs_per_visit = "all"  # every in-vocabulary pair of a clip per visit (DemoVLP's epochs)
    every = list(build_loader(cfg, "train", training=True))
    assert sorted((x["__key__"][0], x["question"][0]) for x in every) == [
        ("a", "how many?"), ("a", "what color is it?"), ("b", "where does it go?")]


def test_vocab_deterministic_any_shard_order(qa_shards, tmp_path):
    from regionvlp.cli import main
    from regionvlp.qa.vocab import build_vocab

    shards = [str(qa_shards / "train_set" / "train" / f"{i:06d}.tar") for i in range(6)]
    a, b = build_vocab(shards, 10), build_vocab(shards[::-1], 10)
    assert a.to_dict() == b.to_dict() and len(a.answers) == 10
    assert all(x >= y for x, y in zip(a.counts, a.counts[1:]))
    ties = [(c, ans) for c, ans in zip(a.counts, a.answers)]
    assert ties == sorted(ties, key=lambda t: (-t[0], t[1]))
    out = tmp_path / "vocab.json"
    assert main(["qa", "vocab", *shards, "--top", "10", "--out", str(out)]) == 0
    assert load_vocab(out).answers == a.answers
    # synthetic QA is balanced: the majority answer is a weak baseline
    full = build_vocab(shards, 100)
    assert full.counts[0] / full.num_pairs < 0.2 and len(full.answers) >= 15
    (tmp_path / "bad.json").write_text('{"answers": 3}')
    with pytest.raises(UserError, match="vocab"):
        load_vocab(tmp_path / "bad.json")


def _sync_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def test_qa_step_adds_no_host_sync(minilm_dir):
    """Forward + backward of the QA model: no more host syncs than the retrieval model's
    (the head and its loss none), and no more scalars for the loop to read."""
    from regionvlp.model import build_model
    from regionvlp.qa.head import QAHead, qa_loss
    from regionvlp.outputs import TextOutput, VideoOutput

    head = QAHead(32, 16, layers=2, heads=2, dropout=0.1)
    video = VideoOutput(cls=torch.randn(3, 32), regions=torch.randn(3, 6, 32),
                        region_mask=torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False] * 6]))
    text = TextOutput(cls=torch.randn(3, 32), words=torch.randn(3, 5, 32),
                      word_mask=torch.tensor([[False, True, True, False, False]] * 3))
    answers = torch.tensor([1, -1, 15])

    def head_step():
        loss, acc = qa_loss(head(video, text), answers)
        loss.backward()

    assert _sync_ops(head_step) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _sync_ops(head_step) == 0

    over = [f"model.text.name={minilm_dir}"]
    batch = {"frames": torch.randint(0, 255, (2, 2, 3, 64, 64), dtype=torch.uint8),
             "input_ids": torch.tensor([[101, 2054, 2003, 102]] * 2), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "answer_ids": torch.tensor([0, 3])}
    counts, scalars = {}, {}
    for qa in ("false", "true"):
        torch.manual_seed(0)
        model = build_model(load_config(TINY / "learned.yaml", over + [f"qa.enabled={qa}", "qa.num_answers=8",
                                                                        "qa.heads=2"]))

        def step():
            out = model(dict(batch))
            out["loss"].backward()
            scalars[qa] = sum(1 for v in out.values() if v.numel() == 1)

        counts[qa] = _sync_ops(step)
    assert counts["true"] <= counts["false"], counts
    assert scalars["true"] <= scalars["false"], scalars


def test_qa_config_keys_validated_and_downstream_configs_load():
    from regionvlp.config import ConfigError

    for bad, key in (("qa.num_answers=0", "qa.num_answers"), ("qa.heads=3", "qa.heads"),
                     ("qa.fusion_layers=-1", "qa.fusion_layers"), ("qa.dropout=1.5", "qa.dropout"),
                     ("qa.vocab=' '", "qa.vocab")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides=[bad])
    for name, answers, regions in (("msrvtt_qa", 1500, "detector"), ("msrvtt_qa_learned", 1500, "learned"),
                                   ("msvd_qa", 1000, "detector"), ("msvd_qa_learned", 1000, "learned")):
        cfg = load_config(ROOT / "configs" / "downstream" / f"{name}.yaml")
        assert cfg.qa.enabled and cfg.qa.num_answers == answers and cfg.model.regions == regions
        assert cfg.data.num_frames == 8 and cfg.qa.fusion_layers == 2 and cfg.train.init_from != "none"


# ------------------------------------------------------------- tiny QA training
@pytest.fixture(scope="module")
def qa_runs(qa_shards, tmp_path_factory) -> dict:
    from regionvlp.train import train

    out = {}
    for pathway in ("detector", "learned"):
        run = tmp_path_factory.mktemp(f"qa_{pathway}")
        summary = train(qa_cfg(pathway, qa_shards, run))
        out[pathway] = (run, summary)
    return out


@pytest.mark.parametrize("pathway", ["detector", "learned"])
def test_tiny_qa_run_beats_majority(qa_runs, pathway):
    run, s = qa_runs[pathway]
    assert s["steps"] == 40 and s["skipped"] == {}, s
    assert s["final_loss"] < s["initial_loss"], s
    val = s["val"]
    assert val["val_qa_accuracy"] > val["val_qa_majority_accuracy"], val
    assert (run / "qa_vocab.json").is_file()
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("qa_ce" in r for r in recs)


def test_export_load_model_answer_matches_eval(qa_runs, qa_shards, tmp_path):
    """export -> load_model -> answer gives the predictions evaluation gives, and
    `regionvlp eval` on the run reports the QA keys."""
    from regionvlp import load_model
    from regionvlp.checkpoint import export
    from regionvlp.data import build_loader
    from regionvlp.evaluation import load_eval_model, run_eval
    from regionvlp.qa.evaluate import answer_local

    run, summary = qa_runs["detector"]
    cfg = qa_cfg("detector", qa_shards, run)
    model, transform, _, _ = load_eval_model(run)
    records, _ = answer_local(model, build_loader(cfg, "val", training=False), batch_transform=transform,
                              device=torch.device("cpu"))
    export(run, tmp_path / "exp")
    exported = load_model(tmp_path / "exp")
    assert exported.answers == model.answers and (tmp_path / "exp" / "qa_vocab.json").is_file()
    answered = []
    for batch in build_loader(cfg, "val", training=False):
        answered += exported.answer(batch)
    assert answered == [r.prediction for r in records]
    # plain frames + question strings work too
    batch = next(iter(build_loader(cfg, "val", training=False)))
    assert exported.answer({"frames": batch["frames"], "question": batch["question"]}) == answered[:len(batch["question"])]

    m = run_eval(None, tmp_path / "exp", [f"data.val.urls={_urls(qa_shards / 'val_set' / 'val', 3)}"])
    assert m["qa_accuracy"] == pytest.approx(summary["val"]["val_qa_accuracy"], abs=1e-6)
    assert m["qa_majority_accuracy"] == pytest.approx(summary["val"]["val_qa_majority_accuracy"], abs=1e-6)
    assert m["num_questions"] == len(records) and m["qa_duplicates"] == 0
    for kind in ("what", "who", "how", "when", "where", "other"):
        assert f"qa_accuracy_{kind}" in m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, run: str, urls: str, out_dir: str) -> None:
    import torch.distributed as tdist

    from regionvlp.evaluation import run_eval

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        m = run_eval(None, run, [f"data.val.urls={urls}", "data.num_workers=0"])
        if rank == 0:
            Path(out_dir, "metrics.json").write_text(json.dumps(m))
    finally:
        tdist.destroy_process_group()


def test_eval_two_ranks_every_pair_exactly_once(qa_runs, qa_shards, tmp_path):
    """3 val shards over 2 gloo ranks == 1 rank: every QA pair answered exactly once."""
    from regionvlp.data import iter_samples
    from regionvlp.evaluation import run_eval

    run, _ = qa_runs["learned"]
    urls = _urls(qa_shards / "val_set" / "val", 3)
    total = sum(len(qa_pairs(s["meta"])[0]) for s in iter_samples(json.loads(urls)))
    one = run_eval(None, run, [f"data.val.urls={urls}"])
    assert one["num_questions"] == total and one["num_videos"] == 12
    mp.spawn(_rank_main, args=(2, _free_port(), str(run), urls, str(tmp_path)), nprocs=2, join=True)
    two = json.loads((tmp_path / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["qa_duplicates"] == 0
    assert two["num_questions"] == total and two["num_videos"] == 12
    for key in ("qa_accuracy", "qa_majority_accuracy", "qa_accuracy_what", "qa_accuracy_how"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


# -------------------------------------------------------------- shards write --qa
def test_shards_write_joins_msrvtt_qa_annotations(tmp_path):
    from regionvlp.data import iter_samples
    from regionvlp.data.writer import write_shards

    videos = tmp_path / "videos"
    videos.mkdir()
    clip = encode_clip(4, 32, 32, gop=2)
    for i in range(3):
        (videos / f"video{i}.mp4").write_bytes(clip)
    (videos / "video0.txt").write_text("a caption\n")  # captions optional for QA clips
    ann = [  # the public MSRVTT-QA layout: integer video ids, one object per question
        {"answer": "man", "id": 0, "question": "who is talking?", "video_id": 0},
        {"answer": "talk", "id": 1, "question": "what is a man doing?", "video_id": 0},
        {"answer": "dog", "id": 2, "question": "what is running?", "video_id": 2},
        {"answer": "cat", "id": 3, "question": "what sleeps?", "video_id": 9},  # no such clip
        {"answer": "x", "id": 4, "question": "", "video_id": 1},  # bad pair
    ]
    (tmp_path / "train_qa.json").write_text(json.dumps(ann))
    s = write_shards(videos, tmp_path / "out", qa=tmp_path / "train_qa.json", progress=False)
    assert s["samples"] == 2 and s["skipped"] == {"missing_caption": 1}  # video1: no caption, no QA
    assert s["qa"] == {"pairs": 3, "clips_with_qa": 2, "clips_without_qa": 1, "unmatched_pairs": 1,
                       "skipped": {"bad_qa": 1}}
    got = {s["meta"]["source"].rsplit("/", 1)[-1]: qa_pairs(s["meta"])[0] for s in iter_samples(s["urls"])}
    assert [(p.question, p.answer) for p in got["video0.mp4"]] == [("who is talking?", "man"),
                                                                   ("what is a man doing?", "talk")]
    assert [p.answer for p in got["video2.mp4"]] == ["dog"]
    # JSONL with string ids, through the CLI
    from regionvlp.cli import main

    (tmp_path / "qa.jsonl").write_text('{"video_id": "video1", "question": "how many?", "answer": 3}\n')
    assert main(["shards", "write", str(videos), str(tmp_path / "out2"), "--qa", str(tmp_path / "qa.jsonl")]) == 0
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UserError, match="--qa"):
        write_shards(videos, tmp_path / "out3", qa=tmp_path / "broken.json", progress=False)
