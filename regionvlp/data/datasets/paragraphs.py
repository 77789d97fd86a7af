"""Paragraph-to-video retrieval (the protocol ClipBERT, Frozen and CLIP4Clip report on
DiDeMo and ActivityNet Captions): a clip's sentences joined, in time order, into one
caption; the clip is the whole video."""

from __future__ import annotations

from typing import Any, Sequence

from regionvlp.data.datasets.base import caption_list


def paragraph(sentences: Sequence[Any], starts: Sequence[Any] | None = None) -> str:
    """The sentences (whitespace-normalised, empty ones dropped) joined by one space,
    ordered by ``starts`` when given (stable: equal starts keep file order)."""
    items = list(sentences)
    if starts is not None and len(starts) == len(items):
        order = sorted(range(len(items)), key=lambda i: float(starts[i]) if _is_number(starts[i]) else 0.0)
        items = [items[i] for i in order]
    texts = [c for s in items for c in caption_list(s if isinstance(s, str) else "")]
    return " ".join(texts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
