"""The QA head: question tokens cross-attend to the video's region tokens and [CLS].

    question tokens [B, L, D] ─ proj ─┐
                                      ├─ fusion_layers × (self-attn over the question,
    video [CLS] + regions [B, 1+R, D] ─ proj ─┘   cross-attn to the video, MLP)
         └─ the question's [CLS] position [B, H] ─ MLP ─ logits over the K answers [B, K]

Inputs are the dual encoder's L2-normalised outputs; padded regions and words are
masked out (the video [CLS] is always a real key, so no attention row is empty).
Every shape is fixed by the batch: no data-dependent indexing, no host sync.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from regionvlp.outputs import TextOutput, VideoOutput


class QAHead(nn.Module):
    """``forward(video, question) -> logits [B, K]``."""

    def __init__(self, embed_dim: int, num_answers: int, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.video_proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.question_proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.type_embed = nn.Parameter(torch.zeros(2, embed_dim))  # 0: video [CLS], 1: region
        layer = nn.TransformerDecoderLayer(embed_dim, heads, dim_feedforward=4 * embed_dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.fusion = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(embed_dim))
        self.classifier = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(2 * embed_dim, num_answers))
        nn.init.normal_(self.type_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The type embedding does not decay (collected by :func:`regionvlp.optim.no_decay_names`)."""
        return {"type_embed"}

    def video_tokens(self, video: VideoOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [B, 1+R, D] and their padding mask [B, 1+R] (True = padded)."""
        tokens = torch.cat([video.cls[:, None], video.regions], dim=1)  # [B, 1+R, D]
        tokens = self.video_proj(tokens.to(self.type_embed.dtype))
        kinds = torch.ones(tokens.shape[1], dtype=torch.long, device=tokens.device)
        kinds[0] = 0
        tokens = tokens + self.type_embed[kinds]  # [B, 1+R, D]
        real = torch.cat([torch.ones_like(video.region_mask[:, :1]), video.region_mask], dim=1)  # [B, 1+R]
        return tokens, ~real.bool()

    def forward(self, video: VideoOutput, question: TextOutput) -> torch.Tensor:
        memory, memory_pad = self.video_tokens(video)  # [B, 1+R, D], [B, 1+R]
        queries = self.question_proj(question.words.to(self.type_embed.dtype))  # [B, L, D]
        real = question.word_mask.bool().clone()  # [B, L]
        real[:, 0] = True  # the [CLS] position pools the question
        fused = self.fusion(queries, memory, tgt_key_padding_mask=~real, memory_key_padding_mask=memory_pad)
        return self.classifier(fused[:, 0])  # [B, K]


def qa_loss(logits: torch.Tensor, answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over in-vocabulary answers (``-1`` ignored) and the accuracy,
    both 0-d device tensors (no host sync; an all-ignored batch gives loss 0).

    logits: [B, K]; answer_ids: [B] long."""
    valid = answer_ids >= 0  # [B]
    target = answer_ids.clamp(min=0)
    ce = F.cross_entropy(logits.float(), target, reduction="none")  # [B]
    count = valid.sum().clamp(min=1)
    loss = (ce * valid).sum() / count
    correct = (logits.argmax(-1) == answer_ids) & valid
    return loss, correct.sum() / count


def predict(logits: torch.Tensor, num_answers: int) -> torch.Tensor:
    """Class ids [B] over the first ``num_answers`` logits (a vocabulary may be shorter
    than the classifier when training saw fewer distinct answers than ``qa.num_answers``)."""
    return logits[:, :num_answers].argmax(-1)
