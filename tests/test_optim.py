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


def test_qa_head_trains_at_its_own_lr():
    from regionvlp.train.engine import build_optimizer

    torch.manual_seed(0)
    cfg = load_config(TINY / "qa_detector.yaml", ["optim.lr=3e-5", "optim.head_lr_mult=3.3333333333333335",
                                                  "optim.text_lr_mult=0.5", "optim.warmup_steps=0"])
    model = build_model(cfg)
    opt, _ = build_optimizer(model, cfg)
    by_group = {g["group"]: g for g in opt.param_groups}
    head = [n for g in by_group.values() if g["group"].startswith("head_") for n in g["names"]]
    assert sorted(head) == sorted(n for n, p in model.named_parameters() if n.startswith("qa_head.") and p.requires_grad)
    assert by_group["head_decay"]["lr"] == pytest.approx(1e-4) and by_group["head_no_decay"]["lr"] == pytest.approx(1e-4)
    assert by_group["video_decay"]["lr"] == pytest.approx(3e-5) and by_group["text_decay"]["lr"] == pytest.approx(1.5e-5)
    assert not any(n.startswith("qa_head.") for g in by_group.values() if not g["group"].startswith("head_")
                   for n in g["names"])
