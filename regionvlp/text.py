"""The text tower: a ``transformers`` encoder whose every token is projected to D.

``TextTower(cfg.model.text, embed_dim)`` loads ``AutoModel`` + ``AutoTokenizer`` by hub
name or local folder. ``forward(input_ids, attention_mask)`` gives the sentence [CLS]
``[B, D]``, the word tokens ``[B, L, D]`` and the word mask ``[B, L]``.

Words: every real (attention-mask) token except the structural special tokens
([CLS]/[SEP]/[PAD]/BOS/EOS), so those never take part in the region-word alignment;
each word-piece token counts as a word, and so does [UNK] (it stands for one). The [CLS] token is the sentence embedding.

Offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) nothing is fetched; a name with
no local copy ends in one :class:`~regionvlp.errors.UserError` that says how to point
``model.text.name`` at a folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from regionvlp.errors import ConfigError, UserError
from regionvlp.outputs import TextOutput

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the Hugging Face offline switches are set (nothing may be fetched)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _resolve(name: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if name.startswith(("/", "./", "../", "~")):
        raise UserError(f"model.text.name: folder {name} does not exist; point it at a folder with config.json, "
                        "the weights and the tokenizer files (as written by save_pretrained)")
    return name, hub_offline()


def _load_error(name: str, err: Exception) -> UserError:
    detail = " ".join(str(err).split())[:300]
    where = "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set), no usable local copy" if hub_offline() else \
        "not found locally nor downloadable"
    return UserError(
        f"could not load text model '{name}' ({where}: {detail}). Set model.text.name "
        "to a local folder holding config.json, the weights and the tokenizer files (e.g. "
        "model.text.name=/path/to/distilbert-base-uncased, saved with save_pretrained), or download the model "
        "into the Hugging Face cache first while online"
    )


def load_text_model(name: str):
    """``(AutoModel, AutoTokenizer)`` by hub name or folder, in fp32, never touching the
    network when offline or when ``name`` is a folder."""
    from transformers import AutoModel, AutoTokenizer

    source, local_only = _resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModel.from_pretrained(source, local_files_only=local_only, dtype=torch.float32)
    except (OSError, ValueError) as err:  # missing files / no cache / not a model folder
        raise _load_error(name, err) from None
    return model, tokenizer


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (BERT ``encoder.layer``, DistilBERT
    ``transformer.layer``, ...): the longest ModuleList of the encoder."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"text model {type(model).__name__}: found no transformer layers to freeze")
    return max(lists, key=len)


class TextTower(nn.Module):
    """transformers encoder + one linear projection of every token to ``embed_dim``."""

    def __init__(self, cfg, embed_dim: int) -> None:
        super().__init__()
        self.name = str(cfg.name)
        self.encoder, self.tokenizer = load_text_model(self.name)
        hidden = self.encoder.config.hidden_size if hasattr(self.encoder.config, "hidden_size") else self.encoder.config.dim
        self.proj = nn.Linear(hidden, embed_dim)
        tok = self.tokenizer  # structural tokens only: [UNK] stands for a real word
        special = sorted({i for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.bos_token_id,
                                      tok.eos_token_id) if i is not None})
        self.register_buffer("special_ids", torch.tensor(special, dtype=torch.long), persistent=False)
        self._freeze(bool(cfg.freeze_embeddings), int(cfg.freeze_layers))

    def check_words(self, max_words: int) -> None:
        """Refuse ``data.max_words`` beyond the text model's positions (the first batch
        would fail in the embedding lookup)."""
        positions = getattr(self.encoder.config, "max_position_embeddings", None)
        if isinstance(positions, int) and max_words > positions:
            raise ConfigError(f"data.max_words={max_words}, but the text model '{self.name[:80]}' has "
                              f"{positions} positions; set data.max_words <= {positions}")

    def _freeze(self, embeddings: bool, layers: int) -> None:
        if embeddings:
            emb = getattr(self.encoder, "embeddings", None)  # word + position (+ type) embeddings
            if emb is None:
                emb = self.encoder.get_input_embeddings()
            emb.requires_grad_(False)
        if layers:
            stack = _transformer_layers(self.encoder)
            if layers > len(stack) or layers < 0:
                raise UserError(f"model.text.freeze_layers={layers}, but '{self.name}' has {len(stack)} layers")
            for block in stack[:layers]:
                block.requires_grad_(False)

    def word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: real tokens that are not [CLS] / [SEP] / [PAD] / BOS / EOS."""
        return attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        tokens = self.proj(hidden)  # [B, L, D]
        return TextOutput(cls=tokens[:, 0], words=tokens, word_mask=self.word_mask(input_ids, attention_mask))
