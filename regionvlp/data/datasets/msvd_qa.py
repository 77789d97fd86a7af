"""MSVD-QA (Xu et al., 2017): open-ended questions on the MSVD clips. ``video_id`` N is
``vidN`` of ``youtube_mapping.txt``, which gives the clip's YouTube name (the name MSVD
ships its videos under). MSVD-QA's own split (not MSVD retrieval's 1,200 / 100 / 670):
train 1,200 clips / 30,933 questions, val 250 / 6,415, test 520 / 13,157."""

from __future__ import annotations

from pathlib import Path

from regionvlp.data.datasets.base import Adapter, Split, classify
from regionvlp.data.datasets.msvd import names_of, read_mapping
from regionvlp.data.datasets.qa_files import read_qa_split


PROTOCOL = {"train": "MSVD-QA train: 1,200 clips, 30,933 questions",
            "val": "MSVD-QA val: 250 clips, 6,415 questions",
            "test": "MSVD-QA test: 520 clips, 13,157 questions; accuracy over the 1,000 most frequent training "
                    "answers (others count as wrong)"}


def read(files: list[Path]) -> dict[str, Split]:
    roles = classify(files, {"mapping": r"mapping", "qa": r"_qa\.jsonl?$"}, "msvd_qa",
                     "train_qa.json, val_qa.json, test_qa.json and youtube_mapping.txt")
    mapping = read_mapping(roles["mapping"][0]) if "mapping" in roles else {}
    splits = [read_qa_split(p, lambda n: names_of(f"vid{n}", mapping), "") for p in roles.get("qa", [])]
    for s in splits:
        s.protocol = PROTOCOL[s.name]
        s.files += roles.get("mapping", [])
    return {s.name: s for s in splits}


ADAPTER = Adapter(
    name="msvd_qa", description="MSVD-QA open-ended video QA (YouTube names through youtube_mapping.txt)",
    files="train_qa.json, val_qa.json, test_qa.json, youtube_mapping.txt", splits=tuple(PROTOCOL), read=read,
    hint="MSVD-QA names clips vid1..vid1970; MSVD ships them as YouTubeClips/<youtube id>_<start>_<end>.avi: "
         "add youtube_mapping.txt to --annotations")
