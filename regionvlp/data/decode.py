"""Decode one sample's media into a clip: sparse frame sampling, resize + crop.

Only the frames the sampler asks for are decoded: decord reads them by index
(``get_batch``), PyAV seeks to the keyframe before a far-away frame and stops at the
last needed one. A long video is never decoded whole for a few frames. Output: uint8
``[T, 3, H, W]``, ``H = W = size``; a still image is a one-frame clip (bounded by header).
"""

from __future__ import annotations

import io
import math
import os
import random
import re
from bisect import bisect_right
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from regionvlp.data.imagecost import decode_cost_problem


VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FRAME_EXT = re.compile(r"frame(\d{3,6})\.jpg")  # frame shards: {key}.frame000.jpg, {key}.frame001.jpg, ...
SAMPLINGS = ("random_segment", "uniform", "first", "keyframe")
MAX_IMAGE_PIXELS = 4096 * 4096  # default still-image limit (data.max_image_pixels), checked before decoding
BACKENDS = ("auto", "decord", "pyav")
KEYFRAME_PROBE = {"threads": "1", "skip_frame": "all"}  # codec options for PyAV's probe on open


class DecodeError(Exception):
    """Media that cannot become a clip. ``reason`` is the skip-count key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------- sampling
def sample_indices(num_total: int, num_frames: int, mode: str, rng: Optional[random.Random] = None) -> list[int]:
    """T frame indices out of ``num_total``.

    ``random_segment``: one random frame in each of T equal segments (training);
    ``uniform``: the segment midpoints (eval); ``first``: the first T frames.
    Fewer frames than T repeat indices. (``keyframe`` needs the keyframe positions:
    see :func:`keyframe_indices`; here, with none known, it is ``random_segment``.)
    """
    if num_total <= 0:
        raise DecodeError("empty_video", "no frames")
    if mode == "first":
        return [min(i, num_total - 1) for i in range(num_frames)]
    edges = [num_total * i / num_frames for i in range(num_frames + 1)]  # np.linspace's, without its per-call cost
    out = []
    for i in range(num_frames):
        lo, hi = edges[i], edges[i + 1]
        if mode == "uniform":
            idx = int((lo + hi) / 2)
        elif mode in ("random_segment", "keyframe"):
            rng = rng or random
            lo_i, hi_i = int(math.floor(lo)), max(int(math.ceil(hi)) - 1, int(math.floor(lo)))
            idx = rng.randint(lo_i, hi_i)
        else:
            raise ValueError(f"unknown frame sampling {mode!r}; choose one of {', '.join(SAMPLINGS)}")
        out.append(min(max(idx, 0), num_total - 1))
    return out


def keyframe_indices(keys: Sequence[int], num_total: int, num_frames: int, rng: Optional[random.Random] = None) -> list[int]:
    """T keyframe indices for ``keyframe`` sampling: a random frame in each of T equal
    segments, then the keyframe at or before it (decoding that one frame needs no other).

    A pick that would repeat or go back to an earlier one moves on to the next keyframe
    when there is one, so the T frames are distinct and in segment order whenever the
    clip has enough keyframes; otherwise the last one repeats.
    """
    keys = sorted({int(k) for k in keys if 0 <= int(k) < num_total}) or [0]
    out: list[int] = []
    for target in sample_indices(num_total, num_frames, "random_segment", rng):
        i = max(bisect_right(keys, target) - 1, 0)
        if out and keys[i] <= out[-1]:
            nxt = bisect_right(keys, out[-1])
            i = nxt if nxt < len(keys) else i
        out.append(keys[i] if not out or keys[i] >= out[-1] else out[-1])
    return out


def scaled_dims(width: int, height: int, short_side: Optional[int]) -> Optional[tuple[int, int]]:
    """(width, height) with the short side exactly ``short_side`` and the aspect kept,
    for the decoder's converter to scale to; None when the frame is not larger."""
    if short_side is None or min(width, height) <= short_side:
        return None
    if width <= height:
        return short_side, max(short_side, int(round(height * short_side / width)))
    return max(short_side, int(round(width * short_side / height))), short_side


# ---------------------------------------------------------------------- backends
def _have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


def video_dims(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from the container's stream header (nothing decoded); None when
    PyAV cannot tell."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            ctx = container.streams.video[0].codec_context
            return (int(ctx.width), int(ctx.height)) if ctx.width and ctx.height else None
    except Exception:  # unreadable here: the decoder reports it with its own reason
        return None


def decode_decord(data: bytes, num_frames: int, mode: str, rng: Optional[random.Random] = None,
                  short_side: Optional[int] = None) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 via decord ``get_batch`` (reads only the needed frames).

    ``short_side``: decord's converter scales each frame to that short side (the size is
    read from the stream header first). ``keyframe``: indices from ``get_key_indices``."""
    import decord

    src_dims = video_dims(data) if short_side is not None else None
    dims = scaled_dims(*src_dims, short_side) if src_dims else None
    size_kw = {"width": dims[0], "height": dims[1]} if dims else {}
    error: Optional[DecodeError] = None
    frames = None
    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, **size_kw)
    except Exception as err:  # decord raises DECORDError (a RuntimeError) on bad input
        error = DecodeError("corrupt_media", f"decord: {str(err).splitlines()[0][:200]}")
    else:
        try:
            n = len(vr)
            if n <= 0:
                error = DecodeError("empty_video", "decord: 0 frames")
            else:
                if mode == "keyframe":
                    idx = keyframe_indices(vr.get_key_indices(), n, num_frames, rng)
                else:
                    idx = sample_indices(n, num_frames, mode, rng)
                frames = vr.get_batch(idx).asnumpy()  # [T, H, W, 3]
        except Exception as err:
            error = DecodeError("corrupt_media", f"decord: {str(err).splitlines()[0][:200]}")
        finally:
            # free the reader (and join its decoder thread) now: a reader kept alive by a
            # traceback cycle would be collected in a forked DataLoader worker and abort it
            del vr
    if error is not None:
        raise error  # raised outside the except blocks: no traceback chain to this frame's data
    return frames


def _pyav_frame_count(stream, container) -> tuple[int, float]:
    """(frame count, fps) from container metadata; count 0 when unknown."""
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    n = int(stream.frames or 0)
    if n <= 0:
        if stream.duration and stream.time_base:
            n = int(round(float(stream.duration * stream.time_base) * fps))
        elif container.duration:
            n = int(round(container.duration / 1_000_000 * fps))
    return n, fps


def decode_pyav(
    data: bytes,
    num_frames: int,
    mode: str,
    rng: Optional[random.Random] = None,
    short_side: Optional[int] = None,
    seek_gap: int = 48,
) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 via PyAV.

    Frames are visited in order; when the next wanted frame is more than ``seek_gap``
    frames ahead the demuxer seeks to the keyframe before it. Decoding stops at the
    last wanted frame. ``short_side`` lets swscale shrink while converting to RGB.
    ``keyframe``: seek to the keyframe at or before each pick and decode only it
    (``skip_frame = "NONKEY"``), see :func:`pyav_keyframes`.
    """
    import av

    try:
        # keyframe: the stream probe on open decodes nothing and starts no threads (it
        # would otherwise decode the first frames, costing as much as the pick itself)
        container = av.open(io.BytesIO(data), mode="r", options=KEYFRAME_PROBE if mode == "keyframe" else None)
    except Exception as err:
        raise DecodeError("corrupt_media", f"pyav: {str(err).splitlines()[0][:200]}") from None
    try:
        if not container.streams.video:
            raise DecodeError("empty_video", "pyav: no video stream (zero frames)")
        stream = container.streams.video[0]
        if mode == "keyframe":
            stream.codec_context.thread_count = 1  # one frame per seek: threads only add start-up work
        else:
            stream.thread_type = "AUTO"
        n, fps = _pyav_frame_count(stream, container)
        if n <= 0:
            # metadata says nothing (raw streams, broken containers): count in one pass,
            # then reopen (such streams often cannot seek)
            n = sum(1 for _ in container.decode(stream))
            if n <= 0:
                raise DecodeError("empty_video", "pyav: 0 frames")
            container.close()
            container = av.open(io.BytesIO(data), mode="r")
            stream = container.streams.video[0]
        if mode == "keyframe":
            idx, got = pyav_keyframes(container, stream, n, fps, num_frames, rng, short_side)
            return np.stack([got[i] for i in idx])
        idx = sample_indices(n, num_frames, mode, rng)
        wanted = sorted(set(idx))
        got = _pyav_read(container, stream, wanted, fps, short_side, seek_gap)
        if not got:
            raise DecodeError("corrupt_media" if n else "empty_video", "pyav: no frame decoded")
        missing = [i for i in wanted if i not in got]
        if missing:
            # metadata over-counts (VFR / truncated tail): fall back to the last decoded
            # frame only when the stream ended close to the claimed end
            last = max(got)
            if last < 0.9 * (n - 1):
                raise DecodeError("corrupt_media", f"pyav: stream ended at frame {last} of {n}")
            for i in missing:
                got[i] = got[last]
        return np.stack([got[i] for i in idx])
    except DecodeError:
        raise
    except Exception as err:  # av.error.*, struct errors in broken containers
        raise DecodeError("corrupt_media", f"pyav: {str(err).splitlines()[0][:200]}") from None
    finally:
        container.close()


def _pyav_start(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def pyav_keyframes(container, stream, n: int, fps: float, num_frames: int, rng: Optional[random.Random],
                   short_side: Optional[int]) -> tuple[list[int], dict[int, np.ndarray]]:
    """``keyframe`` sampling with PyAV: (the T frame indices, index → [H, W, 3]).

    One frame: a random time, then a backward seek (the demuxer's index lands on the
    keyframe at or before it). T frames: the keyframe packets are listed first (demux
    only, nothing decoded) and :func:`keyframe_indices` picks them. Exactly the keyframe
    packet is decoded (``skip_frame = "NONKEY"``, then drained): fed packet by packet, a
    decoder with B-frame delay would read on to the next keyframe before giving a frame.
    """
    tb, start = float(stream.time_base), _pyav_start(stream)
    to_index = lambda pts: int(round((float(pts) * tb - start) * fps))  # noqa: E731
    if num_frames == 1:
        seeks = [int((start + sample_indices(n, 1, "random_segment", rng)[0] / fps) / tb)]
    else:
        key_pts = sorted(p.pts for p in container.demux(stream) if p.is_keyframe and p.pts is not None)
        by_index = {to_index(p): p for p in key_pts}
        seeks = [by_index[i] for i in keyframe_indices(list(by_index), n, num_frames, rng)]
    ctx = stream.codec_context
    ctx.skip_frame = "NONKEY"
    idx: list[int] = []
    out: dict[int, np.ndarray] = {}
    for pts in seeks:
        container.seek(pts, stream=stream, backward=True, any_frame=False)
        packet = next((p for p in container.demux(stream) if p.is_keyframe and p.size), None)
        frames = (ctx.decode(packet) + ctx.decode(None)) if packet is not None else []
        ctx.flush_buffers()  # ready for the next seek after the drain
        if not frames:
            raise DecodeError("corrupt_media", "pyav: no keyframe decodes")
        frame = frames[0]
        i = to_index(frame.pts) if frame.pts is not None else 0
        if i not in out:
            out[i] = _to_rgb(frame, short_side)
        idx.append(i)
    return idx, out


def _pyav_read(container, stream, wanted: Sequence[int], fps: float, short_side: Optional[int], seek_gap: int) -> dict[int, np.ndarray]:
    """Decode the frames at sorted indices ``wanted``; returns index → [H, W, 3]."""
    tb, start = float(stream.time_base), _pyav_start(stream)
    out: dict[int, np.ndarray] = {}
    pos = 0  # wanted[pos] is the next frame to find
    frame_iter = None
    current = -1  # index of the last decoded frame
    can_seek = True
    seeked_for = -1  # seek at most once per target (a keyframe may lie further back than seek_gap)
    while pos < len(wanted):
        target = wanted[pos]
        if can_seek and target - current > seek_gap and seeked_for != target:
            seeked_for = target
            pts = int((start + target / fps) / tb)
            try:
                container.seek(pts, stream=stream, backward=True, any_frame=False)
                frame_iter = container.decode(stream)
            except Exception:  # not seekable: read on sequentially
                can_seek = False
        if frame_iter is None:
            frame_iter = container.decode(stream)
        frame = next(frame_iter, None)
        if frame is None:
            break
        if frame.pts is not None:
            current = int(round((float(frame.pts) * tb - start) * fps))
        else:
            current += 1
        while pos < len(wanted) and wanted[pos] <= current:
            if wanted[pos] == current or wanted[pos] not in out:
                out[wanted[pos]] = _to_rgb(frame, short_side)
            pos += 1
    return out


@lru_cache(maxsize=1)
def _reformatter(pid: int):
    from av.video.reformatter import VideoReformatter

    return VideoReformatter()


def reformat(frame, **kwargs):
    """``frame`` converted on one thread by this process's one reformatter (kept between
    frames), never PyAV's ``frame.reformat``: its slice threads hang a forked worker."""
    return _reformatter(os.getpid()).reformat(frame, threads=1, **kwargs)


def _to_rgb(frame, short_side: Optional[int]) -> np.ndarray:
    """``[H, W, 3]`` RGB; swscale scales to ``short_side`` (area filter, antialiased)
    in the same pass as the colour conversion: no full-size RGB frame is made."""
    dims = scaled_dims(frame.width, frame.height, short_side)
    size = {} if dims is None else {"width": dims[0], "height": dims[1], "interpolation": "AREA"}
    return reformat(frame, format="rgb24", **size).to_ndarray()


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``[1, H, W, 3]`` uint8 from jpg/png/webp bytes; an image of more than ``max_pixels``
    (from its header, before any pixel is decoded) is ``oversize``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if (why := decode_cost_problem(im, data, max_pixels, whole=True)) is not None:
                raise DecodeError("oversize", f"image: {why}")
            arr = np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise DecodeError("oversize", f"image: {str(err).splitlines()[0][:200]}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DecodeError("corrupt_media", f"image: {str(err).splitlines()[0][:200]}") from None
    if arr.size == 0:
        raise DecodeError("corrupt_media", "image: empty")
    return arr[None]


def decode_video(
    data: bytes,
    num_frames: int,
    mode: str,
    backend: str = "auto",
    rng: Optional[random.Random] = None,
    short_side: Optional[int] = None,
) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 with the chosen backend.

    ``auto``: PyAV (the faster sparse reader: `bench data` in docs/benchmarks.md), decord
    where importable for a file PyAV cannot read, and a still-image reader for an image
    stored under a video extension.
    """
    if not data:
        raise DecodeError("empty_video", "0 bytes")
    if backend == "decord":
        return decode_decord(data, num_frames, mode, rng, short_side)
    if backend == "pyav":
        return decode_pyav(data, num_frames, mode, rng, short_side)
    if backend != "auto":
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    # keep errors as fresh (reason, detail) objects: a kept exception's traceback would tie
    # this frame (and the video bytes) into a reference cycle
    first_err: Optional[DecodeError] = None
    try:
        return decode_pyav(data, num_frames, mode, rng, short_side)
    except DecodeError as err:
        first_err = DecodeError(err.reason, err.detail)
    if _have_decord() and first_err.reason != "empty_video":
        try:
            return decode_decord(data, num_frames, mode, rng, short_side)
        except DecodeError:
            pass
    if _looks_like_image(data):
        frames = decode_image(data)
        return np.broadcast_to(frames, (num_frames,) + frames.shape[1:])  # a view of the one frame
    raise first_err


# -------------------------------------------------------------- frame shards
def frame_keys(sample: dict) -> list[str]:
    """The stored-frame members of a frame-shard sample (``frame000.jpg`` …), in order."""
    found = [(int(m.group(1)), k) for k in sample if isinstance(k, str) and (m := FRAME_EXT.fullmatch(k))]
    return [k for _, k in sorted(found)]


def open_jpeg(data: bytes, short_side: Optional[int] = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """A decoded RGB PIL image from JPEG bytes, at reduced size: the JPEG decoder skips
    DCT detail (PIL ``draft``, 1/2 … 1/8 scale) down to the smallest scale whose short
    side is still ≥ ``short_side``; ``oversize`` when that costs more than ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))  # no `with`: closing would free the pixels of an RGB image returned as is
        full = im.size
        if short_side is not None and min(im.size) > short_side and im.format == "JPEG":
            im.draft("RGB", scaled_dims(im.size[0], im.size[1], short_side))
        if (why := decode_cost_problem(im, data, max_pixels, full)) is not None:
            raise DecodeError("oversize", f"stored frame: {why}")
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")  # RGB already (every JPEG frame we write): no copy
    except Image.DecompressionBombError as err:
        raise DecodeError("oversize", f"jpeg: {str(err).splitlines()[0][:200]}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DecodeError("corrupt_media", f"jpeg: {str(err).splitlines()[0][:200]}") from None
    if 0 in rgb.size:
        raise DecodeError("corrupt_media", "jpeg: empty")
    return rgb


def decode_jpeg(data: bytes, short_side: Optional[int] = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``[H, W, 3]`` uint8, decoded at reduced size (:func:`open_jpeg`) and then
    area-resized to exactly ``short_side`` (when larger)."""
    from PIL import Image

    im = open_jpeg(data, short_side, max_pixels)
    dims = scaled_dims(im.size[0], im.size[1], short_side)
    return np.array(im.resize(dims, Image.Resampling.BOX) if dims else im)  # writable: torch.from_numpy takes it


def decode_stored_frames(blobs: Sequence[bytes], num_frames: int, size: int, *, training: bool,
                         rng: Optional[random.Random] = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``[T, S, S, 3]`` (S = ``size``, or the short side when smaller) from a frame shard's
    N stored JPEGs: one at random in each of T segments of them in training, evenly
    spaced in eval (repeats when N < T). Each is decoded at reduced size, and only the
    square a crop keeps is resized (PIL ``resize(box=…)``, antialiased): a random square
    in training, the centre in eval, the same for all T; :func:`resize_crop` then flips."""
    from PIL import Image

    rng = rng or random
    idx = sample_indices(len(blobs), num_frames, "random_segment" if training else "uniform", rng)
    images = {i: open_jpeg(blobs[i], size, max_pixels) for i in sorted(set(idx))}
    sizes = {im.size for im in images.values()}
    if len(sizes) > 1:
        raise DecodeError("corrupt_media", f"stored frames differ in size: {sorted(sizes)}")
    w, h = sizes.pop()
    side = min(w, h)
    top, left = (rng.randint(0, h - side), rng.randint(0, w - side)) if training else ((h - side) // 2, (w - side) // 2)
    box = (left, top, left + side, top + side)
    out = side if side < size else size
    squares = {i: np.asarray(im.resize((out, out), Image.Resampling.BILINEAR, box=box)) for i, im in images.items()}
    return np.stack([squares[i] for i in idx])  # [T, S, S, 3]


def _looks_like_image(data: bytes) -> bool:
    return data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF")) or (data[:4], data[8:12]) == (b"RIFF", b"WEBP")


# ------------------------------------------------------------- resize and crop
def resize_crop(frames: np.ndarray, size: int, *, training: bool, rng: Optional[random.Random] = None) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 → ``[T, 3, size, size]`` uint8.

    The same as resizing the short side to ``size`` and cropping ``size × size``: a
    random crop + horizontal flip in training, the centre otherwise, the same for every
    frame. The square is cut first and only it is resized (antialiased), which saves the
    resize work on the pixels a crop would throw away.
    """
    rng = rng or random
    if frames.shape[0] > 1 and frames.strides[0] == 0:  # one still frame repeated as a view: resize it once
        one = resize_crop(frames[:1].copy(), size, training=training, rng=rng)  # [1, 3, size, size]
        return one.expand(frames.shape[0], -1, -1, -1).contiguous()  # [T, 3, size, size]
    if frames.shape[1] == frames.shape[2] == size:  # the crop already (frame shards): one copy, the flip in it
        flip = training and (rng.randint(0, 0), rng.randint(0, 0), rng.random())[2] < 0.5  # the draws below
        return torch.from_numpy(np.ascontiguousarray(
            (frames[:, :, ::-1] if flip else frames).transpose(0, 3, 1, 2)))  # [T, 3, size, size]
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, 3, H, W]
    h, w = clip.shape[-2:]
    side = min(h, w)
    if training:
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
    else:
        top, left = (h - side) // 2, (w - side) // 2
    clip = clip[..., top : top + side, left : left + side]  # [T, 3, side, side]
    if side != size:
        resized = torch.nn.functional.interpolate(clip.float(), size=(size, size), mode="bilinear", antialias=True,
                                                  align_corners=False)  # [T, 3, size, size]
        clip = resized.round_().clamp_(0, 255).to(torch.uint8)
    if training and rng.random() < 0.5:
        clip = clip.flip(-1)
    return clip.contiguous()  # [T, 3, size, size]
