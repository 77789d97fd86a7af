"""Helpers for the data tests: tiny PyAV-encoded clips and tar shards written in-test."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def encode_clip(num_frames: int = 8, width: int = 32, height: int = 24, fps: int = 8, gop: int = 4,
                codec: str = "libx264", fmt: str = "mp4") -> bytes:
    """An H.264 clip whose frame i is a flat colour coding i (see :func:`frame_index`),
    so tests can tell which frame a sampler picked."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        st = out.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.gop_size = gop
        for i in range(num_frames):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = (i % 16) * 16 + 8, (i // 16) * 16 + 8, 128
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def frame_index(frame: np.ndarray) -> int:
    """The index coded into a decoded ``[H, W, 3]`` frame of :func:`encode_clip` (< 256)."""
    r, g = frame[..., 0].mean(), frame[..., 1].mean()
    return int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16))


def encode_image(fmt: str = "JPEG", width: int = 40, height: int = 30) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> Path:
    """Samples (``__key__`` + ext → bytes/str/dict) → a tar in webdataset layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                if isinstance(value, dict):
                    value = json.dumps(value)
                if isinstance(value, str):
                    value = value.encode()
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
    return path


def clip_shards(root: Path, shards: int, per_shard: int, *, clip: bytes | None = None, sizes: bool = True) -> list[Path]:
    """``shards`` tars of ``per_shard`` tiny clips each (keys ``s{shard}_{i}``) + sizes.json."""
    clip = clip if clip is not None else encode_clip(4, 16, 16, gop=2)
    paths = []
    for s in range(shards):
        samples = [{"__key__": f"s{s}_{i}", "mp4": clip, "txt": f"clip {s} {i}",
                    "json": {"status": "success", "captions": [f"clip {s} {i}", f"other {s} {i}"]}}
                   for i in range(per_shard)]
        paths.append(write_tar(root / f"shard-{s:03d}.tar", samples))
    if sizes:
        (root / "sizes.json").write_text(json.dumps({p.name: per_shard for p in paths}))
    return paths
