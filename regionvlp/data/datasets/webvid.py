"""WebVid-2M / 10M (Bain et al., 2021): stock-footage clips with their alt-text caption.

Files: ``results_2M_train.csv``, ``results_2M_val.csv``, ``results_10M_train.csv``, …
with the columns ``videoid, contentUrl, duration, page_dir, name`` (``duration`` as ISO
8601, ``PT00H00M11S``). Videos under ``--videos`` either named by ``videoid``
(``{page_dir}/{videoid}.mp4``, as the authors' download script saves them) or a
video2dataset output folder in ``files`` format, whose ``.json`` sidecars carry
``videoid`` (fetch it with ``--save_additional_columns '[videoid,page_dir,duration]'``,
see docs/datasets.md). The csv is streamed, never read whole.
"""

from __future__ import annotations

import re
from pathlib import Path

from regionvlp.data.datasets.base import Adapter, Clip, Split, add_clip, caption_list, classify, csv_rows, expect_keys


ROLES = {"val": r"results_.*val.*\.csv$", "train": r"results_.*\.csv$"}
EXPECTED = "results_2M_train.csv / results_2M_val.csv / results_10M_train.csv (videoid,contentUrl,duration,page_dir,name)"
PROTOCOL = {"train": "WebVid pretraining clips, one alt-text caption each",
            "val": "WebVid val (results_2M_val.csv: 5,000 clips), one caption each"}
_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


def seconds(text: str) -> float | None:
    """``PT00H00M11S`` -> 11.0 (None when not ISO 8601)."""
    m = _DURATION.match(str(text).strip())
    if not m or not any(m.groups()):
        return None
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def read_results(paths: list[Path], name: str) -> Split:
    split = Split(name, [], paths, PROTOCOL[name])
    seen: set[str] = set()
    for path in paths:
        for n, row in enumerate(csv_rows(path, delimiter=",")):
            if n == 0:
                expect_keys(row, ["videoid", "name"], path)
            vid = str(row.get("videoid") or "").strip()
            if not vid:
                split.skipped["no_video_id"] += 1
                continue
            add_clip(split, seen, Clip(vid, {"videoid": vid}, caption_list(row.get("name")), {
                "page_dir": row.get("page_dir"), "duration_s": seconds(row.get("duration") or ""),
                "url": row.get("contentUrl")}))
    return split


def read(files: list[Path]) -> dict[str, Split]:
    roles = classify(files, ROLES, "webvid", EXPECTED)
    return {name: read_results(paths, name) for name, paths in roles.items()}  # several csv files per split


ADAPTER = Adapter(
    name="webvid", description="WebVid-2M/10M pretraining (results_*.csv; downloaded files or video2dataset output)",
    files=EXPECTED, splits=tuple(PROTOCOL), read=read, sidecar_id="videoid",
    hint="WebVid videos are named <videoid>.mp4, or sit in a video2dataset folder whose .json sidecars hold "
         "videoid (video2dataset --save_additional_columns '[videoid,page_dir,duration]')")
