"""``regionvlp datasets prepare NAME --annotations PATH… --videos DIR OUT [--split S]``.

The adapter reads the annotation files; each split's clips are matched to the videos
under ``--videos`` (:class:`~regionvlp.data.datasets.base.VideoIndex`); the matched
clips go into ``OUT/SPLIT/manifest.jsonl`` and through the shard writer
(:func:`regionvlp.data.writer.write_shards`, same options, resumable) into
``OUT/SPLIT/NNNNNN.tar`` + ``sizes.json``; ``OUT/SPLIT/dataset.json`` records the
dataset, split, protocol, counts, the annotation files' SHA-256 and what was missing
(every missing clip id in ``OUT/SPLIT/missing.txt``). Nothing matched, or nothing
written, is a :class:`UserError` (exit 2).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from regionvlp.data.datasets import get_adapter
from regionvlp.data.datasets.base import Adapter, Split, VideoIndex
from regionvlp.data.matching import check_match, match_report
from regionvlp.data.output import local_output
from regionvlp.data.writer import write_shards
from regionvlp.errors import UserError
from regionvlp.runfolder import FolderLock
from regionvlp.runtime import file_sha256


MISSING_LISTED = 100  # missing clip ids in dataset.json (all of them in missing.txt)
PREPARE_LOCK = ".prepare.lock"  # OUT/SPLIT held while its manifest, shards and dataset.json are written


def choose_splits(adapter: Adapter, splits: dict[str, Split], wanted: Optional[str]) -> list[Split]:
    if not splits:
        raise UserError(f"datasets prepare {adapter.name}: the annotation files give no split; expected {adapter.files}")
    if wanted is not None:
        if wanted not in splits:
            raise UserError(f"datasets prepare {adapter.name}: --split {wanted} is not in these annotation files "
                            f"(they give: {', '.join(splits)})")
        return [splits[wanted]]
    return [s for s in splits.values() if s.default]


def manifest_rows(split: Split, index: VideoIndex) -> tuple[list[dict[str, Any]], list[str]]:
    """One manifest row per clip found under --videos; the ids of the clips not found."""
    rows, missing = [], []
    for clip in split.clips:
        path = index.resolve(clip)
        if path is None:
            missing.append(clip.id)
            continue
        row: dict[str, Any] = {"video": str(path.resolve()), "video_id": clip.id, **clip.extra}
        if clip.captions:
            row["caption"] = clip.captions if len(clip.captions) > 1 else clip.captions[0]
        rows.append(row)
    return rows, missing


def counts_of(split: Split, rows: list[dict[str, Any]], written: dict[str, Any]) -> dict[str, Any]:
    counts = {"annotated_clips": len(split.clips), "matched_clips": len(rows), "samples": written["samples"]}
    if any("qa" in r for r in rows):
        counts["questions"] = sum(len(r.get("qa", [])) for r in rows)
    if any("options" in r for r in rows):
        counts["mc_questions"] = sum("options" in r for r in rows)
    return counts


def prepare_split(adapter: Adapter, split: Split, index: VideoIndex, out: Path, write: dict[str, Any]) -> dict[str, Any]:
    rows, missing = manifest_rows(split, index)
    what = f"datasets prepare {adapter.name} --split {split.name}"
    match = check_match(match_report(len(rows), len(split.clips), missing, index.names()), what,
                        f"{adapter.hint} (--videos {index.root} holds {index.count} videos)")
    # held before manifest.jsonl is written (shards write then holds OUT/SPLIT/.lock inside this):
    # a second prepare into the same OUT exits 2 naming the first instead of rewriting its manifest
    with FolderLock(out, f"datasets prepare {adapter.name} OUT", name=PREPARE_LOCK):
        manifest = out / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (out / "missing.txt").write_text("".join(f"{m}\n" for m in missing), encoding="utf-8")
        written = write_shards(manifest, out, video_col="video", **write)
        skipped = Counter(split.skipped)
        skipped.update({"missing_video": len(missing)} if missing else {})
        skipped.update(written["skipped"])
        info = {"name": adapter.name, "split": split.name, "protocol": split.protocol,
                "counts": counts_of(split, rows, written), "skipped": dict(skipped), "match": match,
                "annotations": [{"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in split.files],
                "videos": str(index.root), "missing": missing[:MISSING_LISTED], "urls": written["urls"],
                "shards": written["shards"], "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return {**{k: v for k, v in info.items() if k not in ("missing", "written_at")},
            "samples": written["samples"], "out": str(out), "resumed_shards": written["resumed_shards"]}


def prepare_dataset(name: str, annotations: Sequence[str | Path], videos: str | Path, out: str | Path,
                    split: Optional[str] = None, **write: Any) -> dict[str, Any]:
    """Write the chosen splits of dataset ``name`` (every split its files give by default)
    under ``out/SPLIT``; ``write`` are :func:`write_shards` options (``shard_size``,
    ``workers``, ``max_side``, ``keep_frames`` …). Returns the JSON summary."""
    start = time.perf_counter()
    adapter = get_adapter(name)
    out = local_output(out, "datasets prepare")
    if not annotations:
        raise UserError(f"datasets prepare {name}: give --annotations ({adapter.files})")
    chosen = choose_splits(adapter, adapter.read([Path(p) for p in annotations]), split)
    index = VideoIndex(videos, adapter.sidecar_id)
    results = {s.name: prepare_split(adapter, s, index, out / s.name, write) for s in chosen}
    skipped: Counter = Counter()
    for r in results.values():
        skipped.update(r["skipped"])
    return {"dataset": name, "out": str(out), "splits": results, "samples": sum(r["samples"] for r in results.values()),
            "skipped": dict(skipped), "seconds": round(time.perf_counter() - start, 3)}
