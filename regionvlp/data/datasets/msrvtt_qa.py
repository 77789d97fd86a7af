"""MSRVTT-QA (Xu et al., 2017): open-ended questions on the MSR-VTT clips
(``video_id`` 0 … 9999 → ``video0.mp4`` …), split as MSR-VTT's standard split: train
6,513 clips / 158,581 questions, val 497 / 12,278, test 2,990 / 72,821."""

from __future__ import annotations

from pathlib import Path

from regionvlp.data.datasets.base import Adapter, Split, classify
from regionvlp.data.datasets.qa_files import read_qa_split


PROTOCOL = {"train": "MSRVTT-QA train: 6,513 clips, 158,581 questions",
            "val": "MSRVTT-QA val: 497 clips, 12,278 questions",
            "test": "MSRVTT-QA test: 2,990 clips, 72,821 questions; accuracy over the 1,500 most frequent "
                    "training answers (others count as wrong)"}


def read(files: list[Path]) -> dict[str, Split]:
    roles = classify(files, {"qa": r"_qa\.jsonl?$"}, "msrvtt_qa", "train_qa.json, val_qa.json, test_qa.json")
    splits = [read_qa_split(p, lambda n: {"msrvtt": f"video{n}"}, "") for p in roles["qa"]]
    for s in splits:
        s.protocol = PROTOCOL[s.name]
    return {s.name: s for s in splits}


ADAPTER = Adapter(
    name="msrvtt_qa", description="MSRVTT-QA open-ended video QA", files="train_qa.json, val_qa.json, test_qa.json",
    splits=tuple(PROTOCOL), read=read,
    hint="MSRVTT-QA's video_id N is the MSR-VTT clip videoN.mp4: point --videos at the MSR-VTT videos")
