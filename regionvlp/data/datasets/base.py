"""What every dataset adapter shares: the clip record, the split, the adapter entry,
bounded readers for annotation files, and the index of the videos under ``--videos``.

An adapter reads its dataset's annotation files as their authors ship them and returns
:class:`Split` s of :class:`Clip` s. A clip names the file stem it has under each of the
dataset's naming schemes (``{"youtube": "-4wsuPCjDBc_5_15", "vid": "vid1"}``);
:class:`VideoIndex` finds it among the videos (any container extension, any depth) and
refuses a clip that two schemes resolve to two different files.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from regionvlp.data.inputs import FOLDER_VIDEO_EXTS
from regionvlp.errors import UserError, clip
from regionvlp.limits import DATASET_JSON_BYTES, DATASET_TEXT_BYTES, ReadLimitError, iter_lines, read_text


MAX_JSON_BYTES = DATASET_JSON_BYTES  # annotation JSON read whole: bounded first
MAX_TEXT_BYTES = DATASET_TEXT_BYTES  # annotation CSV/TSV/TXT: streamed, bounded all the same
MAX_SIDECAR_BYTES = 1 << 20
csv.field_size_limit(1 << 24)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


@dataclass
class Clip:
    """One annotated clip: its dataset id, the file stem per naming scheme, its
    caption(s), and what else goes into the sample json (``options``/``answer``, ``qa``)."""

    id: str
    names: dict[str, str]
    captions: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Split:
    """The clips of one split, what was dropped while parsing (reason -> count), the
    annotation files it came from and the protocol its numbers follow."""

    name: str
    clips: list[Clip]
    files: list[Path]
    protocol: str
    skipped: Counter = field(default_factory=Counter)
    default: bool = True  # written when no --split is given
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """One registry entry: ``read(files) -> {split name: Split}``."""

    name: str
    description: str
    files: str  # the annotation files it reads, as their authors name them
    splits: tuple[str, ...]
    read: Callable[[list[Path]], dict[str, Split]]
    hint: str  # what to check when no clip matched a video
    sidecar_id: Optional[str] = None  # json sidecar field that names a clip (video2dataset output)


# ------------------------------------------------------------------ file reading
def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON annotation file, its size bounded before it is read (a larger file, a
    device or a FIFO: :class:`~regionvlp.limits.ReadLimitError`, exit 2)."""
    try:
        return json.loads(read_text(path, limit, "annotation file", "utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({clip(' '.join(str(err).split()))})") from None


def _lines(path: Path, limit: int) -> Iterator[str]:
    """Lines with their endings, ending at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (as a file
    opened with ``newline=""`` gives them), streamed and bounded (:func:`iter_lines`)."""
    for raw in iter_lines(path, limit, "annotation file"):
        yield from _LINE.findall(raw)


def text_lines(path: Path, limit: int = MAX_TEXT_BYTES) -> Iterator[str]:
    """Lines of a UTF-8 text file without their endings, streamed (one line held; the
    file and each line bounded: :func:`regionvlp.limits.iter_lines`)."""
    for line in _lines(path, limit):
        yield line.rstrip("\r\n")


def csv_rows(path: Path, delimiter: Optional[str] = None, header: bool = True,
             limit: int = MAX_TEXT_BYTES) -> Iterator[Any]:
    """Rows of a CSV/TSV file: dicts with a header line, lists without; the delimiter
    sniffed (``,`` tab ``;``) from the first 8 KiB unless given. Streamed through
    :func:`regionvlp.limits.iter_lines` (the file and each line bounded)."""
    lines = _lines(path, limit)
    if delimiter is None:
        head: list[str] = []
        for line in lines:
            head.append(line)
            if sum(map(len, head)) >= 8192:
                break
        text = "".join(head)
        delimiter = "\t" if text.count("\t") > text.count(",") else ","
        lines = itertools.chain(head, lines)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(lines, delimiter=delimiter, quoting=quoting) if header \
        else csv.reader(lines, delimiter=delimiter, quoting=quoting)
    yield from reader


def expect_keys(row: Any, keys: Sequence[str], path: Path) -> None:
    if not isinstance(row, dict) or any(k not in row for k in keys):
        have = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{path}: expected fields {', '.join(keys)} (found: {have}); is this the right file?")


def caption_list(value: Any) -> list[str]:
    """Whitespace-normalised, non-empty, distinct captions of a string or list."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    out: list[str] = []
    for v in values:
        text = " ".join(v.split()) if isinstance(v, str) else ""
        if text and text not in out:
            out.append(text)
    return out


def classify(files: Iterable[Path], roles: dict[str, str], dataset: str, expected: str) -> dict[str, list[Path]]:
    """Annotation files by role: ``roles`` maps a role to a regular expression on the
    lower-cased file name (first match wins); an unrecognised or missing file is an error."""
    out: dict[str, list[Path]] = {}
    for path in files:
        if not path.is_file():
            raise UserError(f"datasets prepare {dataset}: --annotations {path}: no such file")
        role = next((r for r, pattern in roles.items() if re.search(pattern, path.name.lower())), None)
        if role is None:
            raise UserError(f"datasets prepare {dataset}: cannot tell what {path.name} holds; expected {expected}")
        out.setdefault(role, []).append(path)
    return out


def split_per_file(files: Iterable[Path], roles: dict[str, str], dataset: str, expected: str,
                   reader: Callable[[Path, str], Split]) -> dict[str, Split]:
    """One split per annotation file, named by its role (:func:`classify`)."""
    return {name: reader(paths[0], name) for name, paths in classify(files, roles, dataset, expected).items()}


def add_clip(split: Split, seen: set[str], clip: Clip) -> None:
    """Append ``clip`` unless it has no caption (``no_caption``) or its id came before
    (``duplicate_clip``)."""
    if not clip.captions:
        split.skipped["no_caption"] += 1
    elif clip.id in seen:
        split.skipped["duplicate_clip"] += 1
    else:
        seen.add(clip.id)
        split.clips.append(clip)


# ------------------------------------------------------------------ video index
class VideoIndex:
    """Video files under a folder by stem (any of the container extensions, any depth;
    for one stem the earliest extension of ``FOLDER_VIDEO_EXTS`` wins). With
    ``sidecar_id``, a video whose ``.json`` sidecar names a clip in that field (a
    video2dataset output folder) is indexed under that name too."""

    def __init__(self, root: str | Path, sidecar_id: Optional[str] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"--videos {self.root}: no such folder")
        rank = {ext: i for i, ext in enumerate(FOLDER_VIDEO_EXTS)}
        files = [p for p in self.root.rglob("*") if p.suffix.lower().lstrip(".") in rank and p.is_file()]
        files.sort(key=lambda p: (rank[p.suffix.lower().lstrip(".")], str(p)))
        self.by_stem: dict[str, Path] = {}
        for path in files:
            self.by_stem.setdefault(path.stem, path)
        if sidecar_id:
            for path in files:
                name = sidecar_name(path.with_suffix(".json"), sidecar_id)
                if name:
                    self.by_stem.setdefault(name, path)
        self.count = len(files)

    def names(self) -> list[str]:
        return list(self.by_stem)

    def resolve(self, clip: Clip) -> Optional[Path]:
        """The clip's file, None when absent; two schemes naming two files is an error."""
        hits = {scheme: self.by_stem[stem] for scheme, stem in clip.names.items() if stem and stem in self.by_stem}
        if len(set(hits.values())) > 1:
            both = "; ".join(f"{scheme} name {clip.names[scheme]} -> {path}" for scheme, path in hits.items())
            raise UserError(f"clip {clip.id} matches two videos under two naming schemes ({both}); "
                            "keep one naming in --videos")
        return next(iter(hits.values()), None)


def sidecar_name(path: Path, key: str) -> Optional[str]:
    """``json[key]`` of a small sidecar with ``status`` success (or no status), else None."""
    try:
        meta = json.loads(read_text(path, MAX_SIDECAR_BYTES, "sidecar"))
    except (OSError, ValueError, UnicodeDecodeError, ReadLimitError):  # missing, unreadable or too big: no name
        return None
    if not isinstance(meta, dict) or meta.get("status", "success") != "success":
        return None
    value = meta.get(key)
    return str(value) if value not in (None, "") else None
