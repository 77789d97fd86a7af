"""``regionvlp shards check URLS``: decode every sample the way training does, before a
long run finds out the hard way. Reports good samples, bad counts by reason and the
bad keys (with the shard and what went wrong)."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence

from tqdm import tqdm

from regionvlp.config import load_config
from regionvlp.data import iter_samples
from regionvlp.data.sources import load_sizes
from regionvlp.errors import UserError


def check_shards(urls: Sequence[str], *, config: Optional[str] = None, overrides: Sequence[str] = (),
                 training: bool = True, max_bad_keys: int = 1000, allow_pipe: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Stream ``urls`` through :func:`regionvlp.data.iter_samples` (same tar reading,
    skip rules, frame sampling and resize as the training loader, single process)."""
    if not urls:
        raise UserError("shards check: give one or more shard URLs")
    cfg = load_config(config, list(overrides))
    if allow_pipe:
        cfg.data.allow_pipe = True
    start = time.perf_counter()
    # region samples must match the config's K / feature size when one is given, else the first one's
    stream = iter_samples(list(urls), cfg, training=training, region_shape=config is not None)
    good, decode_ms = 0, 0.0
    per_shard: dict[str, int] = {}  # samples seen (good or bad) per shard URL
    bar = tqdm(desc="shards check", unit="sample", file=sys.stderr, disable=not progress)
    try:
        for sample in stream:
            good += 1
            decode_ms += float(sample.get("decode_ms", 0.0))
            url = sample.get("__url__", "")
            per_shard[url] = per_shard.get(url, 0) + 1
            bar.update(1)
            if stream.skipped:
                bar.set_postfix(bad=sum(stream.skipped.values()), refresh=False)
    finally:
        bar.close()
    skipped = dict(sorted(stream.skipped.items()))
    bad = sum(skipped.values())
    records = stream.bad[:max_bad_keys]
    for r in records[:20]:
        print(f"shards check: bad {r['key'] or r['url']}: {r['reason']} {r['detail']}".rstrip(), file=sys.stderr)
    for r in stream.bad:
        if r["key"] and r["reason"] not in ("corrupt_shard", "unreadable_shard"):
            per_shard[r["url"]] = per_shard.get(r["url"], 0) + 1
    sizes = _compare_sizes(stream.shards.urls, per_shard, allow_pipe=bool(cfg.data.allow_pipe))
    if not sizes["ok"]:
        print(f"shards check: sizes.json disagrees with the shards: {sizes['mismatches'][:5]}", file=sys.stderr)
    seconds = time.perf_counter() - start
    return {
        "samples": good,
        "skipped": skipped,
        "shards": stream.num_shards,
        "shards_listed": len(stream.shards.urls),
        "bad": bad,
        "ok": bad == 0 and sizes["ok"],
        "captions_cut": stream.counter.captions_cut,
        "bad_keys": [r["key"] for r in records if r["key"]],
        "bad_samples": records,
        "num_frames": int(cfg.data.num_frames),
        "size": int(cfg.data.size),
        "decode_ms_mean": round(decode_ms / good, 2) if good else None,
        "sizes_json": sizes,
        "seconds": round(seconds, 3),
    }


def _compare_sizes(urls: Sequence[str], per_shard: dict[str, int], *, allow_pipe: bool) -> dict[str, Any]:
    """Do the ``sizes.json`` files beside the shards (what the loader uses for the epoch
    length) agree with the samples found? ``missing`` lists folders without one."""
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        if url.startswith("pipe:"):
            continue
        head, _, name = url.rpartition("/")
        by_dir.setdefault(head, []).append(name)
    missing, mismatches = [], []
    for head, names in by_dir.items():
        sizes_url = f"{head}/sizes.json" if head else "sizes.json"
        sizes = load_sizes(sizes_url, allow_pipe=allow_pipe)
        if sizes is None:  # absent or unreadable: nothing to compare
            missing.append(sizes_url)
            continue
        for name in names:
            url = f"{head}/{name}" if head else name
            found = per_shard.get(url, 0)
            listed = sizes.get(name)
            if listed is None or listed != found:
                mismatches.append({"shard": url, "sizes_json": listed, "found": found})
    return {"ok": not mismatches, "missing": missing, "mismatches": mismatches[:100]}
