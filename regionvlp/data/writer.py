"""Videos + captions → WebDataset tar shards: ``regionvlp shards write SRC OUT``.

SRC is a CSV or JSONL manifest (a video path/URL column and a caption column; every
other column goes into the sample's json) or a folder of videos with sidecar ``.txt``
captions (``a.mp4`` + ``a.txt``). Each input becomes one sample ``{key}.{mp4|webm|…}``
+ ``{key}.txt`` + ``{key}.json``; the key is the input's position (row order for a
manifest, sorted relative path for a folder), so the same SRC always gives the same
keys. Shard ``k`` holds inputs ``[k·N, (k+1)·N)``.

Every input is opened and its first frame decoded before it is written; one that
cannot be read, has no caption or no video stream is skipped, counted by reason and
listed (``OUT/skipped.jsonl``). A video larger than ``--max-side``, longer than
``--max-seconds`` or faster than ``--fps`` is re-encoded with PyAV (H.264, yuv420p);
anything else is copied byte for byte.

A shard is written under ``NNNNNN.tar.PID.tmp`` (OUT held by one writer) and renamed when complete, so a final
name always holds a whole shard; a re-run skips shards already complete (resume).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Optional

from tqdm import tqdm

from regionvlp.data.decode import DecodeError, decode_pyav, reformat
from regionvlp.data.output import (SampleTarWriter, clear_stale_temps, cut_captions, local_output, process_pool,
                                   temp_name)
from regionvlp.data.staging import Output
from regionvlp.data.inputs import Item, join_qa, read_source
from regionvlp.errors import UserError
from regionvlp.jsonio import json_loads
from regionvlp.limits import MEDIA_BYTES, ReadLimitError, read_file


# frame shards: the stored JPEGs' short side. 256 serves a 224 crop with room to crop
# (the 360p source kept would cost ~2x the JPEG decode for pixels the resize throws away)
FRAME_SIDE = 256
_STORE_AS = {"mp4": "mp4", "m4v": "mp4", "mov": "mov", "webm": "webm", "mkv": "mkv", "avi": "avi"}
_FORMAT_EXT = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "mkv", "avi": "avi"}


@dataclass
class WriteOptions:
    max_side: Optional[int] = None  # video: longer side
    max_seconds: Optional[float] = None
    fps: Optional[float] = None
    crf: int = 23
    keep_frames: int = 0  # frame shards: N evenly spaced frames stored as JPEG (0: none)
    drop_video: bool = False
    jpeg_quality: int = 90
    frame_side: int = FRAME_SIDE  # frame shards: the stored JPEGs' short side (0: as decoded)


def frame_members(data: bytes, num_frames: int, short_side: Optional[int], quality: int) -> dict[str, bytes]:
    """``frame000.jpg`` … : ``num_frames`` evenly spaced frames of a video (segment
    midpoints, as eval samples them), short side at most ``short_side``, as JPEG."""
    from PIL import Image

    frames = decode_pyav(data, num_frames, "uniform", short_side=short_side)  # [N, H, W, 3]
    out = {}
    for i, frame in enumerate(frames):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out[f"frame{i:03d}.jpg"] = buf.getvalue()
    return out


def add_frames(sample: dict[str, Any], video_ext: str, meta: dict[str, Any], opts: WriteOptions) -> dict[str, Any]:
    """A sample with ``opts.keep_frames`` stored frames added (and its video dropped with
    ``opts.drop_video``); raises :class:`SkipItem` when the video gives no frames."""
    try:
        frames = frame_members(sample[video_ext], opts.keep_frames, opts.frame_side or None, opts.jpeg_quality)
    except DecodeError as err:
        raise SkipItem("undecodable_video", f"{err.reason}: {err.detail}") from None
    meta = {**meta, "kept_frames": len(frames)}
    out = {k: v for k, v in sample.items() if not (opts.drop_video and k == video_ext)}
    out.update(frames)
    out["json"] = json.dumps(meta, default=str).encode("utf-8")
    return out


# -------------------------------------------------------------------------- inputs


def read_inputs(src: str | Path, out: str | Path, video_col: Optional[str], caption_col: Optional[str],
                max_caption_chars: Optional[int], qa: str | Path | None) -> tuple[Path, list[Item], dict[str, Any]]:
    """``shards write``'s output folder (local only: never ``pipe:`` or a URL), its inputs
    with every caption cut to ``max_caption_chars``, and the summary keys this adds
    (``captions_cut``, ``qa`` when QA annotations are joined)."""
    out = local_output(out, "shards write")
    items = read_source(src, video_col, caption_col, qa_join=qa is not None)
    extra: dict[str, Any] = {"captions_cut": cut_captions(items, max_caption_chars)}
    if qa is not None:
        extra["qa"] = join_qa(items, qa)
    return out, items, extra


# ---------------------------------------------------------------------- per input
class SkipItem(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail


def _read_media(source: str) -> bytes:
    if not source:
        raise SkipItem("missing_video", "no video path in the row")
    try:
        if "://" in source:
            from regionvlp.data.sources import read_bytes

            return read_bytes(source, limit=MEDIA_BYTES, retries=2)
        return read_file(source, MEDIA_BYTES, "video")
    except FileNotFoundError:
        raise SkipItem("missing_video", f"not found: {source}") from None
    except ReadLimitError as err:  # endless (/dev/zero, a server that never stops) or huge
        raise SkipItem("oversize", str(err)[:300]) from None
    except Exception as err:  # network, permission, ...
        raise SkipItem("unreadable_video", f"{type(err).__name__}: {err}") from None


def _probe(data: bytes) -> dict[str, Any]:
    """Container format and stream facts; raises SkipItem when no frame decodes."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise SkipItem("no_video_stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            first = next(container.decode(stream), None)
            if first is None:
                raise SkipItem("undecodable_video", "no frame decodes")
            return {"format": container.format.name, "codec": stream.codec_context.name,
                    "width": first.width, "height": first.height,
                    "fps": float(rate) if rate else None, "duration": duration,
                    "frames": stream.frames or None}
    except SkipItem:
        raise
    except Exception as err:  # av.error.InvalidDataError and friends
        raise SkipItem("undecodable_video", f"{type(err).__name__}: {err}") from None


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def reencode(data: bytes, info: dict[str, Any], opts: WriteOptions) -> tuple[bytes, dict[str, Any]]:
    """H.264 MP4 bounded by ``opts``: longest side, duration, frame rate."""
    import av

    w, h = info["width"], info["height"]
    scale = min(1.0, opts.max_side / max(w, h)) if opts.max_side else 1.0
    out_w, out_h = _even(w * scale), _even(h * scale)
    src_fps = info["fps"] or 25.0
    out_fps = min(src_fps, opts.fps) if opts.fps else src_fps
    rate = Fraction(out_fps).limit_denominator(1001)
    buf = io.BytesIO()
    n_out = 0
    with av.open(io.BytesIO(data)) as src, av.open(buf, "w", format="mp4") as dst:
        in_stream = src.streams.video[0]
        out = dst.add_stream("libx264", rate=rate)
        out.width, out.height, out.pix_fmt = out_w, out_h, "yuv420p"
        out.options = {"preset": "veryfast", "crf": str(opts.crf), "threads": "1"}
        next_t = 0.0
        for i, frame in enumerate(src.decode(in_stream)):
            t = frame.time if frame.time is not None else i / src_fps
            if opts.max_seconds is not None and t >= opts.max_seconds:
                break
            if t + 1e-6 < next_t:  # drop frames to reach out_fps
                continue
            next_t = (n_out + 1) / float(rate)
            new = reformat(frame, width=out_w, height=out_h, format="yuv420p")
            new.pts, new.time_base = n_out, Fraction(1) / rate
            for packet in out.encode(new):
                dst.mux(packet)
            n_out += 1
        for packet in out.encode():
            dst.mux(packet)
    if n_out == 0:
        raise SkipItem("undecodable_video", "no frame decodes")
    return buf.getvalue(), {"width": out_w, "height": out_h, "fps": float(rate), "frames": n_out,
                            "duration": n_out / float(rate)}


def _ext_for(source: str, fmt: str) -> Optional[str]:
    """The sample key the loader reads for this container, or None: re-encode."""
    ext = source.rsplit("?", 1)[0].rsplit(".", 1)[-1].lower() if "." in source.rsplit("/", 1)[-1] else ""
    if ext in _STORE_AS:
        return _STORE_AS[ext]
    return _FORMAT_EXT.get(fmt)


def make_sample(item: Item, opts: WriteOptions) -> dict[str, Any]:
    """The tar members of one input; raises :class:`SkipItem`."""
    if "mc_error" in item.extra:
        raise SkipItem("bad_mc_question", item.extra["mc_error"])
    if not item.captions and "qa" not in item.extra:  # a QA clip needs no caption
        raise SkipItem("missing_caption", "no caption" + (" (.txt sidecar missing or empty)" if "file" in item.extra else ""))
    data = _read_media(item.source)
    if not data:
        raise SkipItem("empty_video", "0 bytes")
    info = _probe(data)
    ext = _ext_for(item.source, info["format"])
    # with --keep-frames the video keeps its size (--frame-side bounds the stored frames)
    too_big = opts.max_side is not None and not opts.keep_frames and max(info["width"], info["height"]) > opts.max_side
    too_long = opts.max_seconds is not None and (info["duration"] or 0) > opts.max_seconds
    too_fast = opts.fps is not None and (info["fps"] or 0) > opts.fps + 1e-3
    reencoded = ext is None or too_big or too_long or too_fast
    if reencoded:
        try:
            data, new = reencode(data, info, opts)
        except SkipItem:
            raise
        except Exception as err:
            raise SkipItem("reencode_failed", f"{type(err).__name__}: {err}") from None
        info, ext = {**info, **new, "codec": "h264", "format": "mp4"}, "mp4"
    first = {"caption": item.captions[0]} if item.captions else {}  # a QA-only clip has no caption
    meta = {**item.extra, "status": "success", **first, "captions": item.captions, "source": item.source,
            "width": info["width"], "height": info["height"], "fps": info["fps"], "duration": info["duration"],
            "codec": info["codec"], "reencoded": reencoded}
    sample = {"__key__": item.key, ext: data, "json": json.dumps(meta, default=str).encode("utf-8")}
    if item.captions:
        sample["txt"] = item.captions[0].encode("utf-8")
    return add_frames(sample, ext, meta, opts) if opts.keep_frames else sample


def _work(args: tuple[Item, WriteOptions]) -> tuple[Item, Optional[dict[str, Any]], Optional[tuple[str, str]]]:
    item, opts = args
    try:
        return item, make_sample(item, opts), None
    except SkipItem as err:
        return item, None, (err.reason, err.detail)
    except Exception as err:  # never let one input end a long run
        return item, None, ("error", f"{type(err).__name__}: {err}")


# ------------------------------------------------------------------------- shards
def _claim_out(out: Path, src: str | Path, items: list[Item], shard_size: int, opts: WriteOptions) -> Path:
    """``out/_write`` (the resume state), refusing an OUT written from another SRC or
    with other options."""
    state = out / "_write"
    state.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(items, shard_size, opts)
    fp_file = state / "source.json"
    if fp_file.is_file() and json_loads(fp_file.read_text()).get("fingerprint") != fingerprint:
        raise UserError(f"{out} holds shards written from another SRC or with other options; "
                        "write to an empty OUT (or delete it) to start over")
    fp_file.write_text(json.dumps({"fingerprint": fingerprint, "src": str(src), "items": len(items),
                                   "shard_size": shard_size, **asdict(opts)}) + "\n")
    return state


def check_frame_options(keep_frames: int, drop_video: bool, jpeg_quality: int, command: str,
                        frame_side: int = FRAME_SIDE) -> None:
    if frame_side < 0 or frame_side == 1:
        raise UserError(f"{command}: --frame-side must be >= 2 (or 0: as decoded), got {frame_side}")
    if keep_frames < 0 or keep_frames > 999:
        raise UserError(f"{command}: --keep-frames must be between 0 and 999, got {keep_frames}")
    if drop_video and not keep_frames:
        raise UserError(f"{command}: --drop-video needs --keep-frames N (a sample needs its video or its frames)")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"{command}: --jpeg-quality must be between 1 and 100, got {jpeg_quality}")


def _fingerprint(items: list[Item], shard_size: int, opts: WriteOptions) -> str:
    fields = asdict(opts)
    if not opts.keep_frames:  # fingerprints of video-only outputs stay what they were before frame shards
        fields = {k: v for k, v in fields.items() if k not in ("keep_frames", "drop_video", "jpeg_quality", "frame_side")}
    h = hashlib.sha256(json.dumps([shard_size, fields]).encode())
    for it in items:
        qa = f"\t{it.extra['qa']}" if "qa" in it.extra else ""  # fingerprints without QA stay as they were
        h.update(f"{it.key}\t{it.source}\t{it.captions}{qa}\n".encode())
    return h.hexdigest()[:16]


def write_shards(src: str | Path, out: str | Path, *, shard_size: int = 1000, workers: int = 1,
                 max_side: Optional[int] = None, max_seconds: Optional[float] = None,
                 fps: Optional[float] = None, video_col: Optional[str] = None,
                 caption_col: Optional[str] = None, progress: bool = True, keep_frames: int = 0,
                 drop_video: bool = False, jpeg_quality: int = 90, qa: str | Path | None = None,
                 max_caption_chars: int = 2000, frame_side: int = FRAME_SIDE) -> dict[str, Any]:
    """Write ``out/NNNNNN.tar`` + ``sizes.json``; resume where a previous run stopped.
    ``keep_frames`` N > 0 writes frame shards (N JPEG frames per clip, short side at most
    ``frame_side``; the video left out with ``drop_video``). ``qa``: a QA annotation file
    joined to the inputs by video id (:func:`join_qa`). OUT must be a local folder;
    captions over ``max_caption_chars`` are cut (counted in ``captions_cut``)."""
    if shard_size < 1 or workers < 0:
        raise UserError("shards write: --shard-size must be >= 1 and --workers >= 0")
    if (max_side is not None and max_side < 2) or (max_seconds is not None and max_seconds <= 0) \
            or (fps is not None and fps <= 0):
        raise UserError("shards write: --max-side, --max-seconds and --fps must be positive")
    check_frame_options(keep_frames, drop_video, jpeg_quality, "shards write", frame_side)
    start = time.perf_counter()
    opts = WriteOptions(max_side=max_side, max_seconds=max_seconds, fps=fps, keep_frames=keep_frames,
                        drop_video=drop_video, jpeg_quality=jpeg_quality, frame_side=frame_side)
    with Output.held(out, "shards write") as staged:  # one writer per OUT (a bucket's staging too); a second exits 2
        out, items, extra = read_inputs(src, staged.local, video_col, caption_col, max_caption_chars, qa)
        state = _claim_out(out, src, items, shard_size, opts)
        staged.publish("_write/source.json", keep=True)
        n_shards = (len(items) + shard_size - 1) // shard_size
        clear_stale_temps(out)  # leftovers of interrupted runs (this process holds OUT)
        done = {k for k in range(n_shards) if (state / f"{k:06d}.json").is_file() and staged.has(f"{k:06d}.tar")}
        pending = [k for k in range(n_shards) if k not in done]
        jobs: Iterator[tuple[Item, WriteOptions]] = (
            (it, opts) for k in pending for it in items[k * shard_size:(k + 1) * shard_size])
        pool = None
        if workers > 1:
            pool = process_pool(workers)
            results = pool.imap(_work, jobs, chunksize=1)
        else:
            results = map(_work, jobs)
        bar = tqdm(total=len(items), initial=sum(len(items[k * shard_size:(k + 1) * shard_size]) for k in done),
                   desc="shards write", unit="video", file=sys.stderr, disable=not progress)
        sink: Optional[SampleTarWriter] = None
        tmp_path: Optional[Path] = None
        try:
            for k in pending:
                n_in = len(items[k * shard_size:(k + 1) * shard_size])
                name = f"{k:06d}.tar"
                tmp_path = out / temp_name(name)
                sink = SampleTarWriter(tmp_path)
                stats: dict[str, Any] = {"samples": 0, "bytes": 0, "skipped": []}
                for _ in range(n_in):
                    item, sample, skip = next(results)
                    if sample is None:
                        stats["skipped"].append({"key": item.key, "source": item.source, "reason": skip[0], "detail": skip[1]})
                    else:
                        sink.write(sample)
                    bar.update(1)
                sink.close()
                stats["samples"], stats["bytes"], sink = sink.count, sink.bytes, None
                (state / f"{k:06d}.json").write_text(json.dumps(stats) + "\n")
                os.replace(tmp_path, out / name)  # only now does the shard exist under its final name
                tmp_path = None
                staged.publish(name)  # a bucket OUT: the shard whole, then its resume record
                staged.publish(f"_write/{k:06d}.json", keep=True)
        finally:
            bar.close()
            if sink is not None:
                sink.close()
            if tmp_path is not None:
                tmp_path.unlink(missing_ok=True)
            if pool is not None:
                pool.terminate()

        summary = staged.finish_shards({f"{k:06d}.tar": state / f"{k:06d}.json" for k in range(n_shards)}, len(items),
                                       "shards write")
        return {**summary, "inputs": len(items), "resumed_shards": len(done),
                "seconds": round(time.perf_counter() - start, 3), **extra}
