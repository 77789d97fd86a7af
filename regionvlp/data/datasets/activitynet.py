"""ActivityNet Captions (Krishna et al., 2017): ~20k YouTube videos, dense captions.

Files: ``train.json``, ``val_1.json``, ``val_2.json``, each ``{"v_QOlSCBRmfWY":
{"duration": 82.73, "timestamps": [[0.83, 19.86], …], "sentences": […]}, …}``.
Paragraph-to-video on ``val_1`` (4,917 videos, the peers' protocol): a video's sentences
in time order are one caption. Videos are named ``v_<youtube id>`` (the annotation key)
or by the bare YouTube id, as downloads differ; a video present under both is an error.
"""

from __future__ import annotations

from pathlib import Path

from regionvlp.data.datasets.base import Adapter, Clip, Split, read_json, split_per_file
from regionvlp.data.datasets.paragraphs import paragraph
from regionvlp.errors import UserError


ROLES = {"val_1": r"val_1", "val_2": r"val_2", "train": r"train"}
EXPECTED = "train.json, val_1.json, val_2.json"
PROTOCOL = {"train": "ActivityNet Captions train (10,009 videos), paragraph-to-video",
            "val_1": "ActivityNet Captions val_1 (4,917 videos): paragraph-to-video retrieval, sentences joined",
            "val_2": "ActivityNet Captions val_2 (4,885 videos), paragraph-to-video"}


def names_of(key: str) -> dict[str, str]:
    bare = key[2:] if key.startswith("v_") else key
    return {"v_key": f"v_{bare}", "youtube_id": bare}


def read_split(path: Path, name: str) -> Split:
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected ActivityNet Captions' {{video key: {{sentences, timestamps}}}}")
    split = Split(name, [], [path], PROTOCOL[name])
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sentences"), list):
            split.skipped["no_caption"] += 1
            continue
        stamps = entry.get("timestamps") or []
        starts = [t[0] if isinstance(t, list) and t else None for t in stamps]
        text = paragraph(entry["sentences"], starts)
        if not text:
            split.skipped["no_caption"] += 1
            continue
        split.clips.append(Clip(key, names_of(key), [text], {"annotated_duration": entry.get("duration")}))
    return split


def read(files: list[Path]) -> dict[str, Split]:
    return split_per_file(files, ROLES, "activitynet", EXPECTED, read_split)


ADAPTER = Adapter(
    name="activitynet", description="ActivityNet Captions paragraph-to-video retrieval (val_1)", files=EXPECTED,
    splits=tuple(PROTOCOL), read=read,
    hint="ActivityNet videos are named v_<youtube id>.mp4 (or <youtube id>.mp4): point --videos at them")
