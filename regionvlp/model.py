"""The dual encoder: a video pathway and the text tower joined by the shared losses.

``build_model(cfg)`` picks the pathway by ``cfg.model.regions`` from the registry
(:mod:`regionvlp.pathways`: ``detector``, the region transformer over frozen-detector
regions; ``learned``, the RegionLearner ViT; ...). ``build_batch_transform(cfg)`` gives
the frozen batch transform a pathway's entry names (the detector's region extractor,
needed when a batch carries frames instead of precomputed regions); it is kept outside
the model so DeepSpeed, the optimizer and checkpoints never see it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp import pathways
from regionvlp.errors import UserError
from regionvlp.data.regions import CLIP_TENSORS, widen_regions
from regionvlp.hub import apply_offline
from regionvlp.losses import AlignmentLoss, region_word_scores
from regionvlp.outputs import TextOutput, VideoOutput
from regionvlp.qa.head import QAHead, predict, qa_loss
from regionvlp.runtime import get_autocast, to_device
from regionvlp.text import TextTower


class DualEncoder(nn.Module):
    """``pathway`` (batch -> VideoOutput) + ``text_tower`` (ids, mask -> TextOutput) + ``loss``."""

    def __init__(self, pathway: nn.Module, text_tower: nn.Module, loss: AlignmentLoss) -> None:
        super().__init__()
        self.pathway = pathway
        self.text_tower = text_tower
        self.loss = loss

    def encode_video(self, batch: dict[str, Any]) -> VideoOutput:
        """L2-normalised video [CLS] [B, D] and regions [B, R, D] (+ mask, aux losses, logs)."""
        out = self.pathway(batch)
        return VideoOutput(
            cls=F.normalize(out.cls, dim=-1),
            regions=F.normalize(out.regions, dim=-1),
            region_mask=out.region_mask.bool(),
            aux_losses=dict(out.aux_losses),
            logs=dict(out.logs),
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        """L2-normalised sentence [CLS] [B, D] and words [B, L, D] (+ word mask)."""
        out = self.text_tower(input_ids, attention_mask)
        return TextOutput(
            cls=F.normalize(out.cls, dim=-1),
            words=F.normalize(out.words, dim=-1),
            word_mask=out.word_mask.bool(),
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training step terms: ``loss`` = global + lambda * local + sum(aux), and each term
        (``global``, ``local``, ``aux_<name>``), ``temperature`` and the pathway's logs."""
        video = self.encode_video(batch)
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        out = self.loss(video, text)
        total = out["loss"]
        for name, value in video.aux_losses.items():
            total = total + value
            out[f"aux_{name}"] = value
        out["loss"] = total
        for name, value in video.logs.items():
            out.setdefault(name, value.detach() if torch.is_tensor(value) else torch.as_tensor(float(value)))
        return out

    @torch.no_grad()
    def similarity(self, video: VideoOutput, text: TextOutput) -> torch.Tensor:
        """Retrieval scores [Nv, Nt], video rows: global [CLS] cosine, plus
        lambda * (S^{v->t} + S^{t->v}) / 2 of the region-word alignment when lambda > 0."""
        with get_autocast("fp32", video.cls.device.type)():  # under any autocast: bf16 scores tie the true pair with others
            sim = video.cls.float() @ text.cls.float().T  # [Nv, Nt]
            lam = self.loss.local_weight
            if lam != 0.0:
                s_vt, s_tv = region_word_scores(
                    video.regions.float(), video.region_mask, text.words.float(), text.word_mask,
                    self.loss.align_temperature, self.loss.chunk_size,
                )
                sim = sim + lam * 0.5 * (s_vt + s_tv)
        return sim


class QAModel(DualEncoder):
    """Open-ended video QA: the dual encoder + :class:`~regionvlp.qa.head.QAHead`. The
    batch's ``input_ids`` / ``attention_mask`` are the questions, ``answer_ids`` [B] the
    answers' class ids (-1 outside the vocabulary). ``answers`` is the vocabulary (class id
    -> text), attached by :func:`regionvlp.checkpoint.load_model` and QA evaluation.
    The retrieval temperature is kept (checkpoints of the same pathway load) but frozen."""

    def __init__(self, pathway: nn.Module, text_tower: nn.Module, loss: AlignmentLoss, head: QAHead) -> None:
        super().__init__(pathway, text_tower, loss)
        self.qa_head = head
        self.answers: list[str] = []
        for p in self.loss.parameters():
            p.requires_grad_(False)

    def qa_logits(self, batch: dict[str, Any], video: VideoOutput | None = None) -> tuple[torch.Tensor, VideoOutput]:
        """Answer logits [B, K] and the video outputs (``video``: already encoded, one row per question)."""
        video = self.encode_video(batch) if video is None else video
        question = self.encode_text(batch["input_ids"], batch["attention_mask"])
        return self.qa_head(video, question), video

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``loss`` = QA cross-entropy + sum(aux); ``qa_ce``, ``qa_acc`` (batch accuracy)."""
        logits, video = self.qa_logits(batch)  # [B, K]
        ce, acc = qa_loss(logits, batch["answer_ids"])
        out = {"qa_ce": ce.detach(), "qa_acc": acc.detach()}
        total = ce
        for name, value in video.aux_losses.items():
            total = total + value
            out[f"aux_{name}"] = value
        out["loss"] = total
        for name, value in video.logs.items():  # 0-d tensors stay on the device (no host sync)
            out.setdefault(name, value.detach() if torch.is_tensor(value) else torch.as_tensor(float(value)))
        return out

    @torch.no_grad()
    def predict_ids(self, batch: dict[str, Any], batch_transform: Any = None) -> torch.Tensor:
        """Class ids [B] among the vocabulary's answers (on the batch's device). Questions
        about the same clip (same ``__key__``, as an eval batch holds one sample per pair)
        share one run of ``batch_transform`` and the video pathway."""
        if not self.answers:
            raise UserError("this QA model has no answer vocabulary; load it with regionvlp.load_model(EXPORT_DIR)")
        keys = list(batch.get("__key__") or range(batch["input_ids"].shape[0]))
        first: dict[Any, int] = {}  # clip key -> its first row, in batch order
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        order = {k: j for j, k in enumerate(first)}
        device = batch["input_ids"].device
        pick = torch.tensor(list(first.values()), dtype=torch.long).to(device)  # [U]
        inverse = torch.tensor([order[k] for k in keys], dtype=torch.long).to(device)  # [B] row -> its clip
        clips = {k: v.index_select(0, pick) for k, v in batch.items() if k in CLIP_KEYS and isinstance(v, torch.Tensor)}
        video = self.encode_video(prepare_batch(clips, batch_transform))  # [U, ...]
        video = VideoOutput(cls=video.cls.index_select(0, inverse), regions=video.regions.index_select(0, inverse),
                            region_mask=video.region_mask.index_select(0, inverse))  # [B, ...]
        logits, _ = self.qa_logits(batch, video)
        return predict(logits, len(self.answers))

    @torch.no_grad()
    def answer(self, batch: dict[str, Any]) -> list[str]:
        """One answer per question of ``batch`` (a loader batch of a QA shard set, or
        ``frames`` [B, T, 3, H, W] + ``question`` [B] strings)."""
        batch = dict(batch)
        device = next(self.parameters()).device
        if "input_ids" not in batch:
            from regionvlp.data import tokenize

            cfg = self.__dict__.get("config")
            max_words = int(cfg.data.max_words) if cfg is not None else 32
            batch["input_ids"], batch["attention_mask"] = tokenize(self.text_tower.tokenizer, list(batch["question"]),
                                                                   max_words)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids = self.predict_ids(batch, self.__dict__.get("batch_transform")).tolist()
        return [self.answers[i] for i in ids]


def build_pathway(cfg) -> nn.Module:
    """The video pathway ``cfg.model.regions`` names (its registry entry's builder,
    imported now)."""
    return pathways.of(cfg).build(cfg)


def build_model(cfg) -> DualEncoder:
    """Pathway (by ``cfg.model.regions``) + text tower + losses, on CPU, fp32; with
    ``qa.enabled`` a :class:`QAModel` (+ the QA head)."""
    apply_offline(cfg)  # run.offline: no pretrained piece downloads
    pathway = build_pathway(cfg)
    text = TextTower(cfg.model.text, int(cfg.model.embed_dim))
    text.check_words(int(cfg.data.max_words))
    if cfg.qa.enabled:
        qa = cfg.qa
        head = QAHead(int(cfg.model.embed_dim), int(qa.num_answers), int(qa.fusion_layers), int(qa.heads),
                      float(qa.dropout))
        return QAModel(pathway, text, AlignmentLoss(cfg.loss), head)
    return DualEncoder(pathway, text, AlignmentLoss(cfg.loss))


def build_batch_transform(cfg) -> Callable[[torch.Tensor], dict[str, torch.Tensor]] | None:
    """The frozen batch transform of ``cfg.model.regions``'s entry (the detector's region
    extractor) or None (a pathway without one, e.g. learned)."""
    return pathways.of(cfg).build_batch_transform(cfg)


CLIP_KEYS = CLIP_TENSORS  # per clip


def prepare_batch(batch: dict[str, Any], transform: Callable | None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The one way a loader batch reaches a model: tensors moved to ``device`` (floating
    ones cast to ``dtype`` when given), then the batch transform (the frozen region
    extractor) when the batch has ``frames`` and no precomputed ``region_feats``: it adds
    ``region_feats`` [B, T, K, F], ``region_boxes`` [B, T, K, 4], ``region_mask`` [B, T, K]
    (and the extractor's labels / scores). Without ``device`` the batch itself is updated
    and returned; with one, a new dict on the device."""
    out = to_device(batch, device, dtype) if device is not None else batch
    widen_regions(out, dtype)  # stored fp16 / int8 region features: dequantised and widened here, on the device
    if transform is None or "region_feats" in out or "frames" not in out:
        return out
    with torch.no_grad():
        regions = transform(out["frames"])
    out.update(to_device(regions, device, dtype) if device is not None else regions)
    return out
