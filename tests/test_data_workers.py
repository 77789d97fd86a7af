"""`data.num_workers: auto` (cores per local rank, minus one) and the loader it builds."""

from __future__ import annotations

import os

import pytest

from data_shards import clip_shards
from regionvlp.config import ConfigError, load_config
from regionvlp.data import build_loader
from regionvlp.data.loader import resolve_num_workers
from regionvlp.data.text import load_tokenizer


def test_auto_is_cores_per_local_rank_minus_one(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert resolve_num_workers("auto") == 15
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the deepspeed launcher's name
    assert resolve_num_workers("auto") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's
    assert resolve_num_workers("auto") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    assert resolve_num_workers("auto") == 3  # bound by the launcher to 4 cores: those are its share
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert resolve_num_workers("auto") == 0  # one core: decode in the training process
    assert resolve_num_workers(3) == 3


def test_num_workers_config_values():
    assert load_config(None, ["data.num_workers=auto"]).data.num_workers == "auto"
    assert load_config(None, ["data.num_workers=0"]).data.num_workers == 0
    for bad in ("many", "-1", "1.5"):
        with pytest.raises(ConfigError, match="data.num_workers"):
            load_config(None, [f"data.num_workers={bad}"])


def test_loader_uses_the_resolved_worker_count(tmp_path, monkeypatch, minilm_dir):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    shards = clip_shards(tmp_path, 2, 2)
    urls = ",".join(f"'{p}'" for p in shards)
    cfg = load_config(None, [f"data.train.urls=[{urls}]", "data.num_workers=auto", "data.size=16",
                             "data.num_frames=2", "data.batch_size=2", "data.max_words=8", "run.device=cpu"])
    loader = build_loader(cfg, "train", training=False, tokenizer=load_tokenizer(str(minilm_dir)))
    torch_loader = loader.pipeline[0]  # wds.WebLoader wraps one torch DataLoader
    assert torch_loader.num_workers == 2  # 3 cores, 1 rank
    assert torch_loader.pin_memory is False and torch_loader.prefetch_factor == 2  # a CPU run: no pinning
    batches = list(loader)
    assert sum(len(b["__key__"]) for b in batches) == 4
