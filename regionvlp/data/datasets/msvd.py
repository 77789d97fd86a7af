"""MSVD (Chen & Dolan, 2011): 1,970 YouTube clips, named ``<youtube id>_<start>_<end>``
(``-4wsuPCjDBc_5_15.avi`` in ``YouTubeClips/``), ~40 English sentences each.

Files, as their authors and the peers ship them:

- ``youtube_mapping.txt``: ``-4wsuPCjDBc_5_15 vid1`` per line, ``vid1`` … ``vid1970``;
  the standard split (Venugopalan et al., 2015) is by that number: ``vid1``–``vid1200``
  train, ``vid1201``–``vid1300`` val, ``vid1301``–``vid1970`` test (670 clips);
- ``AllVideoDescriptions.txt``: ``#`` header lines, then ``<clip name> <sentence>``;
- or a json ``{clip name: [sentences]}`` (clip names as YouTube names or ``vidN``).
"""

from __future__ import annotations

import re
from pathlib import Path

from regionvlp.data.datasets.base import Adapter, Clip, Split, caption_list, classify, read_json, text_lines
from regionvlp.errors import UserError


ROLES = {"mapping": r"mapping", "descriptions": r"\.txt$", "json": r"\.json$"}
EXPECTED = "youtube_mapping.txt and AllVideoDescriptions.txt (or the {clip: [captions]} json)"
SPLITS = {"train": (1, 1200), "val": (1201, 1300), "test": (1301, 1970)}
PROTOCOL = {
    "train": "MSVD standard split: vid1-vid1200 (1,200 clips), all sentences",
    "val": "MSVD standard split: vid1201-vid1300 (100 clips), all sentences",
    "test": "MSVD standard split: vid1301-vid1970 (670 clips), all sentences; t2v over every sentence",
}
_VID = re.compile(r"^vid(\d+)$")


def read_mapping(path: Path) -> dict[str, str]:
    """``vidN`` -> YouTube clip name, from ``youtube_mapping.txt``."""
    out: dict[str, str] = {}
    for n, line in enumerate(text_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not _VID.match(parts[1]):
            raise UserError(f"{path}:{n}: expected '<youtube clip name> vidN', got {line[:80]!r}")
        out[parts[1]] = parts[0]
    return out


def read_descriptions(path: Path) -> dict[str, list[str]]:
    """Sentences by clip name from ``AllVideoDescriptions.txt`` (``#`` lines are headers)."""
    out: dict[str, list[str]] = {}
    for line in text_lines(path):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, sentence = line.strip().partition(" ")
        out.setdefault(name, []).extend(c for c in caption_list(sentence) if c not in out.get(name, []))
    return out


def read_caption_json(path: Path) -> dict[str, list[str]]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected the MSVD caption json {{clip name: [captions]}}")
    return {str(k): caption_list(v) for k, v in data.items()}


def names_of(vid: str, mapping: dict[str, str]) -> dict[str, str]:
    """The file stems of ``vidN``: its YouTube name (how MSVD ships the videos) and ``vidN``."""
    return {"vid": vid, "youtube": mapping.get(vid, "")}


def split_clips(name: str, mapping: dict[str, str], captions: dict[str, list[str]], files: list[Path]) -> Split:
    low, high = SPLITS[name]
    split = Split(name, [], files, PROTOCOL[name])
    for n in range(low, high + 1):
        vid = f"vid{n}"
        if vid not in mapping:
            split.skipped["not_in_mapping"] += 1
            continue
        caps = captions.get(mapping[vid]) or captions.get(vid) or []
        if not caps:
            split.skipped["no_caption"] += 1
            continue
        split.clips.append(Clip(vid, names_of(vid, mapping), caps, {"youtube_name": mapping[vid]}))
    return split


def read(files: list[Path]) -> dict[str, Split]:
    roles = classify(files, ROLES, "msvd", EXPECTED)
    if "mapping" not in roles:
        raise UserError("datasets prepare msvd: the standard split is defined on youtube_mapping.txt "
                        "(vid1..vid1970): add it to --annotations")
    captions: dict[str, list[str]] = {}
    for path in roles.get("descriptions", []):
        for k, v in read_descriptions(path).items():
            captions.setdefault(k, []).extend(c for c in v if c not in captions.get(k, []))
    for path in roles.get("json", []):
        for k, v in read_caption_json(path).items():
            captions.setdefault(k, []).extend(c for c in v if c not in captions.get(k, []))
    if not captions:
        raise UserError(f"datasets prepare msvd: no captions given; add {EXPECTED}")
    mapping = read_mapping(roles["mapping"][0])
    files_used = [p for r in ("mapping", "descriptions", "json") for p in roles.get(r, [])]
    return {name: split_clips(name, mapping, captions, files_used) for name in SPLITS}


ADAPTER = Adapter(
    name="msvd", description="MSVD retrieval, standard 1,200 / 100 / 670 split", files=EXPECTED,
    splits=tuple(SPLITS), read=read,
    hint="MSVD videos are named by YouTube id and seconds (YouTubeClips/-4wsuPCjDBc_5_15.avi): point --videos "
         "at them; youtube_mapping.txt maps vidN to those names")
