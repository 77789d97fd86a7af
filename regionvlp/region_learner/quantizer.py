"""Vector quantizer with an EMA codebook (VQ-VAE style), shared by all ranks.

Every patch feature ``z`` (already projected to ``code_dim``) is assigned its nearest
code; the output is the code, passed through a straight-through estimator so the
gradient reaches ``z`` unchanged. In training mode the codebook follows the features
by exponential moving averages of per-code counts and sums, with the configured
decay, Laplace smoothing of the counts, and restart of dead codes from current
features: a code is dead when its EMA count falls under ``dead_code_threshold`` times
the mean count of all codes (a share of the average code's use, so the wait does not
depend on the batch size: from the average share, ``log(threshold) / log(decay)`` steps
unused), and restarts counting as an average code. The first training batch initialises the codebook
from its own features (random rows, as one k-means++-free seeding step), each code
counting as one sample, so codes start where the features are. Counts and sums are all-reduced across ranks when
``torch.distributed`` is initialised, so N ranks update the codebook exactly as one
process seeing the concatenated batch; restarts are drawn on rank 0 and broadcast.

No host syncs in the steady state: the per-code counts are ``index_add_`` (a CUDA
``bincount`` reads its maximum back to the host), restarts are a fixed-size
``torch.where`` over every code (candidates drawn for all, used for the dead ones), and
the "seeded yet" flag is read from its buffer once per module instance, then cached.

The EMA buffers stay float32 even when the module is cast to bf16/fp16 (DeepSpeed
casts whole modules), because a 0.99-decay average is meaningless in 8 mantissa bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp import dist
from regionvlp.runtime import get_autocast


_EMA_BUFFERS = ("embed", "embed_sum", "cluster_size")


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [..., d] straight-through codes (value = code, grad -> z)
    indices: torch.Tensor  # [...] long, code index per input vector
    commitment: torch.Tensor  # [] beta * mean ||z - sg(code)||^2 (0 when beta == 0)
    perplexity: torch.Tensor  # [] exp(entropy) of code use in this (global) batch
    usage: torch.Tensor  # [] fraction of codes used in this (global) batch


class EMAQuantizer(nn.Module):
    """Nearest-code quantizer with an EMA-updated ``num_codes x code_dim`` codebook."""

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        *,
        decay: float = 0.99,
        eps: float = 1.0e-5,
        dead_code_threshold: float = 0.1,
        commitment: float = 0.25,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.decay = float(decay)
        self.eps = float(eps)
        self.dead_code_threshold = float(dead_code_threshold)
        self.commitment = float(commitment)
        embed = torch.randn(num_codes, code_dim) / math.sqrt(code_dim)  # [C, d]
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())  # [C, d] EMA of per-code sums
        # [C] EMA of per-code counts; each code starts as one sample of itself, so an unused
        # code stays put (embed_sum / cluster_size) while both decay, until it is restarted
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # total restarted codes
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # codebook seeded from data
        self.seeded = False  # host copy of ``initialized`` once it was seen True (no per-step sync)

    # keep the EMA statistics in float32 whatever the module is cast to
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for name in _EMA_BUFFERS:
            buf = self._buffers[name]
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self.seeded = False  # a loaded ``initialized`` is read again on the next training step
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, decay={self.decay}, "
                f"dead_code_threshold={self.dead_code_threshold}, commitment={self.commitment}")

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code index for each row of ``flat`` [M, d] (float32)."""
        embed = self.embed  # [C, d]
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code.
        # float32 even under autocast: bf16 distances would pick the wrong code.
        with get_autocast(torch.float32, flat.device.type)():
            dist = torch.addmm(embed.pow(2).sum(1)[None, :], flat.float(), embed.t(), alpha=-2.0)  # [M, C]
        return dist.argmin(dim=1)  # [M]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        shape = z.shape
        flat = z.reshape(-1, self.code_dim).float()  # [M, d]
        idx = self.assign(flat)  # [M]
        codes = self.embed[idx]  # [M, d], the codebook before this step's update
        if self.training:  # eval never talks to other ranks: their batch counts may differ
            if not self.seeded:
                if not bool(self.initialized):  # one host read per module instance
                    self._init_from(flat.detach())
                    idx = self.assign(flat)
                    codes = self.embed[idx]
                self.seeded = True
            counts = self._ema_update(flat.detach(), idx, self.code_counts(idx))
        else:
            counts = self.code_counts(idx)  # [C]
        probs = counts / counts.sum().clamp_min(1.0)  # [C]
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        usage = (counts > 0).float().mean()

        if self.commitment > 0:
            commitment = self.commitment * F.mse_loss(flat, codes.detach())
        else:
            commitment = flat.new_zeros(())
        quantized = flat + (codes - flat).detach()  # straight-through: value codes, grad identity
        return QuantizerOutput(
            quantized=quantized.to(z.dtype).reshape(shape),
            indices=idx.reshape(shape[:-1]),
            commitment=commitment,
            perplexity=perplexity.detach(),
            usage=usage.detach(),
        )

    def code_counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Uses of each code [C] float32 (``index_add_``: no host sync, unlike a CUDA bincount)."""
        ones = torch.ones(idx.shape[0], dtype=torch.float32, device=idx.device)
        return torch.zeros(self.num_codes, dtype=torch.float32, device=idx.device).index_add_(0, idx, ones)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Seed the codebook with random rows of the first training batch (rank 0's, broadcast)."""
        if flat.shape[0] >= self.num_codes:
            pick = torch.randperm(flat.shape[0], device=flat.device)[: self.num_codes]
        else:
            pick = torch.randint(flat.shape[0], (self.num_codes,), device=flat.device)
        self.embed.copy_(flat[pick])
        dist.broadcast_(self.embed, src=0)
        self.embed_sum.copy_(self.embed)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One EMA step from this batch (all ranks' batches when distributed); returns the
        global per-code counts."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)  # [C, d]
        distributed = dist.gather_active()
        if distributed:
            stats = dist.all_reduce_sum_(torch.cat([counts[:, None], sums], dim=1))  # [C, 1 + d], one collective
            counts, sums = stats[:, 0].contiguous(), stats[:, 1:]
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1.0 - d)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total  # Laplace
        self.embed.copy_(self.embed_sum / smoothed.clamp_min(1e-12)[:, None])
        self._restart_dead(flat, distributed)
        return counts

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, distributed: bool) -> None:
        """Codes under ``dead_code_threshold`` x the mean EMA count take a random current feature
        and the mean count; fixed-size work over all codes, no host sync."""
        if self.dead_code_threshold <= 0 or flat.shape[0] == 0:
            return
        mean = self.cluster_size.mean()  # []
        dead = self.cluster_size < self.dead_code_threshold * mean  # [C], identical on every rank
        m = flat.shape[0]
        pick = (torch.randperm(m, device=flat.device)[: self.num_codes] if m >= self.num_codes
                else torch.randint(m, (self.num_codes,), device=flat.device))  # [C] candidate rows
        cand = flat[pick]  # [C, d]
        if distributed:  # rank 0's candidates everywhere, so every rank restarts alike
            dist.broadcast_(cand, src=0)
        self.embed.copy_(torch.where(dead[:, None], cand, self.embed))
        self.embed_sum.copy_(torch.where(dead[:, None], cand * mean, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, mean, self.cluster_size))
        self.restarts.add_(dead.sum())
