"""The region-shard format: one sample's detector regions as ``regions.npz``.

``regionvlp regions extract`` writes it (:func:`regions_npz`) and the data pipeline
reads it (:func:`decode_regions`, then :func:`select_region_frames`): ``feats`` float16
[T,K,F], ``boxes`` float32 [T,K,4] (pixels of the decoded frame), ``mask`` bool [T,K],
``labels`` int64 [T,K], ``scores`` float32 [T,K]. Arrays only: loaded with
``allow_pickle=False``.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from regionvlp.data.decode import DecodeError, sample_indices


REGION_EXT = "regions.npz"
REGION_ARRAYS = {"feats": np.float16, "boxes": np.float32, "mask": np.bool_, "labels": np.int64, "scores": np.float32}


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
            raise DecodeError("region_shape", f"regions.npz has K={k}, F={f}; expected K={self.num_regions} "
                                              f"(model.detector.num_regions), F={self.feature_dim} "
                                              "(model.region_transformer.feature_dim)")


def _check_region_dtypes(arrays: dict[str, np.ndarray]) -> None:
    kinds = {"feats": "f", "boxes": "f", "scores": "f", "mask": "b", "labels": "iu"}
    for name, arr in arrays.items():
        if arr.dtype.kind not in kinds[name] or (arr.dtype.kind == "f" and arr.dtype.itemsize > 8):
            raise DecodeError("region_shape", f"regions.npz '{name}' has dtype {arr.dtype}; expected "
                                              f"{np.dtype(REGION_ARRAYS[name]).name}")


def decode_regions(data: bytes) -> dict[str, torch.Tensor]:
    """``regions.npz`` → ``region_feats`` float32 [T,K,F], ``region_boxes`` [T,K,4],
    ``region_mask`` bool [T,K], ``region_labels`` int64 [T,K], ``region_scores`` [T,K]."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in REGION_ARRAYS if k in npz.files}
    except Exception as err:
        raise DecodeError("corrupt_regions", str(err).splitlines()[0][:200]) from None
    for k in ("feats", "boxes", "mask"):
        if k not in arrays:
            raise DecodeError("corrupt_regions", f"regions.npz has no '{k}'")
    feats, boxes, mask = arrays["feats"], arrays["boxes"], arrays["mask"]
    if feats.ndim != 3 or boxes.shape != feats.shape[:2] + (4,) or mask.shape != feats.shape[:2]:
        raise DecodeError(
            "corrupt_regions",
            f"shapes feats {feats.shape}, boxes {boxes.shape}, mask {mask.shape} do not match [T,K,F]/[T,K,4]/[T,K]",
        )
    _check_region_dtypes(arrays)
    for name in ("labels", "scores"):
        if name in arrays and arrays[name].shape != mask.shape:
            raise DecodeError("corrupt_regions", f"regions.npz '{name}' has shape {arrays[name].shape}, not {mask.shape}")
    t, k = mask.shape
    out = {
        "region_feats": torch.from_numpy(feats.astype(np.float32)),  # [T, K, F]
        "region_boxes": torch.from_numpy(boxes.astype(np.float32)),  # [T, K, 4]
        "region_mask": torch.from_numpy(mask.astype(np.bool_)),  # [T, K]
        "region_labels": torch.from_numpy(arrays.get("labels", np.zeros((t, k), np.int64)).astype(np.int64)),
        "region_scores": torch.from_numpy(arrays.get("scores", np.zeros((t, k), np.float32)).astype(np.float32)),
    }
    return out


def select_region_frames(regions: dict[str, torch.Tensor], num_frames: int, mode: str, rng: Optional[random.Random] = None) -> dict[str, torch.Tensor]:
    """Sample T of the stored frames (repeat when fewer), the same way as video frames."""
    t = regions["region_mask"].shape[0]
    if t == num_frames:
        return regions
    idx = torch.tensor(sample_indices(t, num_frames, mode, rng))
    return {k: v[idx] for k, v in regions.items()}


def regions_npz(regions: dict[str, torch.Tensor]) -> bytes:
    """One sample's region tensors ([T,K,...]) -> ``regions.npz`` bytes in the agreed dtypes."""
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
