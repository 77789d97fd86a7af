"""``regionvlp bench loss``: peak memory and time of the chunked alignment loss vs the
dense reference that materialises every region-word similarity at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from regionvlp.bench.common import interleaved_times
from regionvlp.runtime import device_name, max_rss_bytes, resolve_device, rss_bytes, synchronize
from omegaconf import OmegaConf
from regionvlp.config import LossConfig
from regionvlp.losses import AlignmentLoss
from regionvlp.outputs import TextOutput, VideoOutput
from regionvlp.errors import UserError

def loss_inputs(batch: int, regions: int, words: int, dim: int, device: torch.device, seed: int = 0):
    """Normalised random embeddings with ragged padding (a quarter of rows half-padded)."""
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


def loss_peak(variant: str, batch: int, regions: int, words: int, dim: int, chunk: int, device: str) -> dict[str, Any]:
    """Peak memory of one forward + backward of ``variant``; run it in a fresh process."""
    dev = resolve_device(device)
    # a tiny first call loads kernels and allocator pools, so the peak below is the loss's own
    _loss_step(variant, *loss_inputs(2, 2, 2, 4, dev), chunk=chunk)()
    step = _loss_step(variant, *loss_inputs(batch, regions, words, dim, dev), chunk=chunk)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        value = step()
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        method = "torch.cuda.max_memory_allocated minus allocated before the first forward+backward"
    else:
        before, high_before = rss_bytes(), max_rss_bytes()
        value = step()
        high_after = max_rss_bytes()
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
    inputs = loss_inputs(batch, regions, words, dim, dev)
    steps = {v: _loss_step(v, *inputs, chunk=chunk) for v in variants}
    for step in steps.values():
        step()
    return interleaved_times(steps, dev, repeats)


def _loss_step(variant: str, leaves, rm, tm, *, chunk: int) -> Callable[[], float]:
    """forward + backward of the whole loss on fixed inputs; returns the loss value."""
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
        proc = subprocess.run([sys.executable, "-c", "import json; from regionvlp.bench import loss as bench; " + code],
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
