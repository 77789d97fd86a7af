"""The region-shard format: one sample's detector regions as ``regions.bin``.

``regionvlp regions extract`` writes it (:func:`region_bytes`, raw arrays behind a JSON
header: :mod:`regionvlp.data.region_arrays`) and the data pipeline reads it
(:func:`decode_regions`, then :func:`select_region_frames`): ``feats`` float16 or int8
[T,K,F] (int8: ``feats_scale`` float32 [T,K], symmetric per region), ``boxes`` float32
[T,K,4] (pixels of the decoded frame), ``mask`` bool [T,K], ``labels`` int64 [T,K],
``scores`` float32 [T,K]. The old ``regions.npz`` (``np.savez``, fp16 feats) is still
read, arrays only (``allow_pickle=False``). Tensors keep their stored dtypes through
decode, collate and pinning; :func:`widen_regions` (in ``model.prepare_batch``)
dequantises and widens them on the device.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from regionvlp.data.decode import DecodeError, sample_indices
from regionvlp.data.npzread import NpzError, NpzOversize, load_npz
from regionvlp.data.region_arrays import MAX_LAYOUTS, layout_key, read_arrays, write_arrays


REGION_EXT = "regions.bin"  # written by regions extract (regionvlp.data.region_arrays)
NPZ_EXT = "regions.npz"  # the old format, still read
REGION_EXTS = (REGION_EXT, NPZ_EXT)
FEATURE_DTYPES = ("fp16", "int8")
# a clip's tensors as the loader stacks them ([B, T, ...]); region_feats_scale: int8 feats only
CLIP_TENSORS = ("frames", "region_feats", "region_feats_scale", "region_boxes", "region_mask", "region_labels",
                "region_scores")
REGION_ARRAYS = {"feats": np.float16, "feats_scale": np.float32, "boxes": np.float32, "mask": np.bool_,
                 "labels": np.int64, "scores": np.float32}


@dataclass
class RegionShape:
    """What a region sample must look like: K regions per frame, F-dim features, float
    features/boxes/scores, a bool mask and integer labels."""

    num_regions: int  # K
    feature_dim: int  # F

    @classmethod
    def of(cls, regions: dict[str, torch.Tensor]) -> "RegionShape":
        return cls(int(regions["region_feats"].shape[1]), int(regions["region_feats"].shape[2]))

    def check(self, regions: dict[str, torch.Tensor]) -> None:
        """Raise ``region_shape`` for a sample of another K / F (it would break the batch)."""
        _, k, f = regions["region_feats"].shape
        if (k, f) != (self.num_regions, self.feature_dim):
            raise DecodeError("region_shape", f"region sample has K={k}, F={f}; expected K={self.num_regions} "
                                              f"(model.detector.num_regions), F={self.feature_dim} "
                                              "(model.region_transformer.feature_dim)")


def _check_region_dtypes(arrays: dict[str, np.ndarray]) -> None:
    kinds = {"feats": "fi", "feats_scale": "f", "boxes": "f", "scores": "f", "mask": "b", "labels": "iu"}
    for name, arr in arrays.items():
        if arr.dtype.kind not in kinds[name] or arr.dtype.itemsize > 8 or (name == "feats" and arr.dtype.kind == "i"
                                                                              and arr.dtype.itemsize != 1):
            raise DecodeError("region_shape", f"region '{name}' has dtype {arr.dtype}; expected "
                                              f"{np.dtype(REGION_ARRAYS[name]).name}")


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The old ``regions.npz`` (``np.savez``, read-compatible): its arrays in their stored
    dtypes. Each member's ``.npy`` header (shape x itemsize) is checked against the bytes
    present before anything is decompressed (no inflating), and a member is decompressed
    only up to what its header declares (:func:`~regionvlp.data.npzread.load_npz`)."""
    try:
        return load_npz(data, REGION_ARRAYS, max_bytes=len(data))
    except NpzOversize as err:
        raise DecodeError("corrupt_regions", f"regions.npz {err}: larger than the member itself (no inflating)") from None
    except NpzError as err:
        raise DecodeError("corrupt_regions", f"regions.npz {str(err)[:200]}") from None


# float16 / float32 by their bits: Inf/NaN have an all-ones exponent, i.e. bits in
# [0x7C00, 0x7FFF] (sign 0: the top of the signed view) or [0xFC00, 0xFFFF] (sign 1: the
# top of the unsigned view) for float16. Two integer maxima, exact, no temporary array:
# 15x faster than np.isfinite on float16.
_FLOAT_BITS = {np.dtype(np.float16): (np.int16, np.uint16, 0x7C00, 0xFC00),
               np.dtype(np.float32): (np.int32, np.uint32, 0x7F800000, 0xFF800000)}


def _all_finite(arr: np.ndarray, chunk: int) -> bool:
    flat = arr.reshape(-1)
    bits = _FLOAT_BITS.get(arr.dtype)
    if bits is None:  # other float dtypes (an old npz): np.isfinite, in chunks
        return all(np.isfinite(flat[i : i + chunk]).all() for i in range(0, flat.size, chunk))
    signed, unsigned, positive, negative = bits
    return flat.size == 0 or bool(flat.view(signed).max() < positive and flat.view(unsigned).max() < negative)


def _check_finite(arrays: dict[str, np.ndarray], chunk: int = 1 << 20) -> None:
    """``nonfinite_regions`` for NaN/Inf in the float arrays (checked in chunks: no
    array-sized temporary)."""
    for name in ("feats", "feats_scale", "boxes", "scores"):
        arr = arrays.get(name)
        if arr is not None and arr.dtype.kind == "f" and not _all_finite(arr, chunk):
            flat = arr.reshape(-1)
            bad = int(flat.size - np.isfinite(flat).sum())
            raise DecodeError("nonfinite_regions", f"region '{name}' has {bad} NaN/Inf values")


def _check_layout(arrays: dict[str, np.ndarray]) -> None:
    """Names, ranks and dtypes (what the loader stacks relies on)."""
    for k in ("feats", "boxes", "mask"):
        if k not in arrays:
            raise DecodeError("corrupt_regions", f"region sample has no '{k}'")
    feats, boxes, mask = arrays["feats"], arrays["boxes"], arrays["mask"]
    if feats.ndim != 3 or boxes.shape != feats.shape[:2] + (4,) or mask.shape != feats.shape[:2]:
        raise DecodeError(
            "corrupt_regions",
            f"shapes feats {feats.shape}, boxes {boxes.shape}, mask {mask.shape} do not match [T,K,F]/[T,K,4]/[T,K]",
        )
    _check_region_dtypes(arrays)


def _check_rest(arrays: dict[str, np.ndarray]) -> None:
    mask = arrays["mask"]
    for name in ("labels", "scores", "feats_scale"):
        if name in arrays and arrays[name].shape != mask.shape:
            raise DecodeError("corrupt_regions", f"region '{name}' has shape {arrays[name].shape}, not {mask.shape}")
    if (arrays["feats"].dtype.kind == "i") != ("feats_scale" in arrays):
        raise DecodeError("corrupt_regions", "int8 feats need 'feats_scale' (and only they have one)")


def _check_shapes(arrays: dict[str, np.ndarray]) -> None:
    _check_layout(arrays)
    _check_finite(arrays)
    _check_rest(arrays)


_LAYOUTS_OK: set[tuple[bytes, int]] = set()  # regions.bin layouts (layout_key) that passed the shape checks


def _checked_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The member's arrays, checked; a ``regions.bin`` layout that passed before is
    checked for NaN/Inf only (its shapes and dtypes are the same by its key)."""
    if data[:2] == b"PK":
        arrays = read_npz(data)
        _check_shapes(arrays)
        return arrays
    key = layout_key(data)
    arrays = read_arrays(data, key)
    if key in _LAYOUTS_OK:
        _check_finite(arrays)
        return arrays
    _check_shapes(arrays)
    if len(_LAYOUTS_OK) >= MAX_LAYOUTS:
        _LAYOUTS_OK.clear()
    _LAYOUTS_OK.add(key)
    return arrays


# Region tensors share the member's (read-only) bytes: the pipeline only ever indexes,
# stacks or copies them. torch says "not writable" once per process: said here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.from_numpy(np.frombuffer(b"\0", np.uint8))
_tensor = torch.from_numpy


def decode_regions(data: bytes) -> dict[str, torch.Tensor]:
    """A ``regions.bin`` (or old ``regions.npz``) member → ``region_feats`` [T,K,F]
    (stored dtype: float16, float32 or int8 with ``region_feats_scale`` [T,K]),
    ``region_boxes`` [T,K,4], ``region_mask`` bool [T,K], ``region_labels`` [T,K],
    ``region_scores`` [T,K], all in their stored dtypes (:func:`widen_regions` widens
    them on the device). The format is told by the bytes (an npz is a zip: ``PK``)."""
    arrays = _checked_arrays(data)
    t, k = arrays["mask"].shape
    out = {
        "region_feats": _tensor(arrays["feats"]),  # [T, K, F]
        "region_boxes": _tensor(arrays["boxes"]),  # [T, K, 4]
        "region_mask": torch.from_numpy(arrays["mask"].view(np.uint8) != 0),  # [T, K], a 0/1 copy
        "region_labels": _tensor(arrays["labels"]) if "labels" in arrays else torch.zeros(t, k, dtype=torch.int64),
        "region_scores": _tensor(arrays["scores"]) if "scores" in arrays else torch.zeros(t, k),
    }
    if "feats_scale" in arrays:
        out["region_feats_scale"] = _tensor(arrays["feats_scale"])  # [T, K]
    return out


def select_region_frames(regions: dict[str, torch.Tensor], num_frames: int, mode: str, rng: Optional[random.Random] = None) -> dict[str, torch.Tensor]:
    """Sample T of the stored frames (repeat when fewer), the same way as video frames."""
    t = regions["region_mask"].shape[0]
    if t == num_frames:
        return regions
    idx = torch.tensor(sample_indices(t, num_frames, mode, rng))
    return {k: v[idx] for k, v in regions.items()}


def quantize_int8(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per region: ``q`` int8 [..., F] and ``scale`` float32 [...] with
    ``feats ≈ q * scale`` (scale = max |x| / 127; an all-zero region gets scale 0)."""
    x = feats.float()  # [..., F]
    scale = x.abs().amax(-1) / 127.0  # [...]
    q = torch.where(scale[..., None] > 0, x / scale.clamp_min(1e-30)[..., None], torch.zeros((), dtype=x.dtype))
    return q.round().clamp_(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [..., F] and scale [...] -> ``dtype`` [..., F] (computed in float32)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def region_bytes(regions: dict[str, torch.Tensor], feature_dtype: str = "fp16") -> bytes:
    """One sample's region tensors ([T,K,...]) -> ``regions.bin`` bytes: feats float16
    (``fp16``) or int8 with a float32 per-region scale (``int8``), boxes float32, mask
    bool, labels int64, scores float32."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {feature_dtype!r}: expected one of {FEATURE_DTYPES}")
    arrays: dict[str, np.ndarray] = {}
    if feature_dtype == "int8":
        q, scale = quantize_int8(regions["region_feats"].cpu())
        arrays.update(feats=q.numpy(), feats_scale=scale.numpy())
    else:
        arrays["feats"] = regions["region_feats"].to(torch.float16).cpu().numpy()
    arrays.update(boxes=regions["region_boxes"].float().cpu().numpy(), mask=regions["region_mask"].bool().cpu().numpy(),
                  labels=regions["region_labels"].long().cpu().numpy(),
                  scores=regions["region_scores"].float().cpu().numpy())
    return write_arrays(arrays)


def regions_npz(regions: dict[str, torch.Tensor]) -> bytes:
    """The old ``regions.npz`` (read-compatible; tests and the format comparison write it)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        feats=regions["region_feats"].to(torch.float16).cpu().numpy(),
        boxes=regions["region_boxes"].float().cpu().numpy(),
        mask=regions["region_mask"].bool().cpu().numpy(),
        labels=regions["region_labels"].long().cpu().numpy(),
        scores=regions["region_scores"].float().cpu().numpy(),
    )
    return buf.getvalue()


def widen_regions(batch: dict[str, Any], dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """On the device: int8 ``region_feats`` dequantised with ``region_feats_scale`` (which
    is dropped), region floats to ``dtype`` (float32 when None), labels to int64. In place."""
    target = dtype or torch.float32
    scale = batch.pop("region_feats_scale", None)
    if isinstance(scale, torch.Tensor) and isinstance(batch.get("region_feats"), torch.Tensor):
        batch["region_feats"] = dequantize(batch["region_feats"], scale, target)  # [B, T, K, F]
    for name, want in (("region_feats", target), ("region_boxes", target), ("region_scores", target),
                       ("region_labels", torch.int64)):
        value = batch.get(name)
        if isinstance(value, torch.Tensor) and value.dtype != want:
            batch[name] = value.to(want)
    return batch


def uniform_regions(samples: list[dict[str, Any]]) -> None:
    """Before stacking: when int8 and float region samples meet in one batch, the int8
    ones are dequantised (float32) so every sample stacks alike. In place."""
    quantized = ["region_feats_scale" in s for s in samples]
    if any(quantized) and not all(quantized):
        for s, q in zip(samples, quantized):
            if q:
                s["region_feats"] = dequantize(s["region_feats"], s.pop("region_feats_scale"))
