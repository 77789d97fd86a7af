"""QA evaluation: answer every question of a val/test shard set, report accuracy.

Every rank answers the QA samples its loader gives it (the eval loader visits every clip
once across ranks × workers and the QA stage turns a clip into one sample per pair), the
records ``(shard URL, key, pair index, question, answer, prediction)`` are gathered,
and rank 0's metrics come from :func:`regionvlp.qa.metrics.qa_metrics`. A question is
identified by its shard URL, key and pair index: ``shards write`` / ``data synth`` keys
are row numbers that repeat across shard sets, so the same key in two shards is two
questions (counted in ``qa_key_collisions`` with a warning, all scored). A pair seen
twice from the same shard would be a loader bug: counted in ``qa_duplicates``, scored once.

Library use::

    from regionvlp.qa.evaluate import evaluate_qa
    metrics = evaluate_qa(model, cfg, split="val", batch_transform=None, device="cpu")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from regionvlp import dist
from regionvlp.data import build_loader
from regionvlp.data.qa import load_vocab, vocab_path
from regionvlp.errors import UserError
from regionvlp.model import prepare_batch
from regionvlp.qa.metrics import qa_metrics


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QARecord:
    url: str  # the shard it came from
    key: str
    qa_index: int
    question: str
    answer: str
    prediction: str
    qtype: str = ""  # the sample's question type (a stored category_id, else the first-word rule)


def unwrap(model: Any) -> Any:
    """The QA model inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "qa_head"):
        model = model.module
    if not hasattr(model, "qa_head"):
        raise UserError("this checkpoint is not a QA model (qa.enabled was false when it was trained); "
                        "train one with a configs/downstream/*_qa.yaml config")
    return model


def answer_local(model: Any, batches: Iterable[Mapping[str, Any]], *, batch_transform: Any = None,
                 device: torch.device, limit: int | None = None) -> tuple[list[QARecord], dict[str, int]]:
    """This rank's records and data skip counts."""
    records: list[QARecord] = []
    skipped: dict[str, int] = {}
    for n, batch in enumerate(batches):
        for reason, count in (batch.get("skipped") or {}).items():
            skipped[str(reason)] = skipped.get(str(reason), 0) + int(count)
        if limit is not None and n >= limit:
            continue  # drain the skip counts only
        b = prepare_batch(batch, None, device)  # on the device; the extractor runs once per clip in predict_ids
        ids = model.predict_ids(b, batch_transform).cpu().tolist()  # one transfer per batch
        types = batch.get("question_type") or [""] * len(ids)
        urls = batch.get("__url__") or [""] * len(ids)
        records += [QARecord(str(u), k, int(i), q, a, model.answers[p], t) for u, k, i, q, a, p, t in
                    zip(urls, batch["__key__"], batch["qa_index"], batch["question"], batch["answer"], ids, types)]
    return records, skipped


def merge_records(parts: Iterable[list[QARecord]]) -> tuple[list[QARecord], int, int]:
    """All ranks' records in (url, key, pair) order, each pair once; how many repeats were
    dropped, and how many (key, pair) ids occur in more than one shard (all kept)."""
    seen: dict[tuple[str, str, int], QARecord] = {}
    total = 0
    for part in parts:
        for r in part:
            total += 1
            seen.setdefault((r.url, r.key, r.qa_index), r)
    ordered = [seen[k] for k in sorted(seen)]
    shards_of: dict[tuple[str, int], int] = {}
    for url, key, index in seen:
        shards_of[(key, index)] = shards_of.get((key, index), 0) + 1
    collisions = sum(1 for n in shards_of.values() if n > 1)
    if collisions:
        example = next(k for k, n in shards_of.items() if n > 1)
        log.warning("QA eval: %d question ids (key, pair) occur in more than one shard (e.g. key %r pair %d); "
                    "each is scored as its own question", collisions, example[0][:80], example[1])
    return ordered, total - len(ordered), collisions


def evaluate_qa(model: Any, cfg: Any, split: str = "val", batch_transform: Any = None,
                device: torch.device | str | None = None, *, loader: Iterable[Mapping[str, Any]] | None = None,
                limit: int | None = None) -> dict[str, Any]:
    """QA metrics of ``model`` (a :class:`~regionvlp.model.QAModel` with its ``answers``)
    on ``cfg.data.<split>``; call on every rank (all return the same dict)."""
    model = unwrap(model)
    if not model.answers:
        raise UserError("the QA model has no answer vocabulary attached (model.answers); load it with "
                        "regionvlp.load_model or from a run directory")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if loader is None:
        if not list(getattr(cfg.data, split).urls):
            raise UserError(f"data.{split}.urls is empty: set it to the QA eval shards (data.{split}.urls=[...])")
        loader = build_loader(cfg, split, training=False)
    was_training = model.training
    model.eval()
    try:
        local, skipped = answer_local(model, loader, batch_transform=batch_transform, device=device, limit=limit)
    finally:
        model.train(was_training)
    gathered = dist.gather_objects((local, skipped))
    records, duplicates, collisions = merge_records(part for part, _ in gathered)
    total_skipped: dict[str, int] = {}
    for _, part in gathered:
        for k, v in part.items():
            total_skipped[k] = total_skipped.get(k, 0) + v
    out = qa_metrics([r.prediction for r in records], [r.answer for r in records],
                     [r.question for r in records], model.answers[0], types=[r.qtype for r in records])
    out.update(qa_duplicates=duplicates, qa_key_collisions=collisions,
               num_videos=len({(r.url, r.key) for r in records}), skipped=total_skipped,
               qa_vocab_size=len(model.answers), world_size=dist.world_size())
    return out


def run_vocab(cfg: Any) -> list[str]:
    """The answers of the vocabulary ``cfg`` trains with (``qa.vocab`` or the run's file)."""
    return load_vocab(vocab_path(cfg)).answers
