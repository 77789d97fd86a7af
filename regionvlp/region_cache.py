"""The region-cache route of ``regionvlp compare`` (``--region-cache DIR``): a pathway
that reads region shards (its registry entry has a ``region_shape`` and a batch
transform: the detector pathway) trains from regions extracted once, instead of running
its frozen detector on every training batch.

    data.train.urls ─ regions extract (the pathway's own frozen detector, once) ─ DIR/NAME/train
      └─ training reads DIR/NAME/train  (frames sampled from the stored ones, as from video)
    data.val.urls ─┬─ regions extract ─ DIR/NAME/val ─ periodic validation, the QA stage's eval
                   └─ the frozen detector in the loop ─ the final evaluation

This is the paper's own route (extract once, train on regions); the in-loop route still
runs for the final evaluation, on the raw val frames. The val regions are extracted at
``data.num_frames`` per clip with ``data.eval_sampling``, the frames the loop would see,
so the last validation (cached regions) and the final evaluation (regions in the loop) of
the same weights differ only by the fp16 rounding of the stored features. The budget
check (:func:`regionvlp.compare.check_same_budget`) runs on the configs as given: every
pathway sees the same clips; only where one's regions come from differs, and the report
says so per row (:func:`route_of`, ``RunResult.route``).

Storing more frames per clip than ``data.num_frames`` (``frames``) keeps the temporal
sampling of training: the loader draws ``data.num_frames`` of the stored frames with
``data.train_sampling`` (:func:`regionvlp.data.regions.select_region_frames`), as it draws
them from a video. The cache folder resumes like any ``regions extract`` OUT (the
extractor record, weights fingerprint included, must match).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from regionvlp import pathways
from regionvlp.data.regions import FEATURE_DTYPES
from regionvlp.data.sources import parse_specs
from regionvlp.errors import UserError

IN_LOOP = "in-loop"
CACHED = "region-cache"


@dataclass
class RegionCache:
    """Where and how the region-cache route extracts: ``root/NAME/train``, ``frames``
    stored per clip (None: ``data.num_frames``), features as ``feature_dtype``."""

    root: Path
    frames: Optional[int] = None
    feature_dtype: str = "fp16"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.feature_dtype not in FEATURE_DTYPES:
            raise UserError(f"compare: --region-cache-dtype {self.feature_dtype!r}; expected one of "
                            f"{', '.join(FEATURE_DTYPES)}")
        if self.frames is not None and not 1 <= int(self.frames) <= 1024:
            raise UserError(f"compare: --region-cache-frames {self.frames}; expected 1..1024")


def can_cache(cfg: Any) -> bool:
    """Whether ``cfg``'s pathway can train from region shards (it reads region shards and
    has a frozen batch transform that makes them)."""
    entry = pathways.of(cfg)
    return entry.region_shape is not None and entry.batch_transform is not None


IN_LOOP_FRAMES = "frames, regions in the loop"


def _shards(extract: dict[str, Any]) -> str:
    return f"region shards ({extract['feature_dtype']}, {extract['num_frames']} frames stored per clip, " \
           f"{extract['samples']} clips)"


def route_of(train: Optional[dict[str, Any]] = None, val: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What the report says of a row's route: where its training, validation (periodic and
    the QA stage's) and final-eval regions came from; ``train``/``val``: the extractions."""
    if train is None or val is None:
        return {"route": IN_LOOP, "train": IN_LOOP_FRAMES, "val": IN_LOOP_FRAMES, "eval": IN_LOOP_FRAMES}
    return {"route": CACHED, "train": _shards(train), "val": _shards(val), "eval": IN_LOOP_FRAMES,
            "extract_seconds": round(train["seconds"] + val["seconds"], 1), "cache": str(Path(train["out"]).parent)}


def _extract_split(cfg: Any, urls: list[str], out: Path, cache: RegionCache, frames: Optional[int]
                   ) -> tuple[dict[str, Any], list[str]]:
    """``regions extract`` of ``urls`` into ``out`` (resumed when already there): its
    summary (``seconds`` added) and the region shards' URLs."""
    from regionvlp.detector.extract import extract_regions, input_shards

    t0 = time.perf_counter()
    summary = extract_regions(cfg, urls, out, feature_dtype=cache.feature_dtype, keep_frames=frames)
    summary["seconds"] = time.perf_counter() - t0
    _, names = input_shards(cfg, urls)  # the output names, in the order parse_specs flattens the sources
    sources = [(s.weight, len(s.urls)) for s in parse_specs(urls, allow_pipe=bool(cfg.data.allow_pipe)).sources]
    return summary, cached_urls(sources, [str(out / n) for n in names])


def cached_urls(sources: list[tuple[float, int]], paths: list[str]) -> list[str]:
    """The region shards' URLs for the sources ``(weight, shard count)`` they were
    extracted from, in order: plain paths when every shard weighs the same; else each
    shard its own source weighing ``weight / count``, so resampling draws a shard as
    often as from the original spec (a source by weight, then a shard in it uniformly)."""
    per_shard = [weight / count for weight, count in sources for _ in range(count)]
    if len(set(per_shard)) <= 1:
        return list(paths)
    return [f"{path}@{weight!r}" for path, weight in zip(paths, per_shard)]


def use_region_cache(cfg: Any, name: str, cache: RegionCache) -> dict[str, Any]:
    """Extract ``cfg``'s training regions into ``cache.root/name/train`` (``cache.frames``
    per clip) and its val regions into ``.../val`` (``data.num_frames`` per clip, as
    evaluation samples them: the same frames the loop would see), point
    ``cfg.data.train.urls`` / ``cfg.data.val.urls`` at them; returns :func:`route_of`'s
    record. The config's detector settings and weights are the extractor's. The caller
    runs the final evaluation on the raw val frames (the detector in the loop)."""
    root = cache.root / name
    print(f"compare: {name}: extracting its train and val regions once → {root}", file=sys.stderr, flush=True)
    train, cfg.data.train.urls = _extract_split(cfg, list(cfg.data.train.urls), root / "train", cache, cache.frames)
    val, cfg.data.val.urls = _extract_split(cfg, list(cfg.data.val.urls), root / "val", cache, None)
    cfg.data.train.samples_per_epoch = None  # sizes.json beside the region shards counts what was extracted
    cfg.data.val.samples_per_epoch = None
    return route_of(train, val)
