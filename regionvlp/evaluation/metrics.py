"""Retrieval and multiple-choice metrics: pure functions of a similarity matrix.

Text→video (t2v) and video→text (v2t) retrieval:

* every caption of a video is one text query; t2v ranks the videos for each query;
  v2t ranks all captions for each video and takes the best rank among the video's
  own captions (the usual MSR-VTT / MSVD protocol);
* **ties are pessimistic**: a wrong candidate that scores *equal to* the right one
  counts as ranked above it, so a collapsed model (all scores equal) gets the worst
  rank, never R@1 = 100. For v2t, ties among the video's own captions do not count;
* recalls are percentages; ``medr`` is the median rank (mean of the two middle ranks
  for an even count), ``meanr`` the mean rank; ranks start at 1.

Multiple choice: a sample whose json holds ``"options": [str, ...]`` (candidate
captions) and ``"answer": int`` (index of the right one) is one question; the model
picks the option with the highest similarity to the video. Ties are wrong.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

RECALL_KS = (1, 5, 10, 50)
MC_OPTIONS_KEY = "options"  # json key: list of candidate captions
MC_ANSWER_KEY = "answer"  # json key: index of the right candidate


# ----------------------------------------------------------------- pure metrics
def _clean(sim: torch.Tensor) -> torch.Tensor:
    """float32 copy with NaN → -inf (a NaN score never helps a candidate)."""
    sim = sim.detach().float()
    return torch.nan_to_num(sim, nan=-math.inf)


def t2v_ranks(sim: torch.Tensor, text_to_video: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Rank (1 = best) of the right video for every text query, pessimistic on ties.

    sim: [Nv, Nt] (video rows); text_to_video: [Nt] long, the video of each text.
    rank = #videos scoring >= the right one (the right one included).
    """
    sim = _clean(sim)
    nv, nt = sim.shape
    text_to_video = text_to_video.long().to(sim.device)
    if text_to_video.shape != (nt,):
        raise ValueError(f"text_to_video must be [{nt}], got {list(text_to_video.shape)}")
    ranks = torch.empty(nt, dtype=torch.long)
    for s in range(0, nt, chunk):
        cols = sim[:, s : s + chunk]  # [Nv, c]
        idx = text_to_video[s : s + chunk]  # [c]
        right = cols.gather(0, idx[None, :])  # [1, c]
        ranks[s : s + chunk] = (cols >= right).sum(0).clamp(min=1).cpu()
    return ranks


def v2t_ranks(sim: torch.Tensor, text_to_video: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Rank (1 = best) of the best of each video's own captions among all texts.

    rank = 1 + #other videos' texts scoring >= the video's best own caption.
    Every video must have at least one caption.
    """
    sim = _clean(sim)
    nv, nt = sim.shape
    text_to_video = text_to_video.long().to(sim.device)
    counts = torch.bincount(text_to_video, minlength=nv)
    if (counts[:nv] == 0).any():
        missing = (counts[:nv] == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"videos without a caption (first: {missing}); each video needs >= 1")
    ranks = torch.empty(nv, dtype=torch.long)
    for s in range(0, nv, chunk):
        rows = sim[s : s + chunk]  # [c, Nt]
        vids = torch.arange(s, s + rows.shape[0], device=sim.device)
        own = text_to_video[None, :] == vids[:, None]  # [c, Nt]
        best = rows.masked_fill(~own, -math.inf).amax(1, keepdim=True)  # [c, 1]
        ranks[s : s + chunk] = (1 + ((rows >= best) & ~own).sum(1)).cpu()
    return ranks


def rank_metrics(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_r1 … _r50`` (percent), ``_medr``, ``_meanr`` from 1-based ranks."""
    r = ranks.double().cpu().numpy()
    if r.size == 0:
        raise ValueError("no ranks to summarise (empty eval set)")
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.median(r))
    out[f"{prefix}_meanr"] = float(np.mean(r))
    return out


RESCORE = ("none", "dual_softmax")


def dual_softmax(sim: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-softmax re-scoring (the inverted softmax of CAMoE and the peers that report
    with it): ``(t2v, v2t)`` scores [Nv, Nt]. Text->video scores are ``sim`` times a
    softmax over the texts of each video (a video that every text likes counts less);
    video->text scores are ``sim`` times a softmax over the videos of each text."""
    s = _clean(sim).double()  # [Nv, Nt]
    logits = s / float(temperature)
    over_texts = torch.softmax(logits, dim=1)  # [Nv, Nt], rows sum to 1
    over_videos = torch.softmax(logits, dim=0)  # [Nv, Nt], columns sum to 1
    return s * over_texts, s * over_videos


def retrieval_metrics(sim: torch.Tensor, text_to_video: torch.Tensor, v2t_sim: torch.Tensor | None = None
                      ) -> dict[str, float]:
    """All t2v and v2t metrics (DESIGN.md keys) plus ``num_videos``, ``num_texts``;
    ``v2t_sim`` (same shape): other scores for the v2t direction (re-scoring)."""
    nv, nt = sim.shape
    out: dict[str, Any] = {}
    out.update(rank_metrics(t2v_ranks(sim, text_to_video), "t2v"))
    out.update(rank_metrics(v2t_ranks(sim if v2t_sim is None else v2t_sim, text_to_video), "v2t"))
    out["num_videos"] = int(nv)
    out["num_texts"] = int(nt)
    return out


def mc_correct(scores: torch.Tensor, answer: int) -> bool:
    """True when option ``answer`` scores strictly above every other option."""
    scores = _clean(scores.flatten())
    if not 0 <= answer < scores.numel():
        raise ValueError(f"answer index {answer} outside 0..{scores.numel() - 1}")
    others = torch.cat([scores[:answer], scores[answer + 1 :]])
    return bool(others.numel() == 0 or (scores[answer] > others.max()).item())


def mc_accuracy(scores: Sequence[torch.Tensor] | torch.Tensor, answers: Sequence[int] | torch.Tensor) -> float:
    """Percent of questions whose right option scores strictly highest (ties are wrong).

    scores: one [C_i] tensor per question (C may differ) or a [N, C] tensor.
    """
    answers = [int(a) for a in (answers.tolist() if isinstance(answers, torch.Tensor) else answers)]
    if len(scores) != len(answers):
        raise ValueError(f"{len(scores)} score rows but {len(answers)} answers")
    if not answers:
        raise ValueError("no multiple-choice questions")
    hits = sum(mc_correct(s, a) for s, a in zip(scores, answers))
    return 100.0 * hits / len(answers)
