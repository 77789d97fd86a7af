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


def loss_variant(variant: str, batch: int, regions: int, words: int, dim: int, chunk: int, device: str,
                 repeats: int) -> dict[str, Any]:
    """One variant, forward + backward, in this (fresh) process: with ``repeats == 0`` the
    peak bytes of one call, else the median wall and CPU seconds of ``repeats`` calls
    after one warm-up call."""
    from omegaconf import OmegaConf

    from regionvlp.config import LossConfig
    from regionvlp.losses import AlignmentLoss

    dev = resolve_device(device)
    cfg = OmegaConf.structured(LossConfig(chunk_size=chunk))
    loss_fn = AlignmentLoss(cfg).to(dev)

    def make_step(v_cls, t_cls, r, t, rm, tm) -> Callable[[], float]:
        return _loss_step(variant, loss_fn, cfg, v_cls, t_cls, r, t, rm, tm)

    # a tiny first call loads kernels and allocator pools, so the peak below is the loss's own
    (v0, t0, r0, w0), rm0, tm0 = _loss_inputs(2, 2, 2, 4, dev)
    make_step(v0, t0, r0, w0, rm0, tm0)()
    (v_cls, t_cls, r, t), rm, tm = _loss_inputs(batch, regions, words, dim, dev)
    step = make_step(v_cls, t_cls, r, t, rm, tm)
    for x in (v_cls, t_cls, r, t):  # the grads exist before the peak is measured
        x.grad = torch.zeros_like(x)
    if repeats > 0:
        value = step()  # warm-up
        cpu0 = time.process_time()
        seconds = time_per_call(step, dev, warmup=0, iters=repeats)
        return {"seconds": seconds, "cpu_seconds": (time.process_time() - cpu0) / repeats, "loss": value}
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        value = step()
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        method = "torch.cuda.max_memory_allocated minus allocated before the first forward+backward"
    else:
        before = _rss_bytes()
        value = step()
        peak = _maxrss_bytes() - before
        method = ("ru_maxrss high-water mark minus the resident set just before the first forward+backward, "
                  "each variant in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (freed buffers leave the RSS)")
    return {"peak_bytes": int(peak), "loss": value, "memory_method": method}


def _loss_step(variant, loss_fn, cfg, v_cls, t_cls, r, t, rm, tm) -> Callable[[], float]:
    from regionvlp.pathway import TextOutput, VideoOutput

    if variant == "chunked":
        def step() -> float:
            out = loss_fn(VideoOutput(v_cls, r, rm), TextOutput(t_cls, t, tm))["loss"]
            out.backward()
            return out.item()
    elif variant == "dense":
        def step() -> float:
            out = dense_alignment_loss(v_cls, t_cls, r, rm, t, tm, cfg.temperature, cfg.align_temperature,
                                       cfg.local_weight)
            out.backward()
            return out.item()
    else:
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
    # Memory: one call in a fresh process with a fixed glibc mmap threshold, so every
    # tensor buffer is its own mapping, returned on free, and the resident high-water
    # mark is the live tensors' (not allocator caching). Time: another fresh process
    # with the default allocator.
    runs: dict[str, dict[str, Any]] = {}
    for variant in ("chunked", "dense"):
        runs[variant] = {}
        for reps, env in ((0, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}), (repeats, dict(os.environ))):
            code = ("import json; from regionvlp.bench import loss_variant; "
                    f"print(json.dumps(loss_variant({variant!r}, {batch}, {regions}, {words}, {dim}, {chunk}, "
                    f"{str(dev)!r}, {reps})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                raise RuntimeError(f"bench loss: variant {variant} failed: {tail[0]}")
            runs[variant].update(json.loads(proc.stdout.strip().splitlines()[-1]))
        run = runs[variant]
        result[f"{variant}_per_s"] = round(1.0 / run["seconds"], 4)
        result[f"{variant}_seconds"] = round(run["seconds"], 4)
        result[f"{variant}_cpu_seconds"] = round(run["cpu_seconds"], 4)
        result[f"{variant}_peak_bytes"] = run["peak_bytes"]
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
