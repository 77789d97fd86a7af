"""Frame-shard JPEGs decoded for a whole batch at once (``data.decode_device: cuda``).

With ``data.decode_device: cuda`` the DataLoader workers do not decode a frame shard's
JPEGs: they pick the T frames and the crop (random square + flip in training, the
centre in eval), reading only the JPEG headers, and the batch carries the compressed
bytes. In the training process, as each batch arrives (``WebLoader.map``), the JPEGs of
the whole batch are decoded in one ``torchvision.io.decode_jpeg(..., device="cuda")``
call (nvJPEG), cropped, resized (antialiased) and flipped on the GPU. Video samples are
decoded in the workers as before.

A batch the GPU decoder rejects is decoded again sample by sample: samples whose JPEGs
do not decode are dropped from the batch and counted as ``corrupt_media`` in its
``skipped`` counts, as everywhere else.
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any, Optional, Sequence

import torch

from regionvlp.data.decode import MAX_IMAGE_PIXELS, DecodeError, sample_indices
from regionvlp.data.imagecost import decode_cost_problem


DECODE_DEVICES = ("cpu", "cuda")


def pick_jpegs(blobs: Sequence[bytes], num_frames: int, *, training: bool, rng: Optional[random.Random] = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[bytes], list[int]]:
    """T of the N stored JPEGs (as :func:`~regionvlp.data.decode.decode_stored_frames`
    picks them) and the crop ``[top, left, side, flip]`` shared by all T, from the
    JPEG headers only. Raises :class:`DecodeError` for an unreadable header."""
    from PIL import Image, UnidentifiedImageError

    rng = rng or random
    idx = sample_indices(len(blobs), num_frames, "random_segment" if training else "uniform", rng)
    sizes = set()
    for i in sorted(set(idx)):
        if not blobs[i].rstrip(b"\0").endswith(b"\xff\xd9"):  # no end-of-image marker: cut off
            raise DecodeError("corrupt_media", f"stored frame {i} is truncated (no JPEG end marker)")
        try:
            with Image.open(io.BytesIO(blobs[i])) as im:  # reads the header, decodes nothing
                if im.format != "JPEG":
                    raise DecodeError("corrupt_media", f"stored frame {i} is {im.format}, not JPEG")
                if (why := decode_cost_problem(im, blobs[i], max_pixels, whole=True)) is not None:  # decoded whole on the GPU
                    raise DecodeError("oversize", f"stored frame {i}: {why}")
                sizes.add(im.size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise DecodeError("corrupt_media", f"jpeg: {str(err).splitlines()[0][:200]}") from None
    if len(sizes) > 1:
        raise DecodeError("corrupt_media", f"stored frames differ in size: {sorted(sizes)}")
    w, h = sizes.pop()
    side = min(w, h)
    if training:
        top, left, flip = rng.randint(0, h - side), rng.randint(0, w - side), int(rng.random() < 0.5)
    else:
        top, left, flip = (h - side) // 2, (w - side) // 2, 0
    return [blobs[i] for i in idx], [top, left, side, flip]


def crop_resize(image: torch.Tensor, crop: Sequence[int], size: int) -> torch.Tensor:
    """``[3, H, W]`` uint8 → ``[3, size, size]`` uint8: the crop square, resized
    (bilinear, antialiased) and flipped as ``crop = [top, left, side, flip]`` says."""
    top, left, side, flip = (int(c) for c in crop)
    square = image[:, top:top + side, left:left + side]  # [3, side, side]
    if side != size:
        square = torch.nn.functional.interpolate(square[None].float(), size=(size, size), mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
        square = square.round_().clamp_(0, 255).to(torch.uint8)  # [3, size, size]
    return square.flip(-1) if flip else square


def decode_clips(jpegs: Sequence[Sequence[bytes]], crops: torch.Tensor, size: int,
                 device: torch.device | str) -> torch.Tensor:
    """B clips of T JPEGs each → ``[B, T, 3, size, size]`` uint8 on ``device``, decoded
    in one ``decode_jpeg`` call. Raises RuntimeError when any JPEG does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    flat = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for clip in jpegs for b in clip]
    with warnings.catch_warnings():  # torchvision 0.29 marks its image IO deprecated (for TorchCodec); it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(flat, mode=ImageReadMode.RGB, device=device)  # B*T x [3, H, W]
    t = len(jpegs[0])
    out = [crop_resize(img, crops[k // t].tolist(), size) for k, img in enumerate(images)]
    return torch.stack(out).view(len(jpegs), t, 3, size, size)  # [B, T, 3, S, S]


class BatchJpegDecoder:
    """``WebLoader.map`` stage: a batch's ``frames_jpeg`` + ``frames_crop`` [B, 4] →
    ``frames`` uint8 [B, T, 3, S, S] on ``device``; samples that do not decode are
    dropped and counted."""

    def __init__(self, size: int, device: torch.device | str) -> None:
        self.size, self.device = size, torch.device(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "frames_jpeg" not in batch:
            return batch
        jpegs, crops = batch.pop("frames_jpeg"), batch.pop("frames_crop")
        try:
            batch["frames"] = decode_clips(jpegs, crops, self.size, self.device)
            return batch
        except RuntimeError:
            pass  # some JPEG in the batch is bad: find it below
        good, clips = [], []
        for i, clip in enumerate(jpegs):
            try:
                clips.append(decode_clips([clip], crops[i:i + 1], self.size, self.device)[0])
                good.append(i)
            except RuntimeError:
                continue
        skipped = dict(batch.get("skipped") or {})
        skipped["corrupt_media"] = skipped.get("corrupt_media", 0) + len(jpegs) - len(good)
        batch = select_samples(batch, good)
        batch["skipped"] = skipped
        t = len(jpegs[0])
        batch["frames"] = torch.stack(clips) if clips else torch.empty(0, t, 3, self.size, self.size, dtype=torch.uint8,
                                                                      device=self.device)  # [B', T, 3, S, S]
        return batch


def select_samples(batch: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The batch restricted to samples ``keep`` (lists and per-sample tensors)."""
    n = len(batch["__key__"])
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[keep]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in keep]
        else:
            out[k] = v
    return out
