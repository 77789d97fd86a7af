"""The open-ended video QA annotation files of MSRVTT-QA and MSVD-QA (Xu et al., 2017):
``{train,val,test}_qa.json``, a list of ``{"answer", "category_id", "id", "question",
"video_id"}`` with an integer ``video_id`` (MSR-VTT: ``video<N>``; MSVD: ``vid<N>``,
YouTube names through ``youtube_mapping.txt``). ``category_id`` is kept as the
question type (0 what, 1 who, 2 how, 3 when, 4 where)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from regionvlp.data.datasets.base import Clip, Split, read_json
from regionvlp.data.qa import QUESTION_TYPES, qa_pairs
from regionvlp.errors import UserError


CATEGORIES = {0: "what", 1: "who", 2: "how", 3: "when", 4: "where"}
QA_FILE = re.compile(r"^(train|val|test)_qa\.jsonl?$")


def qa_split_name(path: Path) -> str:
    m = QA_FILE.match(path.name.lower())
    if not m:
        raise UserError(f"{path.name}: expected the QA files train_qa.json, val_qa.json or test_qa.json")
    return m.group(1)


def question_of(row: dict, pair_question: str, answer: str) -> dict:
    qa = {"question": pair_question, "answer": answer}
    if "id" in row:
        qa["id"] = row["id"]
    category = row.get("category_id")
    if isinstance(category, int) and not isinstance(category, bool):
        qa["category_id"] = category
        if category in CATEGORIES and CATEGORIES[category] in QUESTION_TYPES:
            qa["question_type"] = CATEGORIES[category]
    return qa


def read_qa_split(path: Path, names: Callable[[int], dict[str, str]], protocol: str) -> Split:
    """One QA file -> a split of QA-only clips (no caption), questions in file order."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a list of {{question, answer, video_id, id}} objects")
    split = Split(qa_split_name(path), [], [path], protocol)
    clips: dict[str, Clip] = {}
    for row in rows:
        vid = row.get("video_id") if isinstance(row, dict) else None
        if isinstance(vid, str) and vid.strip().isdigit():
            vid = int(vid)
        if not isinstance(vid, int) or isinstance(vid, bool):
            split.skipped["no_video_id"] += 1
            continue
        pairs, bad = qa_pairs({"question": row.get("question"), "answer": row.get("answer")})
        if bad:
            split.skipped["bad_qa"] += 1
            continue
        clip_names = names(vid)
        key = next(v for v in clip_names.values() if v)
        clip = clips.setdefault(key, Clip(key, clip_names, [], {"qa": []}))
        clip.extra["qa"].append(question_of(row, pairs[0].question, pairs[0].answer))
    split.clips = list(clips.values())
    split.info["questions"] = sum(len(c.extra["qa"]) for c in split.clips)
    return split
