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
chunk's ``[B, C, N, L]`` similarities and applies the closed-form gradient of
``sum_l softmax(s / tau)_l * s_l``, so forward and backward memory are both bounded by
the chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp import dist
from regionvlp.pathway import TextOutput, VideoOutput


# ----------------------------------------------------------- region-word scores
def _masked_softmax_score(s: torch.Tensor, mask: torch.Tensor, dim: int, tau: float):
    """``p = softmax(s / tau)`` over the real entries of ``dim`` and ``f = sum p * s``.

    ``mask`` broadcasts against ``s``; padded entries get p = 0. A row with no real
    entry gets p = 0 everywhere and f = 0 (no NaN).
    """
    logits = (s / tau).masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(logits, dim=dim) * mask  # zero the all-padded rows too
    f = (p * s).sum(dim)
    return p, f


def _chunk_scores(r, rm, t, tm, tau: float, v2t: bool, t2v: bool):
    """Scores of every video against one chunk of sentences, plus what backward needs.

    r [Bv, N, D], rm [Bv, N] bool, t [C, L, D], tm [C, L] bool.
    """
    s = torch.einsum("bnd,cld->bcnl", r, t)  # [Bv, C, N, L]
    rm4 = rm[:, None, :, None]  # [Bv, 1, N, 1]
    tm4 = tm[None, :, None, :]  # [1, C, 1, L]
    n_regions = rm.sum(1).clamp(min=1).to(s.dtype)  # [Bv]
    n_words = tm.sum(1).clamp(min=1).to(s.dtype)  # [C]
    out = {}
    if v2t:  # each region attends over the sentence's words
        p, f = _masked_softmax_score(s, tm4, dim=3, tau=tau)  # p [Bv, C, N, L], f [Bv, C, N]
        out["vt"] = (f * rm[:, None, :]).sum(2) / n_regions[:, None]  # [Bv, C]
        out["vt_grad"] = (p, f, n_regions)
    if t2v:  # each word attends over the video's regions
        q, g = _masked_softmax_score(s, rm4, dim=2, tau=tau)  # q [Bv, C, N, L], g [Bv, C, L]
        out["tv"] = (g * tm[None, :, :]).sum(2) / n_words[None, :]  # [Bv, C]
        out["tv_grad"] = (q, g, n_words)
    return s, out


class _RegionWordScores(torch.autograd.Function):
    """S^{v->t} and S^{t->v} ``[Bv, Bt]``, chunked over sentences, memory-bounded backward."""

    @staticmethod
    def forward(ctx, r, rm, t, tm, tau: float, chunk: int, v2t: bool, t2v: bool):
        bv, bt = r.shape[0], t.shape[0]
        s_vt = r.new_zeros(bv, bt) if v2t else None
        s_tv = r.new_zeros(bv, bt) if t2v else None
        for c0 in range(0, bt, chunk):
            c1 = min(c0 + chunk, bt)
            _, out = _chunk_scores(r, rm, t[c0:c1], tm[c0:c1], tau, v2t, t2v)
            if v2t:
                s_vt[:, c0:c1] = out["vt"]
            if t2v:
                s_tv[:, c0:c1] = out["tv"]
        ctx.save_for_backward(r, rm, t, tm)
        ctx.cfg = (tau, chunk, v2t, t2v)
        empty = r.new_zeros(0)
        return (s_vt if v2t else empty), (s_tv if t2v else empty)

    @staticmethod
    def backward(ctx, g_vt, g_tv):
        r, rm, t, tm = ctx.saved_tensors
        tau, chunk, v2t, t2v = ctx.cfg
        grad_r = torch.zeros_like(r) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(t) if ctx.needs_input_grad[2] else None
        for c0 in range(0, t.shape[0], chunk):
            c1 = min(c0 + chunk, t.shape[0])
            tc, tmc = t[c0:c1], tm[c0:c1]
            s, out = _chunk_scores(r, rm, tc, tmc, tau, v2t, t2v)
            grad_s = torch.zeros_like(s)  # [Bv, C, N, L]
            if v2t:
                # d/ds_k sum_l p_l s_l = p_k (1 + (s_k - f) / tau), then the region mean
                p, f, n_regions = out["vt_grad"]
                w = g_vt[:, c0:c1][:, :, None] * rm[:, None, :] / n_regions[:, None, None]  # [Bv, C, N]
                grad_s += w[..., None] * p * (1 + (s - f[..., None]) / tau)
            if t2v:
                q, g, n_words = out["tv_grad"]
                w = g_tv[:, c0:c1][:, :, None] * tmc[None, :, :] / n_words[None, :, None]  # [Bv, C, L]
                grad_s += w[:, :, None, :] * q * (1 + (s - g[:, :, None, :]) / tau)
            if grad_r is not None:
                grad_r += torch.einsum("bcnl,cld->bnd", grad_s, tc)
            if grad_t is not None:
                grad_t[c0:c1] = torch.einsum("bcnl,bnd->cld", grad_s, r)
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
    regions = regions.masked_fill(~region_mask[..., None], 0.0)  # padded values never reach a sum
    words = words.masked_fill(~word_mask[..., None], 0.0)
    s_vt, s_tv = _RegionWordScores.apply(
        regions, region_mask, words, word_mask, float(tau), int(chunk_size), v2t, t2v
    )
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
        log_t = torch.tensor(math.log(float(cfg.temperature)))
        if cfg.learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=self.min_temperature)

    def forward(self, video: VideoOutput, text: TextOutput) -> dict[str, torch.Tensor]:
        # the loss runs in fp32 whatever the towers ran in (bf16 logits lose the ranking)
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
            if gather:
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
