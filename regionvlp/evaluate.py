"""Retrieval and multiple-choice evaluation of a dual encoder.

Text→video (t2v) and video→text (v2t) retrieval over a val/test shard set:

* every caption of a video is one text query; t2v ranks the videos for each query;
  v2t ranks all captions for each video and takes the best rank among the video's
  own captions (the usual MSR-VTT / MSVD protocol);
* similarities come from ``DualEncoder.similarity`` (global + λ·local), video rows;
* **ties are pessimistic**: a wrong candidate that scores *equal to* the right one
  counts as ranked above it, so a collapsed model (all scores equal) gets the worst
  rank, never R@1 = 100. For v2t, ties among the video's own captions do not count;
* recalls are percentages; ``medr`` is the median rank (mean of the two middle ranks
  for an even count), ``meanr`` the mean rank; ranks start at 1.

Multiple choice: a sample whose json holds ``"options": [str, ...]`` (candidate
captions) and ``"answer": int`` (index of the right one) is one question; the model
picks the option with the highest similarity to the video. Ties are wrong.

Distributed: every rank embeds the samples its loader gives it (the loader visits every
sample exactly once across ranks × workers, last partial batch kept), then embeddings
are gathered with their padding removed, so the metrics over N samples are the same for
any world size. Each rank scores a slice of the text columns and the slices are gathered.

Library use::

    from regionvlp.evaluate import evaluate_model
    metrics = evaluate_model(model, cfg, split="val", batch_transform=None, device="cpu")
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from regionvlp import dist
from regionvlp.errors import UserError
from regionvlp.pathway import TextOutput, VideoOutput

log = logging.getLogger(__name__)

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


def retrieval_metrics(sim: torch.Tensor, text_to_video: torch.Tensor) -> dict[str, float]:
    """All t2v and v2t metrics (DESIGN.md keys) plus ``num_videos``, ``num_texts``."""
    nv, nt = sim.shape
    out: dict[str, Any] = {}
    out.update(rank_metrics(t2v_ranks(sim, text_to_video), "t2v"))
    out.update(rank_metrics(v2t_ranks(sim, text_to_video), "v2t"))
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


# ---------------------------------------------------------- distributed gather
def _comm_device(fallback: torch.device) -> torch.device:
    import torch.distributed as tdist

    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


def gather_variable(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [n_r, ...] of every rank along dim 0 in rank order; n_r may differ
    per rank (0 included). Padding used for the collective is removed. No-op on 1 rank."""
    if dist.world_size() == 1 or not dist._initialized():
        return t
    import torch.distributed as tdist

    dev = _comm_device(t.device)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size())]
    tdist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    biggest = max(sizes_l)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes_l]
    tdist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_l)]).to(t.device)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` (picklable objects); ``[obj]`` on 1 rank."""
    if dist.world_size() == 1 or not dist._initialized():
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size()
    tdist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------ embeddings
@dataclass
class EvalEmbeddings:
    """Everything the metrics need, for the whole eval set (after the gather).

    Videos are sorted by key; texts follow their videos in caption order."""

    keys: list[str]
    video: VideoOutput  # cls [Nv, D], regions [Nv, R, D], region_mask [Nv, R]
    text: TextOutput  # cls [Nt, D], words [Nt, L, D], word_mask [Nt, L]
    text_to_video: torch.Tensor  # [Nt] long
    captions: list[str]
    mc_scores: list[torch.Tensor] = field(default_factory=list)  # one [C_i] per question
    mc_answers: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "video": {"cls": self.video.cls, "regions": self.video.regions, "region_mask": self.video.region_mask},
            "text": {"cls": self.text.cls, "words": self.text.words, "word_mask": self.text.word_mask},
            "text_to_video": self.text_to_video,
            "captions": self.captions,
            "mc_scores": self.mc_scores,
            "mc_answers": self.mc_answers,
            "skipped": self.skipped,
        }

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "EvalEmbeddings":
        return cls(
            keys=list(d["keys"]),
            video=VideoOutput(**d["video"]),
            text=TextOutput(**d["text"]),
            text_to_video=d["text_to_video"],
            captions=list(d["captions"]),
            mc_scores=list(d["mc_scores"]),
            mc_answers=list(d["mc_answers"]),
            skipped=dict(d["skipped"]),
        )

    def save(self, path: Path) -> None:
        """Tensors into a safetensors file, everything else as JSON in its header (no pickle)."""
        from safetensors.torch import save_file

        tensors = {f"video.{k}": v for k, v in (("cls", self.video.cls), ("regions", self.video.regions),
                                                ("region_mask", self.video.region_mask))}
        tensors.update({f"text.{k}": v for k, v in (("cls", self.text.cls), ("words", self.text.words),
                                                    ("word_mask", self.text.word_mask))})
        tensors["text_to_video"] = self.text_to_video
        tensors.update({f"mc_scores.{i}": s for i, s in enumerate(self.mc_scores)})
        meta = {"keys": self.keys, "captions": self.captions, "mc_answers": self.mc_answers, "skipped": self.skipped,
                "mc_questions": len(self.mc_scores)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"regionvlp_eval": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> "EvalEmbeddings":
        """Read :meth:`save`'s file; a file of any other shape is a :class:`UserError`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["regionvlp_eval"])
                t = {k: f.get_tensor(k) for k in f.keys()}
            return cls(keys=[str(k) for k in meta["keys"]],
                       video=VideoOutput(cls=t["video.cls"], regions=t["video.regions"], region_mask=t["video.region_mask"]),
                       text=TextOutput(cls=t["text.cls"], words=t["text.words"], word_mask=t["text.word_mask"]),
                       text_to_video=t["text_to_video"], captions=[str(c) for c in meta["captions"]],
                       mc_scores=[t[f"mc_scores.{i}"] for i in range(int(meta["mc_questions"]))],
                       mc_answers=[int(a) for a in meta["mc_answers"]],
                       skipped={str(k): int(v) for k, v in dict(meta["skipped"]).items()})
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: not an eval cache written by regionvlp ({' '.join(str(err).split())[:200]}); "
                            "delete it to recompute") from None


def _cat_padded(parts: Sequence[torch.Tensor], fill: float | bool = 0) -> torch.Tensor:
    """Concatenate [n_i, S_i, ...] along dim 0, padding dim 1 to the largest S_i."""
    if not parts:
        raise ValueError("nothing to concatenate")
    longest = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        if p.shape[1] < longest:
            pad = p.new_full((p.shape[0], longest - p.shape[1], *p.shape[2:]), fill)
            p = torch.cat([p, pad], 1)
        out.append(p)
    return torch.cat(out)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _video_to_cpu(v: VideoOutput) -> VideoOutput:
    return VideoOutput(cls=v.cls.detach().float().cpu(), regions=v.regions.detach().float().cpu(),
                       region_mask=v.region_mask.detach().bool().cpu())


def _text_to_cpu(t: TextOutput) -> TextOutput:
    return TextOutput(cls=t.cls.detach().float().cpu(), words=t.words.detach().float().cpu(),
                      word_mask=t.word_mask.detach().bool().cpu())


def _slice_video(v: VideoOutput, idx: slice | torch.Tensor) -> VideoOutput:
    return VideoOutput(cls=v.cls[idx], regions=v.regions[idx], region_mask=v.region_mask[idx])


def _slice_text(t: TextOutput, idx: slice | torch.Tensor) -> TextOutput:
    return TextOutput(cls=t.cls[idx], words=t.words[idx], word_mask=t.word_mask[idx])


def _cat_video(parts: Sequence[VideoOutput]) -> VideoOutput:
    return VideoOutput(cls=torch.cat([p.cls for p in parts]), regions=_cat_padded([p.regions for p in parts]),
                       region_mask=_cat_padded([p.region_mask for p in parts], False))


def _cat_text(parts: Sequence[TextOutput]) -> TextOutput:
    return TextOutput(cls=torch.cat([p.cls for p in parts]), words=_cat_padded([p.words for p in parts]),
                      word_mask=_cat_padded([p.word_mask for p in parts], False))


def _autocast(model: torch.nn.Module, device: torch.device):
    """bf16/fp16 autocast when the model's weights are half precision (e.g. a DeepSpeed
    bf16 engine's module); a no-op context for fp32 models."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


def _apply_transform(transform: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The frozen region extractor (``frames`` uint8 [B,T,3,H,W] → region tensors, what
    ``build_batch_transform`` returns) or a batch → batch callable (the trainer's)."""
    from regionvlp.regions.extractor import RegionExtractor

    if isinstance(transform, RegionExtractor):
        from regionvlp.model import prepare_batch

        return prepare_batch(batch, transform)
    return transform(batch)


class _Tokenize:
    """Captions → (input_ids, attention_mask) with the data pipeline's tokenizer."""

    def __init__(self, cfg: Any, tokenizer: Any = None):
        from regionvlp import data

        self._data = data
        name = cfg.data.tokenizer or cfg.model.text.name
        self.tokenizer = tokenizer if tokenizer is not None else data.load_tokenizer(name)
        self.max_words = int(cfg.data.max_words)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._data.tokenize(self.tokenizer, captions, self.max_words)
        return torch.as_tensor(ids).long(), torch.as_tensor(mask).long()


@torch.no_grad()
def embed_local(model: Any, batches: Iterable[Mapping[str, Any]], tokenize: Any, *,
                batch_transform: Any = None, device: torch.device | str = "cpu",
                text_batch: int = 64, limit: int | None = None, progress: bool = False) -> EvalEmbeddings:
    """Embed the videos and all their captions that this rank's ``batches`` hold.

    ``model`` has the DualEncoder interface (``encode_video``, ``encode_text``,
    ``similarity``; normalised outputs). ``tokenize(captions) -> (ids, mask)``.
    Samples without a caption are skipped and counted (``no_caption``)."""
    device = torch.device(device)
    keys: list[str] = []
    captions: list[str] = []
    caps_per_video: list[int] = []
    videos: list[VideoOutput] = []
    mc_scores: list[torch.Tensor] = []
    mc_answers: list[int] = []
    skipped: dict[str, int] = {}

    def skip(reason: str, n: int = 1) -> None:
        skipped[reason] = skipped.get(reason, 0) + n

    bar = None
    if progress and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(desc="eval: embedding videos", unit="clip", file=None, dynamic_ncols=True)
    for batch in batches:
        for reason, n in (batch.get("skipped") or {}).items():
            skip(str(reason), int(n))
        bkeys = list(batch["__key__"])
        if not bkeys:
            continue
        bcaps = batch.get("captions") or [[c] for c in batch["caption"]]
        batch = _to_device(batch, device)
        if batch_transform is not None and "frames" in batch and "region_feats" not in batch:
            batch = _apply_transform(batch_transform, batch)
        with _autocast(model, device):
            v = _video_to_cpu(model.encode_video(batch))
        keep = [i for i, caps in enumerate(bcaps) if any(str(c).strip() for c in caps)]
        if len(keep) < len(bkeys):
            skip("no_caption", len(bkeys) - len(keep))
        if not keep:
            continue
        v = _slice_video(v, torch.tensor(keep))
        videos.append(v)
        metas = batch.get("meta") or [{}] * len(bkeys)
        for j, i in enumerate(keep):
            keys.append(str(bkeys[i]))
            caps = [str(c) for c in bcaps[i] if str(c).strip()]
            captions.extend(caps)
            caps_per_video.append(len(caps))
            meta = metas[i] or {}
            if MC_OPTIONS_KEY in meta and MC_ANSWER_KEY in meta:
                opts = [str(o) for o in meta[MC_OPTIONS_KEY]]
                try:
                    answer = int(meta[MC_ANSWER_KEY])
                except (TypeError, ValueError):
                    answer = -1
                if len(opts) < 2 or not 0 <= answer < len(opts):
                    skip("bad_mc_question")
                    continue
                ids, mask = tokenize(opts)
                with _autocast(model, device):
                    t = _text_to_cpu(model.encode_text(ids.to(device), mask.to(device)))
                    s = model.similarity(_slice_video(v, slice(j, j + 1)), t)  # [1, C]
                mc_scores.append(s.float().flatten().cpu())
                mc_answers.append(answer)
        if bar is not None:
            bar.update(len(keep))
        if limit is not None and len(keys) >= limit:
            break
    if bar is not None:
        bar.close()

    texts: list[TextOutput] = []
    for s in range(0, len(captions), text_batch):
        ids, mask = tokenize(captions[s : s + text_batch])
        with _autocast(model, device):
            texts.append(_text_to_cpu(model.encode_text(ids.to(device), mask.to(device))))
    empty_v = VideoOutput(cls=torch.zeros(0, 1), regions=torch.zeros(0, 1, 1), region_mask=torch.zeros(0, 1, dtype=torch.bool))
    empty_t = TextOutput(cls=torch.zeros(0, 1), words=torch.zeros(0, 1, 1), word_mask=torch.zeros(0, 1, dtype=torch.bool))
    return EvalEmbeddings(
        keys=keys,
        video=_cat_video(videos) if videos else empty_v,
        text=_cat_text(texts) if texts else empty_t,
        text_to_video=torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(caps_per_video, dtype=torch.long)),
        captions=captions,
        mc_scores=mc_scores,
        mc_answers=mc_answers,
        skipped=skipped,
    )


def _pad_to(t: torch.Tensor, shape: Sequence[int], fill: float | bool) -> torch.Tensor:
    """Pad ``t`` at the end of every dim >= 1 up to ``shape`` (dim 0 untouched)."""
    if list(t.shape[1:]) == list(shape):
        return t
    out = t.new_full((t.shape[0], *shape), fill)
    out[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])] = t
    return out


def gather_padded(t: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """:func:`gather_variable` for tensors whose trailing sizes may differ per rank
    (region count, token length, an empty rank's placeholder): all are padded to the
    largest trailing shape first."""
    if dist.world_size() == 1 or not dist._initialized():
        return t
    shapes = gather_objects(list(t.shape[1:]))
    target = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    return gather_variable(_pad_to(t, target, fill))


def _meta(e: EvalEmbeddings) -> dict[str, Any]:
    return {"keys": e.keys, "captions": e.captions,
            "counts": torch.bincount(e.text_to_video, minlength=len(e.keys)).tolist(),
            "mc_scores": [s.tolist() for s in e.mc_scores], "mc_answers": e.mc_answers, "skipped": e.skipped}


def _cat_to_largest(parts: Sequence[torch.Tensor], fill: float | bool = 0) -> torch.Tensor:
    """Concatenate along dim 0 after padding every trailing dim to the largest."""
    target = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    return torch.cat([_pad_to(p, target, fill) for p in parts])


def _combine(meta: Sequence[Mapping[str, Any]], v: VideoOutput, t: TextOutput) -> EvalEmbeddings:
    """Rank-ordered parts (metadata + concatenated tensors) → one set sorted by key."""
    keys = [k for m in meta for k in m["keys"]]
    captions = [c for m in meta for c in m["captions"]]
    counts = [c for m in meta for c in m["counts"]]
    skipped: dict[str, int] = {}
    for m in meta:
        for reason, n in m["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
    mc_pairs = [(torch.tensor(s), a) for m in meta for s, a in zip(m["mc_scores"], m["mc_answers"])]

    # sort videos by key; texts follow their video
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    text_order = [j for i in order for j in range(starts[i], starts[i + 1])]
    new_counts = torch.tensor([counts[i] for i in order], dtype=torch.long)
    return EvalEmbeddings(
        keys=[keys[i] for i in order],
        video=_slice_video(v, torch.tensor(order, dtype=torch.long)),
        text=_slice_text(t, torch.tensor(text_order, dtype=torch.long)),
        text_to_video=torch.repeat_interleave(torch.arange(len(order)), new_counts),
        captions=[captions[j] for j in text_order],
        mc_scores=[s for s, _ in mc_pairs],
        mc_answers=[a for _, a in mc_pairs],
        skipped=skipped,
    )


def merge_embeddings(parts: Sequence[EvalEmbeddings]) -> EvalEmbeddings:
    """What :func:`gather_embeddings` gives, from the parts in hand (e.g. each rank's
    :func:`embed_local` result computed one after another)."""
    v = VideoOutput(cls=_cat_to_largest([p.video.cls for p in parts]),
                    regions=_cat_to_largest([p.video.regions for p in parts]),
                    region_mask=_cat_to_largest([p.video.region_mask for p in parts], False))
    t = TextOutput(cls=_cat_to_largest([p.text.cls for p in parts]),
                   words=_cat_to_largest([p.text.words for p in parts]),
                   word_mask=_cat_to_largest([p.text.word_mask for p in parts], False))
    return _combine([_meta(p) for p in parts], v, t)


def gather_embeddings(local: EvalEmbeddings) -> EvalEmbeddings:
    """All ranks' embeddings on every rank, each sample once, videos sorted by key
    (so the result does not depend on the world size or the worker split). Tensors
    travel by padded ``all_gather`` (NCCL-friendly), the padding is cut off again."""
    meta = gather_objects(_meta(local))
    v = VideoOutput(cls=gather_padded(local.video.cls), regions=gather_padded(local.video.regions),
                    region_mask=gather_padded(local.video.region_mask, False))
    t = TextOutput(cls=gather_padded(local.text.cls), words=gather_padded(local.text.words),
                   word_mask=gather_padded(local.text.word_mask, False))
    return _combine(meta, v, t)


# ------------------------------------------------------------------ similarity
@torch.no_grad()
def similarity_matrix(model: Any, emb: EvalEmbeddings, *, device: torch.device | str = "cpu",
                      video_chunk: int = 256, text_chunk: int = 256) -> torch.Tensor:
    """[Nv, Nt] float32 on CPU via ``model.similarity`` (global + λ·local), computed in
    chunks; under torch.distributed each rank scores a slice of the text columns and the
    slices are gathered."""
    device = torch.device(device)
    nv, nt = emb.video.cls.shape[0], emb.text.cls.shape[0]
    world, rank = (dist.world_size(), dist.rank()) if dist._initialized() else (1, 0)
    per = -(-nt // world)
    lo, hi = min(rank * per, nt), min((rank + 1) * per, nt)
    cols = torch.empty(nv, hi - lo)  # [Nv, my texts]
    for ts in range(lo, hi, text_chunk):
        te = min(ts + text_chunk, hi)
        t = _slice_text(emb.text, slice(ts, te))
        t = TextOutput(*(x.to(device) for x in (t.cls, t.words, t.word_mask)))
        for vs in range(0, nv, video_chunk):
            v = _slice_video(emb.video, slice(vs, vs + video_chunk))
            v = VideoOutput(cls=v.cls.to(device), regions=v.regions.to(device), region_mask=v.region_mask.to(device))
            with _autocast(model, device):
                cols[vs : vs + video_chunk, ts - lo : te - lo] = model.similarity(v, t).float().cpu()
    if world > 1:
        return gather_variable(cols.T.contiguous()).T.contiguous()
    return cols


def metrics_from_embeddings(model: Any, emb: EvalEmbeddings, *, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The eval JSON: retrieval metrics, ``num_videos``/``num_texts``, ``mc_accuracy`` +
    ``mc_questions`` when the set has multiple-choice questions, ``skipped``."""
    if not emb.keys:
        raise UserError("the eval set has no usable samples: check data.val.urls (see `regionvlp shards check`)")
    sim = similarity_matrix(model, emb, device=device)
    out: dict[str, Any] = retrieval_metrics(sim, emb.text_to_video)
    if emb.mc_answers:
        out["mc_accuracy"] = mc_accuracy(emb.mc_scores, emb.mc_answers)
        out["mc_questions"] = len(emb.mc_answers)
    out["skipped"] = dict(emb.skipped)
    return out


# ------------------------------------------------------------------- entry point
def cache_fingerprint(cfg: Any, split: str, tag: str = "") -> str:
    """What the cached embeddings depend on: the model and eval-data config, the split's
    shards, and ``tag`` (the checkpoint's identity, e.g. its path and step)."""
    from regionvlp.config import to_container

    c = to_container(cfg)
    d = c["data"]
    keyed = {"model": c["model"], "split": split, "urls": d[split]["urls"], "num_frames": d["num_frames"],
             "size": d["size"], "eval_sampling": d["eval_sampling"], "max_words": d["max_words"],
             "tokenizer": d["tokenizer"], "backend": d["backend"], "tag": tag}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unwrap(model: Any) -> Any:
    """The DualEncoder inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "encode_video"):
        model = model.module
    return model


def evaluate_model(model: Any, cfg: Any, split: str = "val", batch_transform: Any = None,
                   device: torch.device | str | None = None, *, loader: Iterable[Mapping[str, Any]] | None = None,
                   tokenizer: Any = None, tokenize: Any = None, cache_dir: str | os.PathLike | None = None, cache_tag: str = "",
                   limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Retrieval (+ multiple-choice) metrics of ``model`` on ``cfg.data.<split>``.

    Call on every rank under torch.distributed (all ranks return the same dict).
    ``loader`` overrides ``regionvlp.data.build_loader(cfg, split, training=False)``;
    ``tokenize(captions) -> (input_ids, attention_mask)`` overrides the pipeline's
    tokenizer (``tokenizer``, or the one ``cfg.data.tokenizer``/``cfg.model.text.name`` names).
    With ``cache_dir`` the gathered embeddings are saved there (rank 0) and reused by a
    later call with the same config, shards and ``cache_tag``.
    Returns the DESIGN.md eval keys plus ``num_videos``, ``num_texts``, ``skipped``."""
    model = _unwrap(model)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if split not in ("train", "val"):
        raise UserError(f"eval split must be 'train' or 'val', got {split!r}")
    if cfg.data.eval_sampling == "random_segment":
        log.warning("data.eval_sampling=random_segment: eval frames are not deterministic; use uniform")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"embeddings-{split}-{cache_fingerprint(cfg, split, cache_tag)}.safetensors"
    was_training = model.training
    model.eval()
    try:
        if cache_file is not None and cache_file.is_file():
            log.info("eval: reusing cached embeddings %s", cache_file)
            emb = EvalEmbeddings.load(cache_file)
            cached = True
        else:
            tok = tokenize if tokenize is not None else _Tokenize(cfg, tokenizer)
            if loader is None:
                from regionvlp.data import build_loader

                if not list(getattr(cfg.data, split).urls):
                    raise UserError(f"data.{split}.urls is empty: set it to the eval shards (data.{split}.urls=[...])")
                loader = build_loader(cfg, split, training=False, tokenizer=getattr(tok, "tokenizer", None))
            local = embed_local(model, loader, tok, batch_transform=batch_transform, device=device,
                                limit=limit, progress=progress)
            emb = gather_embeddings(local)
            cached = False
            if cache_file is not None and dist.is_main():
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(".tmp")
                emb.save(tmp)
                os.replace(tmp, cache_file)
        out = metrics_from_embeddings(model, emb, device=device)
        out["cached"] = cached
        return out
    finally:
        model.train(was_training)


# ------------------------------------------------------------------- checkpoints
def load_eval_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Any, Any, Any, str]:
    """``(model, batch_transform, checkpoint_cfg, tag)`` from an export folder
    (``model.safetensors``, via :func:`regionvlp.checkpoint.load_model`), a training run
    directory (its newest complete checkpoint), its ``checkpoints/`` folder or one
    ``checkpoints/stepNNNNNNNN`` tag folder. ``tag`` names what was loaded (cache key)."""
    from regionvlp import checkpoint as ck

    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"--checkpoint {path}: no such folder; pass a `regionvlp train` run dir or a `regionvlp export` dir")
    device = torch.device(device)
    if (path / "model.safetensors").is_file():
        model = ck.load_model(path, device)
        stamp = (path / "model.safetensors").stat().st_mtime_ns
        return model, model.batch_transform, model.config, f"export:{path.resolve()}:{stamp}"
    from regionvlp.model import build_batch_transform, build_model
    from regionvlp.train import load_extractor_weights

    ckpt_dir, tag = ck._find_checkpoint(path, None)
    run_dir = ckpt_dir.parent
    cfg = ck._read_config(run_dir / "config.yaml")
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(ck.consolidated_state_dict(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt_dir / tag} does not match {run_dir / 'config.yaml'}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device).eval()
    ck.attach_qa_vocab(model, run_dir)
    transform = build_batch_transform(cfg)
    if transform is not None:
        load_extractor_weights(transform, run_dir)
        transform.to(device)
    stamp = (ckpt_dir / tag).stat().st_mtime_ns
    return model, transform, cfg, f"run:{(ckpt_dir / tag).resolve()}:{stamp}"


def _eval_device(cfg: Any) -> torch.device:
    want = str(cfg.run.device)
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("run.device=cuda but no GPU is visible; use run.device=cpu")
        torch.cuda.set_device(dist.local_rank())
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def _init_distributed() -> bool:
    """A process group when a launcher (torchrun / deepspeed) started several processes."""
    import torch.distributed as tdist

    if tdist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    return True


def run_eval(config: str | os.PathLike | None, checkpoint: str | os.PathLike, overrides: Sequence[str] = (), *,
             split: str = "val", cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, Any] | None:
    """``regionvlp eval CONFIG --checkpoint DIR [k=v …]``: the architecture (``model.*``)
    comes from the checkpoint's config, data and eval settings from CONFIG + overrides.
    Returns the metrics on rank 0, ``None`` on other ranks."""
    from regionvlp.config import load_config

    cfg = load_config(config, overrides)
    started = _init_distributed()
    try:
        device = _eval_device(cfg)
        model, transform, ckpt_cfg, tag = load_eval_model(checkpoint, device)
        log.info("eval: a %s model from %s", ckpt_cfg.model.regions, checkpoint)
        cfg.model = ckpt_cfg.model  # the architecture the weights were trained with
        if ckpt_cfg.qa.enabled:  # a QA model: answer the questions of the QA shards
            from regionvlp.qa.evaluate import evaluate_qa

            cfg.qa = ckpt_cfg.qa
            cfg.qa.vocab = str(model.__dict__["qa_vocab_file"])
            out = evaluate_qa(model, cfg, split, batch_transform=transform, device=device, limit=limit)
        else:
            out = evaluate_model(model, cfg, split, batch_transform=transform, device=device,
                                 cache_dir=cache_dir, cache_tag=tag, limit=limit, progress=True)
        out = {"checkpoint": str(checkpoint), "regions": str(cfg.model.regions), "split": split, **out}
        return out if dist.is_main() else None
    finally:
        if started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
