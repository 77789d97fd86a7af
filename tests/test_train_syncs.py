"""Host syncs per optimizer step, counted with torch.profiler in a steady-state CPU step
of the real loop pieces (setup_run, BatchFeed, train_step, end_step, after_step) on the
tiny learned config: at most one outside the model's own forward, on non-logging steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regionvlp import dist
from regionvlp.config import load_config
from regionvlp.train.guards import StopFlag
from regionvlp.train import loop as L
from regionvlp.train.data import BatchFeed

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "learned.yaml"
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal",
            "aten::unique", "aten::masked_select"}
# AdamW keeps its step counters on the CPU (a read there is no device sync); the model's
# own forward (pathway and text tower) is the pathways' business, counted apart
EXCLUDED_RANGES = ("Optimizer.step#", "model.forward")


def _inside(event, prefixes) -> bool:
    while event is not None:
        if event.name.startswith(prefixes):
            return True
        event = event.cpu_parent
    return False


def _step(run, feed, meter, stop) -> None:
    verdict = L.train_step(run, feed, meter, stop)
    assert verdict.apply
    L.end_step(run, meter)
    L.after_step(run, meter, feed, stop, verdict.stop, None)


def _count(run, feed, meter, stop) -> tuple[int, int]:
    """(syncs outside the excluded ranges, syncs inside the model's forward) of one step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(run, feed, meter, stop)
    syncs = [e for e in prof.events() if e.name in SYNC_OPS and not (e.cpu_parent and e.cpu_parent.name in SYNC_OPS)]
    ours = [e for e in syncs if not _inside(e, EXCLUDED_RANGES)]
    return len(ours), sum(_inside(e, ("model.forward",)) for e in syncs)


def test_one_host_sync_per_step_outside_logging_steps(tmp_path):
    from regionvlp.data.synth import synth

    synth(str(tmp_path / "s"), videos=8, seed=1, val_videos=1, size=64, frames=2, fps=8, shard_size=8, workers=1,
          compositional=False)
    cfg = load_config(CONFIG, ["data.train.urls=[" + str(tmp_path / "s/train/000000.tar") + "]", "data.val.urls=[]",
                               "data.batch_size=2", "train.log_every=4", "train.ckpt_every=100",
                               "train.max_steps=100", f"run.out_dir={tmp_path}/run"])
    with dist.process_group():
        run = L.setup_run(cfg)
        forward = run.engine.module.forward

        def timed_forward(*args, **kwargs):
            with torch.profiler.record_function("model.forward"):
                return forward(*args, **kwargs)

        run.engine.module.forward = timed_forward
        feed, meter = BatchFeed(run.cfg, run.state, run.device), L.Meter()
        feed.follow_curriculum()
        with StopFlag() as stop:
            for _ in range(2):  # warm up: the loader, the first agreed batch
                _step(run, feed, meter, stop)
            ours, model = _count(run, feed, meter, stop)  # step 3: not a logging step (train.log_every=4)
            assert ours == 1, f"{ours} host syncs in a steady-state step outside the model (budget: 1)"
        run.metrics.close()
    print(f"syncs per step: loop {ours}, inside the model's forward {model}")
