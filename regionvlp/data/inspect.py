"""``regionvlp data inspect``: stream and decode samples as training would, one line each.

Every good sample gives one JSON-able line (key, caption preview, shape, decode ms); the
summary says how many samples came, what was skipped and why, and how fast decoding went.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from regionvlp.data.samples import iter_samples


PREVIEW_CHARS = 200  # longest caption/key `data inspect` prints


def inspect_samples(urls: Sequence[str], cfg=None, *, limit: int = 0, training: bool = False, emit=None,
                    region_shape: bool = True) -> dict[str, Any]:
    """Stream and decode samples as training would; ``emit(line)`` gets one dict per good
    sample (key, caption preview, shape, decode ms). Returns the summary (``samples``,
    ``skipped``, ``shards``, ...). ``region_shape=False``: region samples are held to
    the first one's K and F instead of the config's."""
    stream = iter_samples(urls, cfg, training=training, region_shape=region_shape)
    n, ms = 0, 0.0
    start = time.perf_counter()
    for s in stream:
        n += 1
        ms += s["decode_ms"]
        if emit is not None:
            line: dict[str, Any] = {"key": preview(s["__key__"]), "url": preview(s["__url__"]),
                                    "caption": preview(s["caption"]),
                                    "captions": len(s["captions"]), "media": s["media"]}
            if "frames" in s:
                line["frames"] = list(s["frames"].shape)
            else:
                line["regions"] = list(s["region_feats"].shape)
                line["real_regions"] = int(s["region_mask"].sum())
            line["decode_ms"] = round(s["decode_ms"], 2)
            emit(line)
        if limit and n >= limit:
            break
    return {
        "samples": n,
        "skipped": stream.skipped,
        "shards": stream.num_shards,
        "decode_ms_mean": round(ms / n, 2) if n else None,
        "seconds": round(time.perf_counter() - start, 3),
        "frames": stream.spec.num_frames,
        "size": stream.spec.size,
        "backend": stream.spec.backend,
        "captions_cut": stream.counter.captions_cut,
        "bad": [{k: preview(str(v)) for k, v in r.items()} for r in stream.bad[:20]],
    }


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters for printing (``…`` and the full length appended)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"
