"""Captions out of a sample, and the tokenizer that turns them into ids + mask."""

from __future__ import annotations

import functools
import random
from typing import Any, Optional, Sequence

import torch

from regionvlp.errors import UserError


def sample_captions(txt: Optional[bytes | str], meta: dict[str, Any]) -> list[str]:
    """Every caption a sample carries, ``txt`` first, then ``json["caption"]`` (a string
    or a list) and ``json["captions"]``; blanks and duplicates dropped."""
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str):
            value = " ".join(value.split())
            if value and value not in found:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, (str, bytes)):
                    add(v)

    add(txt)
    add(meta.get("caption"))
    add(meta.get("captions"))
    return found


def pick_caption(captions: Sequence[str], *, training: bool, rng: Optional[random.Random] = None) -> str:
    """One caption: a random one in training, the first in eval."""
    if training and len(captions) > 1:
        return (rng or random).choice(list(captions))
    return captions[0]


def tokenizer_name(cfg) -> str:
    """The tokenizer a config reads captions with: ``data.tokenizer``, else ``model.text.name``."""
    return str(cfg.data.tokenizer or cfg.model.text.name)


def load_tokenizer(name: str):
    """A transformers tokenizer from a hub name or a local folder (no download when
    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set). Cached per name, so a loader
    rebuilt every epoch does not reload it."""
    return _load_tokenizer(str(name))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except Exception as err:  # OSError / ValueError / hub errors
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"cannot load tokenizer '{name}': {detail} (set data.tokenizer or model.text.name to a local folder "
            "or a hub name that is cached)"
        ) from None


def tokenize(tokenizer, captions: Sequence[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions → ``input_ids`` long [B, L], ``attention_mask`` long [B, L] with L = max_words
    (special tokens included, truncated and padded to exactly L)."""
    enc = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_words,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"].long()  # [B, L]
    attention_mask = enc["attention_mask"].long()  # [B, L]
    return input_ids, attention_mask
