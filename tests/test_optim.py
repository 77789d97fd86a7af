"""Weight decay as the modules declare it, and the shared warmup-cosine schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regionvlp.config import load_config
from regionvlp.model import build_model
from regionvlp.optim import WarmupCosine, lr_lambda, no_decay_names

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


@pytest.mark.parametrize("pathway", ["detector", "learned"])
def test_embeddings_and_tokens_never_decay_matrices_do(pathway):
    torch.manual_seed(0)
    model = build_model(load_config(TINY / f"{pathway}.yaml"))
    skip = no_decay_names(model)
    params = dict(model.named_parameters())
    tokens = [n for n in params if any(k in n for k in ("pos_embed", "cls_token", "time_embed"))]
    assert tokens, "the tiny model has position/time embeddings or a [CLS] token"
    assert set(tokens) <= skip, sorted(set(tokens) - skip)
    assert all(n in skip for n, p in params.items() if p.ndim <= 1)  # biases, norms, temperature
    linears = [f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and not set(linears) & skip


def test_fit_and_train_share_the_schedule():
    sched = WarmupCosine(warmup_steps=2, max_steps=10, min_lr_ratio=0.05)
    assert [round(sched(s), 6) for s in (0, 1)] == [0.5, 1.0]
    assert sched(10) == pytest.approx(0.05) and sched(6) == pytest.approx(lr_lambda(6, 2, 10, 0.05))
