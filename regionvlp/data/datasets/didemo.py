"""DiDeMo (Hendricks et al., 2017): ~10k Flickr videos, moments described by sentences.

Files: ``train_data.json``, ``val_data.json``, ``test_data.json``, each a list of
``{"video": "10015567@N08_3655084291.mov", "times": [[2, 2], …], "description": …,
"annotation_id": …, "num_segments": 6, …}`` (one object per description; ``times`` in
5-second segments, four annotators). Paragraph-to-video: all of a video's descriptions,
ordered by their first annotator's start segment, are one caption.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from regionvlp.data.datasets.base import Adapter, Clip, Split, read_json, split_per_file
from regionvlp.data.datasets.paragraphs import paragraph
from regionvlp.errors import UserError


ROLES = {"train": r"^train", "val": r"^val", "test": r"^test"}
EXPECTED = "train_data.json, val_data.json, test_data.json"
PROTOCOL = {"train": "DiDeMo train (8,395 videos), paragraph-to-video",
            "val": "DiDeMo val (1,065 videos), paragraph-to-video",
            "test": "DiDeMo test (1,004 videos): paragraph-to-video retrieval, each video's descriptions joined"}


def start_of(times: Any) -> Any:
    if isinstance(times, list) and times and isinstance(times[0], list) and times[0]:
        return times[0][0]
    return None


def read_split(path: Path, name: str) -> Split:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected DiDeMo's list of {{video, description, times}} objects")
    split = Split(name, [], [path], PROTOCOL[name])
    moments: dict[str, list[tuple[Any, Any]]] = {}
    for row in rows:
        video = row.get("video") if isinstance(row, dict) else None
        if not isinstance(video, str) or not video.strip():
            split.skipped["no_video_id"] += 1
            continue
        moments.setdefault(video.strip(), []).append((row.get("description"), start_of(row.get("times"))))
    for video, items in moments.items():
        text = paragraph([d for d, _ in items], [s for _, s in items])
        if not text:
            split.skipped["no_caption"] += 1
            continue
        stem = re.sub(r"\.(mov|mp4|avi|m4v|3gp|mpg|mkv|webm|wmv|flv)$", "", video, flags=re.I)
        split.clips.append(Clip(stem, {"didemo": stem}, [text], {"sentences": len(items)}))
    return split


def read(files: list[Path]) -> dict[str, Split]:
    return split_per_file(files, ROLES, "didemo", EXPECTED, read_split)


ADAPTER = Adapter(
    name="didemo", description="DiDeMo paragraph-to-video retrieval", files=EXPECTED, splits=tuple(PROTOCOL),
    read=read, hint="DiDeMo videos are named by their Flickr id (10015567@N08_3655084291.mp4, any extension)")
