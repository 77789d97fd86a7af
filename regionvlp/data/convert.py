"""``regionvlp shards convert URLS OUT --keep-frames N``: video shards → frame shards.

Each input shard (any tar of webdataset samples, e.g. what video2dataset writes) becomes
``OUT/<same name>``: every sample keeps its members and gains ``frame000.jpg`` …
(N evenly spaced frames, short side at most ``--frame-side``, 256 by default); ``--drop-video`` leaves the
video out. Shards are streamed (nothing but the current sample is held), written under
``NAME.PID.tmp`` and renamed when whole, so a re-run skips finished shards (resume); OUT is
held by one ``shards convert`` at a time (a second exits 2 naming the first), and a
dead writer's temp files are removed at start. A sample
without a decodable video is skipped and listed in ``OUT/skipped.jsonl``, as
``shards write`` does; a shard that cannot be read is listed too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from regionvlp.data.decode import VIDEO_EXTS
from regionvlp.data.matching import check_written
from regionvlp.data.output import SampleTarWriter, clear_stale_temps, finish_outputs, temp_name
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.skips import SkipCounter
from regionvlp.data.sources import parse_specs
from regionvlp.data.staging import Output
from regionvlp.data.writer import FRAME_SIDE, SkipItem, WriteOptions, add_frames, check_frame_options
from regionvlp.errors import UserError
from regionvlp.jsonio import json_loads
from regionvlp.limits import read_text

OPTIONS_BYTES = 1 << 20  # _convert/options.json: four settings


def _shard_names(urls: Sequence[str]) -> list[tuple[str, str]]:
    """(url, output name) pairs; output names must be unique."""
    pairs = [(u, u.split("?", 1)[0].rstrip("/").rpartition("/")[2] or "shard.tar") for u in urls]
    names = [n for _, n in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"shards convert: several inputs share the file name {dup[0]}; convert them into separate OUT folders")
    return pairs


def convert_sample(raw: dict[str, Any], opts: WriteOptions) -> dict[str, Any]:
    """One raw sample → its frame-shard members; raises :class:`SkipItem`."""
    video = next((k for k in raw if not k.startswith("__") and k.rpartition(".")[2] in VIDEO_EXTS), None)
    if video is None or not raw[video]:
        raise SkipItem("no_video", f"members: {', '.join(k for k in raw if not k.startswith('__'))}")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json_loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            raise SkipItem("bad_json", "json is not valid JSON") from None
        if not isinstance(meta, dict):
            raise SkipItem("bad_json", "json is not an object")
    sample = {k: v for k, v in raw.items() if not k.startswith("__")}
    out = add_frames(sample, video, meta, opts)
    if "json" not in raw:
        out.pop("json")  # keep the sample's members as they were: no json invented
    return out


def _convert_one(url: str, dest: Path, opts: WriteOptions, allow_pipe: bool) -> dict[str, Any]:
    counter = SkipCounter()
    stats: dict[str, Any] = {"samples": 0, "bytes": 0, "skipped": []}
    tmp = dest.with_name(temp_name(dest.name))
    try:
        with SampleTarWriter(tmp) as sink:  # keys made safe: no "..", no absolute member names
            for raw in tar_samples([url], counter, ReadOptions(allow_pipe=allow_pipe)):
                try:
                    members = convert_sample(raw, opts)
                except SkipItem as err:
                    stats["skipped"].append({"key": raw["__key__"], "source": url, "reason": err.reason, "detail": err.detail})
                    continue
                sink.write({"__key__": raw["__key__"], **members})
            stats["samples"], stats["bytes"] = sink.count, sink.bytes
        for bad in counter.bad:  # the input shard itself could not be read (whole or in part)
            stats["skipped"].append({"key": bad["key"], "source": url, "reason": bad["reason"], "detail": bad["detail"]})
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def convert_shards(urls: Sequence[str], out: str | Path, *, keep_frames: int, drop_video: bool = False,
                   frame_side: int = FRAME_SIDE, jpeg_quality: int = 90, allow_pipe: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Convert every shard of ``urls`` into ``out``; resume where a previous run stopped."""
    if keep_frames < 1:
        raise UserError("shards convert: --keep-frames must be >= 1")
    check_frame_options(keep_frames, drop_video, jpeg_quality, "shards convert", frame_side)
    start = time.perf_counter()
    pairs = _shard_names(parse_specs(list(urls), allow_pipe=allow_pipe).urls)
    opts = WriteOptions(frame_side=frame_side, keep_frames=keep_frames, drop_video=drop_video, jpeg_quality=jpeg_quality)
    with Output.held(out, "shards convert") as staged:  # a folder or a bucket, never pipe:; one writer per OUT
        summary = _convert_all(staged, pairs, opts, allow_pipe, progress)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    check_written(summary["samples"], summary["samples"] + sum(summary["skipped"].values()), summary["skipped"],
                  "shards convert")  # nothing converted: exit 2 with the counts
    return summary


def _convert_all(staged: Output, pairs: list[tuple[str, str]], opts: WriteOptions, allow_pipe: bool,
                 progress: bool) -> dict[str, Any]:
    """Every pending shard of ``pairs`` into the held OUT ``staged``; the summary."""
    out = staged.local
    clear_stale_temps(out, "*.tmp")  # leftovers of interrupted runs (any input name; this process holds OUT)
    state = out / "_convert"
    state.mkdir(parents=True, exist_ok=True)
    options = {"keep_frames": opts.keep_frames, "drop_video": opts.drop_video, "frame_side": opts.frame_side,
               "jpeg_quality": opts.jpeg_quality}
    opt_file = state / "options.json"
    if opt_file.is_file() and json_loads(read_text(opt_file, OPTIONS_BYTES, "shards convert state")) != options:
        raise UserError(f"{out} holds shards converted with other options; convert into an empty OUT (or delete it)")
    opt_file.write_text(json.dumps(options) + "\n")
    staged.publish("_convert/options.json", keep=True)
    resumed = 0
    for url, name in tqdm(pairs, desc="shards convert", unit="shard", file=sys.stderr, disable=not progress):
        stats_file = state / f"{name}.json"
        if stats_file.is_file() and staged.has(name):
            resumed += 1
            continue
        stats = _convert_one(url, out / name, opts, allow_pipe)
        stats_file.write_text(json.dumps(stats) + "\n")
        staged.publish(name)  # a bucket OUT: the shard whole, then its resume record
        staged.publish(f"_convert/{name}.json", keep=True)
    summary = _summary(out, state, pairs, resumed)
    staged.publish("skipped.jsonl", "sizes.json", keep=True)  # sizes.json last
    return {**summary, "out": staged.shown()}


def _summary(out: Path, state: Path, pairs: list[tuple[str, str]], resumed: int) -> dict[str, Any]:
    sizes, skipped, items, total = finish_outputs(out, {name: state / f"{name}.json" for _, name in pairs},
                                                  "shards convert")
    return {"out": str(out), "samples": sum(sizes.values()), "skipped": skipped, "shards": len(pairs),
            "resumed_shards": resumed, "bytes": total, "skipped_items": items[:100]}
