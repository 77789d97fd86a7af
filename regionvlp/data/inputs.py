"""What ``shards write`` reads: a CSV/JSONL manifest or a folder of videos + ``.txt``
captions (one :class:`Item` per input), and the join of QA annotations by video id."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from regionvlp.data.matching import QA_JOIN_HINT, check_match, match_report, mc_captions
from regionvlp.data.qa import ID_COLS, id_candidates, join_annotations, load_annotations
from regionvlp.errors import UserError
from regionvlp.jsonio import json_loads
from regionvlp.limits import ANNOTATION_BYTES, read_text


VIDEO_COLS = ("video", "videopath", "video_path", "path", "filepath", "file", "url", "videourl", "contentUrl")
CAPTION_COLS = ("caption", "text", "txt", "name", "title", "description")
FOLDER_VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "flv", "wmv", "3gp", "ogv", "ts")


@dataclass
class Item:
    """One input: where its video is, its caption(s) and any other manifest columns."""

    index: int
    key: str
    source: str  # local path or URL
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def _captions_of(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    out = []
    for v in value:
        if isinstance(v, str) and " ".join(v.split()) and " ".join(v.split()) not in out:
            out.append(" ".join(v.split()))
    return out


def _pick_col(columns: list[str], wanted: Optional[str], candidates: tuple[str, ...], what: str, src: Path, flag: str,
              optional: bool = False) -> Optional[str]:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{src}: no column '{wanted}' (columns: {', '.join(columns)}); fix {flag}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand.lower() in lower:
            return lower[cand.lower()]
    if optional:  # a QA-only manifest: the clips' QA pairs stand in for captions
        return None
    raise UserError(f"{src}: cannot tell which column holds the {what} (columns: {', '.join(columns)}); pass {flag}")


def _resolve(source: str, base: Path) -> str:
    if "://" in source:
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else (base / path))


def read_manifest(src: Path, video_col: Optional[str] = None, caption_col: Optional[str] = None,
                  qa_join: bool = False) -> list[Item]:
    """Rows of a CSV (header line) or JSONL manifest as :class:`Item` s, in file order. A
    manifest needs no caption column when its rows carry ``qa`` pairs or ``qa_join``
    (``--qa``) gives them."""
    rows: list[dict[str, Any]] = []
    try:
        if src.suffix.lower() == ".json":  # one JSON array of row objects
            try:
                rows = json_loads(read_text(src, ANNOTATION_BYTES, "manifest", "utf-8-sig"))
            except json.JSONDecodeError as err:
                raise UserError(f"{src}: not valid JSON ({err.msg}, line {err.lineno}); "
                                "use a JSON array of objects or JSONL (one object per line)") from None
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise UserError(f"{src}: a .json manifest must be an array of objects (or use .jsonl)")
        elif src.suffix.lower() in (".jsonl", ".ndjson"):
            with io.StringIO(read_text(src, ANNOTATION_BYTES, "manifest", "utf-8-sig")) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json_loads(line)
                        except json.JSONDecodeError as err:
                            raise UserError(f"{src}:{n}: not a JSON line ({err.msg}); fix or remove that line") from None
                        if not isinstance(row, dict):
                            raise UserError(f"{src}:{n}: each line must be a JSON object")
                        rows.append(row)
        else:
            with io.StringIO(read_text(src, ANNOTATION_BYTES, "manifest", "utf-8-sig"), newline="") as f:
                sample = f.read(4096)
                f.seek(0)
                try:
                    dialect = csv.Sniffer().sniff(sample, delimiters=",\t;|")
                except csv.Error:
                    dialect = csv.excel
                rows = list(csv.DictReader(f, dialect=dialect))
    except UnicodeDecodeError:
        raise UserError(f"{src}: not a UTF-8 text manifest (CSV with a header line, or JSONL)") from None
    if not rows:
        raise UserError(f"{src}: the manifest has no rows")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    vcol = _pick_col(columns, video_col, VIDEO_COLS, "video path or URL", src, "--video-col")
    qa_only = qa_join or all("qa" in row for row in rows)
    ccol = _pick_col(columns, caption_col, CAPTION_COLS, "caption", src, "--caption-col", optional=qa_only)
    width = max(8, len(str(len(rows) - 1)))
    items = []
    for i, row in enumerate(rows):
        source = row.get(vcol)
        source = _resolve(str(source), src.parent) if source not in (None, "") else ""
        extra = {k: v for k, v in row.items() if k not in (vcol, ccol) and k is not None}
        value = row.get(ccol) if ccol is not None else None
        mc = mc_captions(value, extra)
        items.append(Item(i, f"{i:0{width}d}", source, _captions_of(value) if mc is None else mc, extra))
    return items


def scan_folder(src: Path) -> list[Item]:
    """Videos under ``src`` (recursive, sorted) with the caption in the sidecar ``.txt``."""
    videos = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in FOLDER_VIDEO_EXTS)
    if not videos:
        raise UserError(f"{src}: no videos found (looked for {', '.join(FOLDER_VIDEO_EXTS)})")
    width = max(8, len(str(len(videos) - 1)))
    items = []
    for i, path in enumerate(videos):
        txt = path.with_suffix(".txt")
        captions: list[str] = []
        if txt.is_file():
            lines = read_text(txt, ANNOTATION_BYTES, "caption sidecar", errors="replace").splitlines()
            captions = _captions_of(lines)
        items.append(Item(i, f"{i:0{width}d}", str(path), captions, {"file": str(path.relative_to(src))}))
    return items


def read_source(src: str | Path, video_col: Optional[str] = None, caption_col: Optional[str] = None,
                qa_join: bool = False) -> list[Item]:
    src = Path(src)
    if src.is_dir():
        return scan_folder(src)
    if src.is_file():
        return read_manifest(src, video_col, caption_col, qa_join)
    raise UserError(f"shards write: SRC '{src}' is neither a manifest file nor a folder")


def join_qa(items: list[Item], path: str | Path) -> dict[str, Any]:
    """Put each input's QA pairs (from the MSRVTT-QA / MSVD-QA annotation JSON or JSONL
    ``path``) into its json as ``qa``. An input's video id is its file name (with and
    without extension) or a manifest ``video_id``/``id`` column; a numeric annotation id
    ``7`` also matches ``video7`` / ``vid7`` (MSRVTT-QA, MSVD-QA file names)."""
    by_video, skipped = load_annotations(path)
    clip_ids: dict[int, set[str]] = {}
    for i, it in enumerate(items):
        names = id_candidates(it.source.rsplit("/", 1)[-1]) if it.source else set()
        for col in ID_COLS:
            if it.extra.get(col) not in (None, ""):
                names |= id_candidates(it.extra[col])
        clip_ids[i] = names
    joined, unmatched = join_annotations(clip_ids, by_video)
    names = sorted({n for it in items if it.source for n in id_candidates(it.source.rsplit("/", 1)[-1])})
    match = check_match(match_report(len(by_video) - len(unmatched), len(by_video), list(unmatched), names),
                        f"shards write --qa {path}", QA_JOIN_HINT)
    for i, pairs in joined.items():
        items[i].extra["qa"] = pairs
    return {"pairs": sum(len(p) for p in joined.values()), "clips_with_qa": len(joined),
            "clips_without_qa": len(items) - len(joined), "unmatched_pairs": sum(unmatched.values()),
            "skipped": skipped, **({"warning": match["warning"]} if "warning" in match else {})}
