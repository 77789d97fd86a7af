"""The shared alignment losses: global video-sentence InfoNCE and bidirectional
region-word alignment (Cai et al., "Revitalize Region Feature for Democratizing
Video-Language Pre-training"). The math as implemented is written out in docs/losses.md.

Both losses take L2-normalised embeddings and bool masks (True = real) and nothing
else. Across ranks every rank gathers the [CLS], region and word embeddings of the
whole global batch (:func:`regionvlp.dist.gather_with_grad`) and computes the loss
terms of its *own* rows (its videos against all sentences, its sentences against all
videos), so the work per rank is ``B_local x B_global`` and the gradients that
DeepSpeed averages over ranks equal those of one process on the whole batch.

The region-word similarity never materialises ``[B, B, N, L, D]`` nor the whole
``[B, B, N, L]``: :class:`_RegionWordScores` walks the sentence batch in chunks of
``chunk_size``, keeps only the ``[B, B]`` scores, and in backward recomputes each
chunk's ``[B, N, C, L]`` similarities and applies the closed-form gradient of
``sum_l softmax(s / tau)_l * s_l``, so forward and backward memory are both bounded by
the chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp import dist
from regionvlp.outputs import TextOutput, VideoOutput
from regionvlp.runtime import get_autocast


# ----------------------------------------------------------- region-word scores
# One chunk works on s = <r_n, t_l> of every video against C sentences, laid out
# [Bv, N, C, L] so that s and both of its gradient products are plain 2-D matmuls
# ([Bv*N, D] x [D, C*L]) with no permuted copies. The identity
# <r_n, alpha_n> = sum_l a_{n,l} <r_n, t_l> means alpha [.., N, D] is never needed.
# Everything below runs without autograd (inside the Function), in place where it
# can, so a chunk holds a few [Bv, N, C, L] buffers at most.
def _sims(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """r [Bv, N, D], t [C, L, D] -> s [Bv, N, C, L]."""
    (bv, n, d), (c, l) = r.shape, t.shape[:2]
    return (r.reshape(bv * n, d) @ t.reshape(c * l, d).T).view(bv, n, c, l)


def _softmax_weights(z: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``softmax(z)`` over the real entries of ``dim`` (``mask`` broadcasts to ``z``).

    Padded entries of a row with any real entry get exactly 0. A row with none real
    comes out uniform, and needs no masking: its s is all zero (padded tokens are zeroed
    before the Function), so it adds nothing to any score, and the gradient it sends to
    padded tokens is dropped by the ``masked_fill`` in front of the Function.
    """
    return torch.softmax(z.masked_fill(~mask, torch.finfo(z.dtype).min), dim=dim)


def _chunk_forward(r_tau, rm, t, tm, tau: float, v2t: bool, t2v: bool):
    """S^{v->t}, S^{t->v} [Bv, C] of every video against one chunk of C sentences.

    r_tau = r / tau [Bv, N, D], rm [Bv, N] bool, t [C, L, D], tm [C, L] bool (padded
    entries zeroed). Works on z = s / tau: S = tau * mean(sum p z).
    """
    z = _sims(r_tau, t)  # [Bv, N, C, L]
    s_vt = s_tv = None
    if v2t:  # each region attends over the sentence's words, then the mean over real regions
        f = (_softmax_weights(z, tm[None, None], 3) * z).sum(3)  # [Bv, N, C]
        s_vt = (f * rm[:, :, None]).sum(1) * (tau / rm.sum(1).clamp(min=1)[:, None])  # [Bv, C]
    if t2v:  # each word attends over the video's regions, then the mean over real words
        g = (_softmax_weights(z, rm[:, :, None, None], 1) * z).sum(1)  # [Bv, C, L]
        s_tv = (g * tm[None]).sum(2) * (tau / tm.sum(1).clamp(min=1)[None, :])  # [Bv, C]
    return s_vt, s_tv


def _chunk_grad_s(z, rm, tm, g_vt, g_tv) -> torch.Tensor:
    """dLoss/ds [Bv, N, C, L] for one chunk (z = s / tau) from dLoss/dS^{v->t},
    dLoss/dS^{t->v} [Bv, C] (None for a direction not computed). With p = softmax(z)
    over the words and f = sum_l p_l s_l:  df/ds_k = p_k (1 + z_k - sum_l p_l z_l);
    likewise over the regions. Formed as ``p * (z * w + w (1 - sum_l p_l z_l))``."""
    grad = None
    if g_vt is not None:
        p = _softmax_weights(z, tm[None, None], 3)  # [Bv, N, C, L]
        f = (p * z).sum(3, keepdim=True)  # [Bv, N, C, 1]
        w = (g_vt[:, None, :] * rm[:, :, None] / rm.sum(1).clamp(min=1)[:, None, None])[..., None]  # [Bv, N, C, 1]
        grad = p.mul_(torch.addcmul(w * (1 - f), z, w))
    if g_tv is not None:
        q = _softmax_weights(z, rm[:, :, None, None], 1)  # [Bv, N, C, L]
        g = (q * z).sum(1, keepdim=True)  # [Bv, 1, C, L]
        w = (g_tv[:, :, None] * tm[None] / tm.sum(1).clamp(min=1)[None, :, None])[:, None]  # [Bv, 1, C, L]
        q.mul_(torch.addcmul(w * (1 - g), z, w))
        grad = q if grad is None else grad.add_(q)
    return grad


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when it is in a narrower float type (fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _RegionWordScores(torch.autograd.Function):
    """S^{v->t} and S^{t->v} ``[Bv, Bt]``, chunked over sentences; backward recomputes
    each chunk's similarities and applies the closed-form gradient (memory-bounded).
    Forward and backward both run in fp32 with autocast off, so the recomputed
    similarities of the backward are exactly those of the forward."""

    @staticmethod
    def forward(ctx, r, rm, t, tm, tau: float, chunk: int, v2t: bool, t2v: bool):
        with get_autocast("fp32", r.device.type)():
            return _RegionWordScores.scores(ctx, widen(r), rm, widen(t), tm, tau, chunk, v2t, t2v)

    @staticmethod
    def scores(ctx, r, rm, t, tm, tau: float, chunk: int, v2t: bool, t2v: bool):
        bv, bt = r.shape[0], t.shape[0]
        s_vt = r.new_zeros(bv, bt if v2t else 0)
        s_tv = r.new_zeros(bv, bt if t2v else 0)
        r_tau = r / tau  # scaling the small factor gives s / tau from the matmul itself
        for c0 in range(0, bt, chunk):
            c1 = min(c0 + chunk, bt)
            vt, tv = _chunk_forward(r_tau, rm, t[c0:c1], tm[c0:c1], tau, v2t, t2v)
            if v2t:
                s_vt[:, c0:c1] = vt
            if t2v:
                s_tv[:, c0:c1] = tv
        ctx.save_for_backward(r, rm, t, tm)
        ctx.cfg = (tau, chunk, v2t, t2v)
        return s_vt, s_tv

    @staticmethod
    def backward(ctx, g_vt, g_tv):
        r = ctx.saved_tensors[0]
        with get_autocast("fp32", r.device.type)():
            return _RegionWordScores.grads(ctx, None if g_vt is None else widen(g_vt),
                                           None if g_tv is None else widen(g_tv))

    @staticmethod
    def grads(ctx, g_vt, g_tv):
        r, rm, t, tm = ctx.saved_tensors
        tau, chunk, v2t, t2v = ctx.cfg
        grad_r = torch.zeros_like(r) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(t) if ctx.needs_input_grad[2] else None
        bv, n, d = r.shape
        r2 = r.reshape(bv * n, d)
        r_tau = r / tau
        for c0 in range(0, t.shape[0], chunk):
            c1 = min(c0 + chunk, t.shape[0])
            tc = t[c0:c1]  # [C, L, D]
            grad_s = _chunk_grad_s(_sims(r_tau, tc), rm, tm[c0:c1],
                                   g_vt[:, c0:c1] if v2t and g_vt is not None else None,
                                   g_tv[:, c0:c1] if t2v and g_tv is not None else None)  # [Bv, N, C, L]
            if grad_s is None:
                continue
            grad_s = grad_s.view(bv * n, -1)  # [Bv*N, C*L]
            if grad_r is not None:
                grad_r += (grad_s @ tc.reshape(-1, d)).view(bv, n, d)
            if grad_t is not None:
                grad_t[c0:c1] = (grad_s.T @ r2).view(tc.shape)
            del grad_s
        return grad_r, None, grad_t, None, None, None, None, None


def region_word_scores(
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    tau: float,
    chunk_size: int = 32,
    *,
    v2t: bool = True,
    t2v: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Bidirectional region-word similarity of every video against every sentence.

    regions [Bv, N, D], region_mask [Bv, N] bool, words [Bt, L, D], word_mask [Bt, L]
    bool (True = real; padded entries may hold anything, even NaN). Returns
    ``S^{v->t}`` and ``S^{t->v}``, each ``[Bv, Bt]`` (None for a direction not asked
    for). Peak extra memory is ``O(Bv * chunk_size * N * L)``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    region_mask, word_mask = region_mask.bool(), word_mask.bool()
    regions = widen(regions).masked_fill(~region_mask[..., None], 0.0)  # padded values never reach a sum
    words = widen(words).masked_fill(~word_mask[..., None], 0.0)
    s_vt, s_tv = _RegionWordScores.apply(
        regions, region_mask, words, word_mask, float(tau), int(chunk_size), v2t, t2v
    )  # an unrequested direction comes back as [Bv, 0]
    return (s_vt if v2t else None), (s_tv if t2v else None)


# ------------------------------------------------------------------------ loss
def _pad_dim1(x: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad tokens x [b, m, D] and mask [b, m] to n tokens with masked-out zeros."""
    if x.shape[1] == n:
        return x, mask
    return F.pad(x, (0, 0, 0, n - x.shape[1])), F.pad(mask, (0, n - mask.shape[1]), value=False)


class AlignmentLoss(nn.Module):
    """Global InfoNCE + lambda * region-word alignment, batch-global across ranks.

    ``forward(video, text)`` takes L2-normalised outputs and returns ``loss`` (=
    ``global`` + ``local_weight`` * ``local``), ``global``, ``local`` and
    ``temperature``. The returned values are the loss of the *global* batch on every
    rank; the gradient each rank back-propagates is that of its own rows, scaled so
    that DeepSpeed's mean over ranks gives the global-batch gradient exactly.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        self.align_temperature = float(cfg.align_temperature)
        self.local_weight = float(cfg.local_weight)
        self.chunk_size = int(cfg.chunk_size)
        self.min_temperature = float(cfg.min_temperature)
        self.gather = bool(cfg.gather)
        # shape [1], not 0-d: deepspeed.initialize broadcasts parameters as byte views,
        # which a 0-d tensor cannot give (the buffer has the same shape, so a checkpoint
        # loads whether the temperature was learnable or not)
        log_t = torch.tensor([math.log(max(float(cfg.temperature), self.min_temperature))])  # [1]
        if cfg.learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_temperature"
        if key in state_dict and state_dict[key].ndim == 0:  # written when it was 0-d
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def temperature(self) -> torch.Tensor:
        """tau = exp(log_temperature), a 0-d fp32 tensor (differentiable in
        ``log_temperature`` when that is learnable, below the floor too: the floor
        ``loss.min_temperature`` is applied to the parameter after each optimizer step,
        as CLIP clamps its logit scale, see :meth:`floor_temperature_`)."""
        return self.log_temperature.float().exp().reshape(())

    @property
    def log_temperature_floor(self) -> float:
        return math.log(self.min_temperature)

    @torch.no_grad()
    def floor_temperature_(self) -> None:
        """``log_temperature >= log(min_temperature)`` in place (no host sync)."""
        self.log_temperature.clamp_(min=self.log_temperature_floor)

    def forward(self, video: VideoOutput, text: TextOutput) -> dict[str, torch.Tensor]:
        # the loss runs in fp32 whatever the towers ran in, with autocast off: under
        # autocast a `.float()` alone is recast to bf16 by the matmul (the ranking is lost)
        with get_autocast("fp32", video.cls.device.type)():
            return self.terms(video, text)

    def terms(self, video: VideoOutput, text: TextOutput) -> dict[str, torch.Tensor]:
        """The loss terms (see :meth:`forward`); call it with autocast off."""
        v_cls, t_cls = video.cls.float(), text.cls.float()  # [b, D]
        use_local = self.local_weight != 0.0
        gather = self.gather and dist.gather_active()
        b = v_cls.shape[0]
        n_reg, n_words = video.regions.shape[1], text.words.shape[1]
        shapes = dist.all_gather_ints([b, n_reg, n_words]) if gather else [[b, n_reg, n_words]]
        sizes = [s[0] for s in shapes]  # local batch sizes may differ between ranks
        first = sum(sizes[: dist.rank()]) if gather else 0
        n_global = sum(sizes)
        all_v_cls = dist.gather_with_grad(v_cls, sizes) if gather else v_cls  # [B, D]
        all_t_cls = dist.gather_with_grad(t_cls, sizes) if gather else t_cls
        labels = torch.arange(first, first + b, device=v_cls.device)
        tau = self.temperature()

        # global: own videos vs all sentences, own sentences vs all videos
        v2t = v_cls @ all_t_cls.T / tau  # [b, B]
        t2v = t_cls @ all_v_cls.T / tau  # [b, B]
        glob_sum = 0.5 * (F.cross_entropy(v2t, labels, reduction="sum")
                          + F.cross_entropy(t2v, labels, reduction="sum"))

        local_sum = v2t.new_zeros(())
        if use_local:
            regions, rmask = video.regions.float(), video.region_mask.bool()  # [b, N, D], [b, N]
            words, wmask = text.words.float(), text.word_mask.bool()  # [b, L, D], [b, L]
            if gather:  # ranks may pad to different N / L: pad to the longest (masked out)
                regions, rmask = _pad_dim1(regions, rmask, max(s[1] for s in shapes))
                words, wmask = _pad_dim1(words, wmask, max(s[2] for s in shapes))
                all_regions = dist.gather_with_grad(regions, sizes)  # [B, N, D]
                all_rmask = dist.gather_nograd(rmask, sizes)
                all_words = dist.gather_with_grad(words, sizes)  # [B, L, D]
                all_wmask = dist.gather_nograd(wmask, sizes)
                s_vt, _ = region_word_scores(regions, rmask, all_words, all_wmask, self.align_temperature,
                                             self.chunk_size, v2t=True, t2v=False)  # [b, B]
                _, s_tv = region_word_scores(all_regions, all_rmask, words, wmask, self.align_temperature,
                                             self.chunk_size, v2t=False, t2v=True)  # [B, b]
            else:
                s_vt, s_tv = region_word_scores(regions, rmask, words, wmask, self.align_temperature,
                                                self.chunk_size)  # [b, b] each
            local_sum = 0.5 * (F.cross_entropy(s_vt / tau, labels, reduction="sum")
                               + F.cross_entropy(s_tv.T / tau, labels, reduction="sum"))

        # Gradient: DeepSpeed averages over W ranks, so each rank back-propagates
        # W * (its row sums) / B_global; the value reported is the global-batch mean.
        world = dist.world_size() if gather else 1
        glob = glob_sum * world / n_global
        local = local_sum * world / n_global
        if gather and world > 1:
            totals = dist.all_reduce_sum(torch.stack([glob_sum, local_sum]).detach()) / n_global
            glob = glob + (totals[0] - glob.detach())  # value: global mean; gradient: own rows
            local = local + (totals[1] - local.detach())
        total = glob + self.local_weight * local
        return {"loss": total, "global": glob, "local": local, "temperature": tau.detach()}
