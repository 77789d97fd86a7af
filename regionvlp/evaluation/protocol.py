"""The ``protocol`` object of every eval result: how the number was obtained.

Retrieval numbers are only comparable under the same protocol (frames and sampling at
test, split, one caption or all, re-scoring, ties); the peers' trackers are full of
numbers that differ by exactly these. Every eval JSON carries::

    "protocol": {"task", "dataset", "split", "eval_split", "clips", "captions" | "questions",
                 "frames", "sampling", "size", "clips_per_video", "caption_mode",
                 "similarity", "local_weight", "rescore", "rescore_temperature", "ties",
                 "checkpoint", "checkpoint_sha256"}

``dataset`` / ``split`` come from the ``dataset.json`` that ``regionvlp datasets prepare``
writes beside the shards (None / the config's split name when there is none).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from regionvlp.checkpoint import file_sha256

DATASET_FILE = "dataset.json"
MAX_DATASET_FILE = 1 << 20  # bytes read from a dataset.json at most
TIES = "pessimistic: a wrong candidate scoring equal to the right one ranks above it"


def dataset_info(urls: list[str]) -> dict[str, Any]:
    """``name`` and ``split`` of the ``dataset.json`` beside the first local shard, {} when
    there is none (remote shards, hand-made shard sets) or it is not a small JSON object."""
    if not urls:
        return {}
    first = str(urls[0]).split("::")[0].split("@")[0]
    if "://" in first or first.startswith("pipe:"):
        return {}
    path = Path(first).parent / DATASET_FILE  # a brace pattern's folder is the shards' folder
    try:
        if not path.is_file() or path.stat().st_size > MAX_DATASET_FILE:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("name", "split") if isinstance(data.get(k), (str, int))}


def similarity_name(local_weight: float) -> str:
    return "global" if local_weight == 0 else "global + λ·local"


def eval_protocol(cfg: Any, split: str, *, local_weight: float | None, clips: int, texts: int,
                  qa: bool = False) -> dict[str, Any]:
    """The protocol of one eval on ``cfg.data.<split>`` (checkpoint fields: :func:`checkpoint_stamp`)."""
    info = dataset_info([str(u) for u in cfg.data[split].urls])
    ev = cfg.eval
    out: dict[str, Any] = {
        "task": "qa" if qa else "retrieval",
        "dataset": info.get("name"),
        "split": info.get("split", split),
        "eval_split": split,
        "clips": int(clips),
        "questions" if qa else "captions": int(texts),
        "frames": int(cfg.data.num_frames),
        "sampling": str(cfg.data.eval_sampling),
        "size": int(cfg.data.size),
        "clips_per_video": 1 if qa else int(ev.clips_per_video),
    }
    if not qa:
        lam = float(local_weight or 0.0)
        out.update(caption_mode=str(ev.captions), similarity=similarity_name(lam), local_weight=lam,
                   rescore=str(ev.rescore),
                   rescore_temperature=float(ev.rescore_temperature) if ev.rescore != "none" else None,
                   ties=TIES)
    out.update(checkpoint=None, checkpoint_sha256=None)
    return out


def checkpoint_sha256(path: Path) -> str:
    """An export's ``model.safetensors`` SHA-256; for a checkpoint folder, the SHA-256 over
    its files' names and contents' SHA-256s (sorted by name)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.is_file()):
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def checkpoint_stamp(checkpoint: str, weights: Path) -> dict[str, str]:
    """``checkpoint`` (as given) and ``checkpoint_sha256`` of the weights that were loaded."""
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256(weights)}
