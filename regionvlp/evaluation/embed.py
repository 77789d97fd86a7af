"""Embeddings for evaluation: each rank embeds the videos and captions its loader gives
it (:func:`embed_local`), the ranks' parts are gathered with their padding removed and
sorted by key (:func:`gather_embeddings`), and each rank scores a slice of the text
columns of the similarity matrix (:func:`similarity_matrix`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from regionvlp import dist
from regionvlp.data import load_tokenizer
from regionvlp.data import tokenize as tokenize_captions
from regionvlp.data.text import tokenizer_name
from regionvlp.errors import UserError
from regionvlp.evaluation.metrics import MC_ANSWER_KEY, MC_OPTIONS_KEY
from regionvlp.model import CLIP_KEYS, prepare_batch
from regionvlp.outputs import TextOutput, VideoOutput
from regionvlp.runtime import add_counts, get_autocast, model_dtype


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


def video_to_cpu(v: VideoOutput) -> VideoOutput:
    """Detached fp32 (bool masks) copies on the CPU."""
    return VideoOutput(cls=v.cls.detach().float().cpu(), regions=v.regions.detach().float().cpu(),
                       region_mask=v.region_mask.detach().bool().cpu())


def text_to_cpu(t: TextOutput) -> TextOutput:
    """Detached fp32 (bool masks) copies on the CPU."""
    return TextOutput(cls=t.cls.detach().float().cpu(), words=t.words.detach().float().cpu(),
                      word_mask=t.word_mask.detach().bool().cpu())


def slice_video(v: VideoOutput, idx: slice | torch.Tensor) -> VideoOutput:
    return VideoOutput(cls=v.cls[idx], regions=v.regions[idx], region_mask=v.region_mask[idx])


def slice_text(t: TextOutput, idx: slice | torch.Tensor) -> TextOutput:
    return TextOutput(cls=t.cls[idx], words=t.words[idx], word_mask=t.word_mask[idx])


def cat_video(parts: Sequence[VideoOutput]) -> VideoOutput:
    """Concatenated along the batch, region dims padded to the largest (masked out)."""
    return VideoOutput(cls=cat_to_largest([p.cls for p in parts]), regions=cat_to_largest([p.regions for p in parts]),
                       region_mask=cat_to_largest([p.region_mask for p in parts], False))


def cat_text(parts: Sequence[TextOutput]) -> TextOutput:
    """Concatenated along the batch, word dims padded to the largest (masked out)."""
    return TextOutput(cls=cat_to_largest([p.cls for p in parts]), words=cat_to_largest([p.words for p in parts]),
                      word_mask=cat_to_largest([p.word_mask for p in parts], False))


class Tokenize:
    """Captions → (input_ids, attention_mask) with the data pipeline's tokenizer."""

    def __init__(self, cfg: Any, tokenizer: Any = None):
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_name(cfg))
        self.max_words = int(cfg.data.max_words)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize_captions(self.tokenizer, captions, self.max_words)
        return torch.as_tensor(ids).long(), torch.as_tensor(mask).long()


# ------------------------------------------------------------- embed one rank
@dataclass
class LocalEmbeddings:
    """What one rank's batches gave so far (before texts are embedded)."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caps_per_video: list[int] = field(default_factory=list)
    videos: list[VideoOutput] = field(default_factory=list)
    mc_scores: list[torch.Tensor] = field(default_factory=list)
    mc_answers: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


def mc_question(meta: Mapping[str, Any]) -> tuple[list[str], int] | None | bool:
    """``(options, answer)`` of a multiple-choice sample, None when the sample has no
    question, False when its question is malformed."""
    if MC_OPTIONS_KEY not in meta or MC_ANSWER_KEY not in meta:
        return None
    options = [str(o) for o in meta[MC_OPTIONS_KEY]]
    try:
        answer = int(meta[MC_ANSWER_KEY])
    except (TypeError, ValueError):
        return False
    if len(options) < 2 or not 0 <= answer < len(options):
        return False
    return options, answer


def score_options(model: Any, video: VideoOutput, options: list[str], tokenize: Any,
                  device: torch.device) -> torch.Tensor:
    """Similarity [C] of one video (a [1, ...] slice) to each candidate caption."""
    ids, mask = tokenize(options)
    with get_autocast(model_dtype(model), device.type)():
        t = text_to_cpu(model.encode_text(ids.to(device), mask.to(device)))
        s = model.similarity(video, t)  # [1, C]
    return s.float().flatten().cpu()


def split_clips(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """A batch of clips of N*T frames -> one of B*N clips of T frames (clip j of a video: its
    j-th run of T frames, so N evenly spaced clips of a uniformly sampled video)."""
    out = dict(batch)
    for key in CLIP_KEYS:
        value = batch.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        b, frames = value.shape[:2]
        if frames % n:
            raise UserError(f"eval.clips_per_video={n}: the batch's {key} has {frames} frames per video, not a "
                            f"multiple of {n} (region shards hold the frames they were extracted with)")
        out[key] = value.reshape(b * n, frames // n, *value.shape[2:])  # [B*N, T, ...]
    return out


def encode_clips(model: Any, batch: dict[str, Any], batch_transform: Any, device: torch.device,
                 clips_per_video: int) -> VideoOutput:
    """Video embeddings on the CPU; with N clips per video the N clips' [CLS] are averaged
    (then renormalised) and their regions concatenated ([B, N*R, D])."""
    n = clips_per_video
    with get_autocast(model_dtype(model), device.type)():
        video = video_to_cpu(model.encode_video(prepare_batch(split_clips(batch, n) if n > 1 else batch,
                                                              batch_transform, device)))
    if n == 1:
        return video
    b = video.cls.shape[0] // n
    cls = torch.nn.functional.normalize(video.cls.reshape(b, n, -1).mean(1), dim=-1)  # [B, D]
    regions = video.regions.reshape(b, n * video.regions.shape[1], -1)  # [B, N*R, D]
    return VideoOutput(cls=cls, regions=regions, region_mask=video.region_mask.reshape(b, -1))


def embed_batch(model: Any, batch: dict[str, Any], acc: LocalEmbeddings, tokenize: Any, *,
                batch_transform: Any, device: torch.device, clips_per_video: int = 1,
                first_caption: bool = False) -> int:
    """Embed one loader batch's videos into ``acc`` (and score its multiple-choice
    questions); returns how many videos were kept. ``first_caption``: only each video's
    first caption is a query (else all of them)."""
    for reason, n in (batch.get("skipped") or {}).items():
        acc.skip(str(reason), int(n))
    keys = list(batch["__key__"])
    captions = batch.get("captions") or [[c] for c in batch["caption"]]
    if first_caption:
        captions = [[next((c for c in caps if str(c).strip()), "")] for caps in captions]
    keep = [i for i, caps in enumerate(captions) if any(str(c).strip() for c in caps)]
    if len(keep) < len(keys):
        acc.skip("no_caption", len(keys) - len(keep))
    if not keep:
        return 0
    video = slice_video(encode_clips(model, batch, batch_transform, device, clips_per_video), torch.tensor(keep))
    acc.videos.append(video)
    metas = batch.get("meta") or [{}] * len(keys)
    for j, i in enumerate(keep):
        acc.keys.append(str(keys[i]))
        caps = [str(c) for c in captions[i] if str(c).strip()]
        acc.captions.extend(caps)
        acc.caps_per_video.append(len(caps))
        question = mc_question(metas[i] or {})
        if question is False:
            acc.skip("bad_mc_question")
        elif question is not None:
            acc.mc_scores.append(score_options(model, slice_video(video, slice(j, j + 1)), question[0], tokenize, device))
            acc.mc_answers.append(question[1])
    return len(keep)


def embed_texts(model: Any, captions: list[str], tokenize: Any, device: torch.device, text_batch: int) -> TextOutput:
    """Every caption's text embedding, on the CPU, in ``text_batch`` chunks."""
    texts: list[TextOutput] = []
    for s in range(0, len(captions), text_batch):
        ids, mask = tokenize(captions[s : s + text_batch])
        with get_autocast(model_dtype(model), device.type)():
            texts.append(text_to_cpu(model.encode_text(ids.to(device), mask.to(device))))
    if not texts:
        return TextOutput(cls=torch.zeros(0, 1), words=torch.zeros(0, 1, 1), word_mask=torch.zeros(0, 1, dtype=torch.bool))
    return cat_text(texts)


@torch.no_grad()
def embed_local(model: Any, batches: Iterable[Mapping[str, Any]], tokenize: Any, *,
                batch_transform: Any = None, device: torch.device | str = "cpu",
                text_batch: int = 64, limit: int | None = None, progress: bool = False,
                clips_per_video: int = 1, first_caption: bool = False) -> EvalEmbeddings:
    """Embed the videos and all their captions that this rank's ``batches`` hold
    (``clips_per_video``: each batch holds N*T frames per video, N clips averaged;
    ``first_caption``: one query per video).

    ``model`` has the DualEncoder interface (``encode_video``, ``encode_text``,
    ``similarity``; normalised outputs). ``tokenize(captions) -> (ids, mask)``.
    Samples without a caption are skipped and counted (``no_caption``)."""
    device = torch.device(device)
    acc = LocalEmbeddings()
    bar = tqdm(desc="eval: embedding videos", unit="clip", dynamic_ncols=True) if progress and dist.is_main() else None
    for batch in batches:
        if not list(batch["__key__"]):
            continue
        kept = embed_batch(model, dict(batch), acc, tokenize, batch_transform=batch_transform, device=device,
                           clips_per_video=clips_per_video, first_caption=first_caption)
        if bar is not None:
            bar.update(kept)
        if limit is not None and len(acc.keys) >= limit:
            break
    if bar is not None:
        bar.close()
    empty_v = VideoOutput(cls=torch.zeros(0, 1), regions=torch.zeros(0, 1, 1), region_mask=torch.zeros(0, 1, dtype=torch.bool))
    counts = torch.tensor(acc.caps_per_video, dtype=torch.long)
    return EvalEmbeddings(keys=acc.keys, video=cat_video(acc.videos) if acc.videos else empty_v,
                          text=embed_texts(model, acc.captions, tokenize, device, text_batch),
                          text_to_video=torch.repeat_interleave(torch.arange(len(acc.keys)), counts),
                          captions=acc.captions, mc_scores=acc.mc_scores, mc_answers=acc.mc_answers,
                          skipped=acc.skipped)


# ------------------------------------------------------------- gather ranks
def pad_to(t: torch.Tensor, shape: Sequence[int], fill: float | bool) -> torch.Tensor:
    """Pad ``t`` at the end of every dim >= 1 up to ``shape`` (dim 0 untouched)."""
    if list(t.shape[1:]) == list(shape):
        return t
    out = t.new_full((t.shape[0], *shape), fill)
    out[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])] = t
    return out


def gather_padded(t: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """:func:`regionvlp.dist.gather_nograd` for tensors whose trailing sizes may differ per rank
    (region count, token length, an empty rank's placeholder): all are padded to the
    largest trailing shape first."""
    if not dist.gather_active():
        return t
    shapes = dist.gather_objects(list(t.shape[1:]))
    target = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    return dist.gather_nograd(pad_to(t, target, fill))


def embedding_meta(e: EvalEmbeddings) -> dict[str, Any]:
    return {"keys": e.keys, "captions": e.captions,
            "counts": torch.bincount(e.text_to_video, minlength=len(e.keys)).tolist(),
            "mc_scores": [s.tolist() for s in e.mc_scores], "mc_answers": e.mc_answers, "skipped": e.skipped}


def cat_to_largest(parts: Sequence[torch.Tensor], fill: float | bool = 0) -> torch.Tensor:
    """Concatenate along dim 0 after padding every trailing dim to the largest."""
    target = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    return torch.cat([pad_to(p, target, fill) for p in parts])


def combine_embeddings(meta: Sequence[Mapping[str, Any]], v: VideoOutput, t: TextOutput) -> EvalEmbeddings:
    """Rank-ordered parts (metadata + concatenated tensors) → one set sorted by key."""
    keys = [k for m in meta for k in m["keys"]]
    captions = [c for m in meta for c in m["captions"]]
    counts = [c for m in meta for c in m["counts"]]
    skipped: dict[str, int] = {}
    for m in meta:
        add_counts(skipped, m["skipped"])
    mc_pairs = [(torch.tensor(s), a) for m in meta for s, a in zip(m["mc_scores"], m["mc_answers"])]

    # sort videos by key; texts follow their video
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    text_order = [j for i in order for j in range(starts[i], starts[i + 1])]
    new_counts = torch.tensor([counts[i] for i in order], dtype=torch.long)
    return EvalEmbeddings(
        keys=[keys[i] for i in order],
        video=slice_video(v, torch.tensor(order, dtype=torch.long)),
        text=slice_text(t, torch.tensor(text_order, dtype=torch.long)),
        text_to_video=torch.repeat_interleave(torch.arange(len(order)), new_counts),
        captions=[captions[j] for j in text_order],
        mc_scores=[s for s, _ in mc_pairs],
        mc_answers=[a for _, a in mc_pairs],
        skipped=skipped,
    )


def merge_embeddings(parts: Sequence[EvalEmbeddings]) -> EvalEmbeddings:
    """What :func:`gather_embeddings` gives, from the parts in hand (e.g. each rank's
    :func:`embed_local` result computed one after another)."""
    v = VideoOutput(cls=cat_to_largest([p.video.cls for p in parts]),
                    regions=cat_to_largest([p.video.regions for p in parts]),
                    region_mask=cat_to_largest([p.video.region_mask for p in parts], False))
    t = TextOutput(cls=cat_to_largest([p.text.cls for p in parts]),
                   words=cat_to_largest([p.text.words for p in parts]),
                   word_mask=cat_to_largest([p.text.word_mask for p in parts], False))
    return combine_embeddings([embedding_meta(p) for p in parts], v, t)


def gather_embeddings(local: EvalEmbeddings) -> EvalEmbeddings:
    """All ranks' embeddings on every rank, each sample once, videos sorted by key
    (so the result does not depend on the world size or the worker split). Tensors
    travel by padded ``all_gather`` (NCCL-friendly), the padding is cut off again."""
    meta = dist.gather_objects(embedding_meta(local))
    v = VideoOutput(cls=gather_padded(local.video.cls), regions=gather_padded(local.video.regions),
                    region_mask=gather_padded(local.video.region_mask, False))
    t = TextOutput(cls=gather_padded(local.text.cls), words=gather_padded(local.text.words),
                   word_mask=gather_padded(local.text.word_mask, False))
    return combine_embeddings(meta, v, t)


# ------------------------------------------------------------------ similarity
@torch.no_grad()
def similarity_matrix(model: Any, emb: EvalEmbeddings, *, device: torch.device | str = "cpu",
                      video_chunk: int = 256, text_chunk: int = 256) -> torch.Tensor:
    """[Nv, Nt] float32 on CPU via ``model.similarity`` (global + λ·local), computed in
    chunks; under torch.distributed each rank scores a slice of the text columns and the
    slices are gathered."""
    device = torch.device(device)
    nv, nt = emb.video.cls.shape[0], emb.text.cls.shape[0]
    rank, world = dist.group_rank_and_size()
    per = -(-nt // world)
    lo, hi = min(rank * per, nt), min((rank + 1) * per, nt)
    cols = torch.empty(nv, hi - lo)  # [Nv, my texts]
    for ts in range(lo, hi, text_chunk):
        te = min(ts + text_chunk, hi)
        t = slice_text(emb.text, slice(ts, te))
        t = TextOutput(*(x.to(device) for x in (t.cls, t.words, t.word_mask)))
        for vs in range(0, nv, video_chunk):
            v = slice_video(emb.video, slice(vs, vs + video_chunk))
            v = VideoOutput(cls=v.cls.to(device), regions=v.regions.to(device), region_mask=v.region_mask.to(device))
            with get_autocast(model_dtype(model), device.type)():
                cols[vs : vs + video_chunk, ts - lo : te - lo] = model.similarity(v, t).float().cpu()
    if world > 1:
        return dist.gather_nograd(cols.T.contiguous()).T.contiguous()
    return cols
