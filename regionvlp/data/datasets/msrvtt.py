"""MSR-VTT (Xu et al., 2016): 10,000 clips ``video0`` … ``video9999``, 20 sentences each.

Files, as CLIP4Clip / Frozen / JSFusion ship them:

- ``MSRVTT_data.json`` (also the original ``train_val_videodatainfo.json`` /
  ``test_videodatainfo.json``): ``{"videos": [{"video_id": "video0", "split": "train", …}],
  "sentences": [{"caption": …, "video_id": "video0", "sen_id": 0}, …]}``;
- ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (a ``video_id`` column) or one id per
  line (``train_list_jsfusion.txt`` = 9k, ``train_list_miech.txt`` = 7k): the training
  lists, whose captions come from ``MSRVTT_data.json``;
- ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``): the 1k-A test, one
  sentence per clip;
- the multiple-choice test: JSFusion's ``MSR_MC_test.csv`` (tab-separated ``vid_key``
  ``msr7010``, ``a1`` … ``a5``, ``answer`` 0-based) or the json form
  ``[{"video": "video9770.mp4", "caption": [5 sentences], "answer": 0}]``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from regionvlp.data.datasets.base import (Adapter, Clip, Split, caption_list, classify, csv_rows, expect_keys,
                                          read_json, text_lines)
from regionvlp.errors import UserError


ROLES = {"mc": r"mc|multiple", "test_1ka": r"jsfusion_test|1k-?a", "train_9k": r"9k|jsfusion",
         "train_7k": r"7k|miech", "data": r"data|videodatainfo"}
EXPECTED = ("MSRVTT_data.json, MSRVTT_train.9k.csv / MSRVTT_train.7k.csv, MSRVTT_JSFUSION_test.csv, "
            "MSR_MC_test.csv or the multiple-choice json")
STANDARD = {"train": "train", "validate": "val", "test": "test"}
PROTOCOL = {
    "test_1ka": "MSR-VTT 1k-A (JSFusion): 1,000 test clips, one sentence each, text-to-video R@K/MedR",
    "test_mc": "MSR-VTT multiple choice (JSFusion): 2,990 test clips, 5 candidate sentences, mc_accuracy",
    "train_9k": "MSR-VTT 9k training list (JSFusion), all 20 sentences per clip",
    "train_7k": "MSR-VTT 7k training list (Miech et al.), all 20 sentences per clip",
    "train": "MSR-VTT standard split: 6,513 train clips", "val": "MSR-VTT standard split: 497 val clips",
    "test": "MSR-VTT standard split: 2,990 test clips, all 20 sentences per clip",
}


def video_name(value: Any) -> str:
    """``video7579`` from ``video7579``, ``video7579.mp4``, ``msr7579`` or ``7579``."""
    text = str(value).strip().rsplit("/", 1)[-1]
    text = text.rsplit(".", 1)[0] if "." in text else text
    if text.startswith("msr"):
        text = "video" + text[3:]
    return f"video{text}" if text.isdigit() else text


def read_data(paths: list[Path]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Captions by video id (sentence order) and each video's standard split."""
    captions: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
            raise UserError(f"{path}: expected MSRVTT_data.json's {{'videos': [...], 'sentences': [...]}}")
        for v in data.get("videos") or []:
            if isinstance(v, dict) and "video_id" in v:
                split_of[str(v["video_id"])] = STANDARD.get(str(v.get("split")), str(v.get("split")))
        for s in data["sentences"]:
            if isinstance(s, dict) and "video_id" in s:
                captions.setdefault(str(s["video_id"]), []).extend(caption_list(s.get("caption")))
    return captions, split_of


def read_list(path: Path) -> list[str]:
    """The ids of a training list: a csv with a ``video_id`` column, or one id per line."""
    if path.suffix.lower() == ".csv":
        rows = list(csv_rows(path, delimiter=","))
        if rows:
            expect_keys(rows[0], ["video_id"], path)
        return [video_name(r["video_id"]) for r in rows if r.get("video_id")]
    return [video_name(line) for line in text_lines(path) if line.strip()]


def list_split(name: str, ids: list[str], captions: dict[str, list[str]], files: list[Path]) -> Split:
    split = Split(name, [], files, PROTOCOL[name])
    for vid in dict.fromkeys(ids):
        caps = captions.get(vid, [])
        if not caps:
            split.skipped["no_caption"] += 1
            continue
        split.clips.append(Clip(vid, {"msrvtt": vid}, caps))
    return split


def read_1ka(path: Path) -> Split:
    split = Split("test_1ka", [], [path], PROTOCOL["test_1ka"])
    rows = list(csv_rows(path, delimiter=","))
    if rows:
        expect_keys(rows[0], ["video_id", "sentence"], path)
    for row in rows:
        caps = caption_list(row.get("sentence"))
        if not caps:
            split.skipped["no_caption"] += 1
            continue
        vid = video_name(row["video_id"])
        split.clips.append(Clip(vid, {"msrvtt": vid}, caps, {"key": row.get("key"), "vid_key": row.get("vid_key")}))
    return split


def mc_clip(vid: str, options: list[Any], answer: Any, skipped: Counter) -> Clip | None:
    """A multiple-choice clip: caption = the right sentence, ``options`` + ``answer`` in its json."""
    opts = [" ".join(str(o).split()) for o in options]
    try:
        index = int(answer)
    except (TypeError, ValueError):
        index = -1
    if isinstance(answer, bool) or len(opts) < 2 or not all(opts) or not 0 <= index < len(opts):
        skipped["bad_mc_question"] += 1
        return None
    return Clip(vid, {"msrvtt": vid}, [opts[index]], {"options": opts, "answer": index})


def read_mc(path: Path) -> Split:
    split = Split("test_mc", [], [path], PROTOCOL["test_mc"])
    if path.suffix.lower() == ".json":
        rows = read_json(path)
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a list of {{'video', 'caption': [options], 'answer'}}")
        pairs = [(r.get("video"), r.get("caption"), r.get("answer")) for r in rows if isinstance(r, dict)]
    else:
        rows = list(csv_rows(path))
        if rows:
            expect_keys(rows[0], ["vid_key", "a1", "a2", "a3", "a4", "a5", "answer"], path)
        pairs = [(r["vid_key"], [r[f"a{i}"] for i in range(1, 6)], r["answer"]) for r in rows]
    for video, options, answer in pairs:
        made = mc_clip(video_name(video), options if isinstance(options, list) else [], answer, split.skipped) \
            if video else None
        if made is not None:
            split.clips.append(made)
        elif not video:
            split.skipped["no_video_id"] += 1
    return split


def read(files: list[Path]) -> dict[str, Split]:
    roles = classify(files, ROLES, "msrvtt", EXPECTED)
    splits: dict[str, Split] = {}
    if "test_1ka" in roles:
        splits["test_1ka"] = read_1ka(roles["test_1ka"][0])
    if "mc" in roles:
        splits["test_mc"] = read_mc(roles["mc"][0])
    lists = [r for r in ("train_9k", "train_7k") if r in roles]
    if lists and "data" not in roles:
        raise UserError("datasets prepare msrvtt: the training lists hold ids only; their captions are in "
                        "MSRVTT_data.json: add it to --annotations")
    if "data" in roles:
        captions, split_of = read_data(roles["data"])
        for name in lists:
            splits[name] = list_split(name, read_list(roles[name][0]), captions, roles[name] + roles["data"])
        only_data = not splits
        for name in ("train", "val", "test"):
            ids = [v for v, s in split_of.items() if s == name]
            splits[name] = list_split(name, ids, captions, roles["data"])
            splits[name].default = only_data  # written by default only when nothing else was asked for
    return splits


ADAPTER = Adapter(
    name="msrvtt", description="MSR-VTT retrieval (1k-A, 9k/7k train, standard split) and multiple choice",
    files=EXPECTED, splits=("train_9k", "train_7k", "test_1ka", "test_mc", "train", "val", "test"), read=read,
    hint="MSR-VTT videos are named video0.mp4 ... video9999.mp4 (TrainValVideo/, TestVideo/): point --videos at them")
