"""Sample decoding: one raw tar sample → frames (or region tensors), captions and meta.

:func:`decode_sample` turns a raw sample of :mod:`regionvlp.data.reader` into the
decoded sample the loader batches: ``frames`` uint8 [T,3,S,S] from a video, an image or
a frame shard's stored JPEGs (or ``region_*`` tensors from ``regions.bin`` / ``regions.npz``), the caption
drawn for this visit, every caption, the json ``meta``. Bad input raises a
:class:`~regionvlp.data.decode.DecodeError` whose ``reason`` is a skip reason;
:func:`decoded` counts those and goes on. :func:`iter_samples` is reader + decode in one
process (``shards check``, ``data inspect``, ``regions extract``, ``show``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from regionvlp import pathways
from regionvlp.config import default_config
from regionvlp.data import decode as dec
from regionvlp.data.jpeg_batch import pick_jpegs
from regionvlp.data.qa import has_qa
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.regions import REGION_EXTS, RegionShape, decode_regions, select_region_frames
from regionvlp.data.skips import SkipCounter, short_error
from regionvlp.data.sources import parse_specs, register_webdataset_handlers
from regionvlp.data.text import pick_caption, sample_captions
from regionvlp.jsonio import json_loads


@dataclass
class DecodeSpec:
    num_frames: int
    size: int
    sampling: str
    backend: str
    training: bool
    decode_device: str = "cpu"  # cuda: frame-shard JPEGs travel compressed, decoded per batch on the GPU
    max_image_pixels: int = dec.MAX_IMAGE_PIXELS
    max_caption_chars: Optional[int] = None
    regions: Optional[RegionShape] = None  # None: the first region sample of the stream sets it


def decode_spec(cfg, *, training: bool, num_frames: Optional[int] = None, region_shape: bool = True) -> DecodeSpec:
    """How to decode for ``cfg``; region samples must have the K and F that the
    pathway's registry entry names (``region_shape``); ``region_shape=False`` takes them
    from the stream's first region sample instead (``shards check`` without ``--config``)."""
    d = cfg.data
    keys = pathways.of(cfg).region_shape  # None: the pathway reads frames only, K and F come from the stream
    regions = RegionShape(*(int(pathways.select(cfg, k)) for k in keys)) if keys and region_shape else None
    return DecodeSpec(
        num_frames=int(num_frames or d.num_frames),
        size=int(d.size),
        sampling=str(d.train_sampling if training else d.eval_sampling),
        backend=str(d.backend),
        training=training,
        decode_device=str(d.get("decode_device", "cpu")),
        max_image_pixels=int(d.max_image_pixels),
        max_caption_chars=int(d.max_caption_chars),
        regions=regions,
    )


def _media_key(sample: dict[str, Any], exts: Sequence[str]) -> Optional[str]:
    for k in sample:
        if not k.startswith("__") and k.rpartition(".")[2] in exts and not dec.FRAME_EXT.fullmatch(k):
            return k
    return None


def decode_sample(raw: dict[str, Any], spec: DecodeSpec, rng: random.Random) -> dict[str, Any]:
    """One raw tar sample → ``frames`` uint8 [T,3,H,W] (or ``region_*`` tensors),
    ``caption``, ``captions``, ``meta``. Raises :class:`~regionvlp.data.decode.DecodeError`
    (its ``reason`` is the skip-count key) for bad input."""
    start = time.perf_counter()
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json_loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise dec.DecodeError("bad_json", short_error(err)) from None
        if not isinstance(meta, dict):
            raise dec.DecodeError("bad_json", "json is not an object")
    status = meta.get("status")
    if status is not None and status != "success":
        raise dec.DecodeError("status_not_success", f"status={status!r}")
    region_key = next((k for k in REGION_EXTS if k in raw), None)  # regions first: then no other media is read
    video_key, image_key, stored = None, None, []
    if region_key is None:
        video_key = _media_key(raw, dec.VIDEO_EXTS)
        stored = dec.frame_keys(raw)  # a frame shard's JPEGs; the video (if kept) serves T > N
        if stored and video_key is not None and spec.num_frames > len(stored):
            stored = []
        image_key = _media_key(raw, dec.IMAGE_EXTS) if video_key is None and not stored else None
        if video_key is None and image_key is None and not stored:
            raise dec.DecodeError("no_media", f"keys: {', '.join(k for k in raw if not k.startswith('__'))}")
    captions = sample_captions(raw.get("txt"), meta)
    if not captions and not has_qa(meta):  # a QA clip needs no caption: its question takes the place
        raise dec.DecodeError("no_caption")
    cut = 0
    if spec.max_caption_chars is not None and any(len(c) > spec.max_caption_chars for c in captions):
        cut = sum(len(c) > spec.max_caption_chars for c in captions)
        captions = list(dict.fromkeys(c[: spec.max_caption_chars] for c in captions))
        if "caption" in meta or "captions" in meta:  # never carry the uncut copies along
            meta = {k: v for k, v in meta.items() if k not in ("caption", "captions")} | {"captions": captions}
    out: dict[str, Any] = {
        "__key__": raw["__key__"],
        "__url__": raw.get("__url__", ""),
        "caption": pick_caption(captions, training=spec.training, rng=rng) if captions else "",
        "captions": captions,
        "meta": meta,
        "captions_cut": cut,
    }
    if region_key is not None:
        regions = decode_regions(raw[region_key])  # stored dtypes: widened on the device
        if spec.regions is None:
            spec.regions = RegionShape.of(regions)
        spec.regions.check(regions)
        out.update(select_region_frames(regions, spec.num_frames, spec.sampling, rng))
        out["media"] = region_key
    else:
        if stored and spec.decode_device == "cuda":
            out["frames_jpeg"], out["frames_crop"] = pick_jpegs([raw[k] for k in stored], spec.num_frames,
                                                                training=spec.training, rng=rng,
                                                                max_pixels=spec.max_image_pixels)
            out["media"], out["frames_size"] = f"{len(stored)} frames", spec.size
            out["decode_ms"] = (time.perf_counter() - start) * 1000.0
            return out
        if stored:
            frames = dec.decode_stored_frames([raw[k] for k in stored], spec.num_frames, spec.size,
                                              training=spec.training, rng=rng, max_pixels=spec.max_image_pixels)
        elif video_key is not None:
            frames = dec.decode_video(
                raw[video_key], spec.num_frames, spec.sampling, spec.backend, rng, short_side=spec.size
            )
        else:
            frame = dec.decode_image(raw[image_key], max_pixels=spec.max_image_pixels)  # [1, H, W, 3]
            frames = np.broadcast_to(frame, (spec.num_frames,) + frame.shape[1:])  # a view, no copies
        out["frames"] = dec.resize_crop(frames, spec.size, training=spec.training, rng=rng)  # [T, 3, S, S]
        out["media"] = f"{len(stored)} frames" if stored else (video_key or image_key)
    out["decode_ms"] = (time.perf_counter() - start) * 1000.0
    return out


def decoded(raw_samples: Iterable[dict], spec: DecodeSpec, counter: SkipCounter, rng: random.Random) -> Iterator[dict]:
    for raw in raw_samples:
        try:
            sample = decode_sample(raw, spec, rng)
        except dec.DecodeError as err:
            counter.add(err.reason, key=raw.get("__key__", ""), url=raw.get("__url__", ""), detail=err.detail)
            continue
        except Exception as err:  # a decoder bug on odd input must not end a long run
            counter.add("corrupt_media", key=raw.get("__key__", ""), url=raw.get("__url__", ""), detail=short_error(err))
            continue
        counter.samples += 1
        counter.captions_cut += sample.pop("captions_cut", 0)
        yield sample


def with_frames(samples: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """The decoded samples that carry frames (what ``regions extract``, ``detector fit``
    and ``show`` look at); region-shard samples are skipped as ``no_frames``."""
    for s in samples:
        if "frames" in s:
            yield s
        else:
            counter.add("no_frames", key=s["__key__"], url=s["__url__"], detail="a region-shard sample has no frames")


# ---------------------------------------------------------------- single process
class SampleStream:
    """Decoded samples from ``urls`` in one process; skip counts in :attr:`skipped`,
    the first bad samples in :attr:`bad`, shards read in :attr:`shards`."""

    def __init__(self, urls: Sequence[str] | str, cfg=None, *, training: bool = False, num_frames: Optional[int] = None,
                 seed: Optional[int] = None, region_shape: bool = True) -> None:

        self.cfg = cfg if cfg is not None else default_config()
        self.shards = parse_specs(urls, allow_pipe=bool(self.cfg.data.allow_pipe))
        self.spec = decode_spec(self.cfg, training=training, num_frames=num_frames, region_shape=region_shape)
        self.spec.decode_device = "cpu"  # one process (check, inspect): every JPEG decoded, bad ones counted here
        self.counter = SkipCounter()
        self.seed = int(self.cfg.seed if seed is None else seed)
        register_webdataset_handlers()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raw = tar_samples(self.shards.urls, self.counter, ReadOptions.of(self.cfg))
        return decoded(raw, self.spec, self.counter, random.Random(self.seed))

    @property
    def skipped(self) -> dict[str, int]:
        return self.counter.skipped

    @property
    def bad(self) -> list[dict[str, str]]:
        return self.counter.bad

    @property
    def num_shards(self) -> int:
        return self.counter.shards


def iter_samples(urls: Sequence[str] | str, cfg=None, *, training: bool = False, num_frames: Optional[int] = None,
                 region_shape: bool = True) -> SampleStream:
    """Decoded sample dicts from ``urls`` (in order, single process). The returned
    :class:`SampleStream` exposes ``skipped`` / ``bad`` / ``num_shards`` as it goes.
    ``region_shape=False``: region samples must agree with the stream's first one
    rather than with the config's K and feature size."""
    return SampleStream(urls, cfg, training=training, num_frames=num_frames, region_shape=region_shape)

