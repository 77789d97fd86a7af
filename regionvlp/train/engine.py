"""DeepSpeed engine: the ``deepspeed:`` section completed from the run config, and
``deepspeed.initialize`` with the trainer's optimizer and schedule.

Everything here takes a plain ``nn.Module`` and the run config, so it is tested with
toy modules; :mod:`regionvlp.train.loop` wires it to the dual encoder and the data. The
optimizer groups and schedule live in :mod:`.optimizer`, checkpoints in
:mod:`.checkpointer`, the stop flag and non-finite guard in :mod:`.guards`.

- :func:`deepspeed_config`: the ``deepspeed:`` section completed from the run config
  (micro batch, accumulation, clipping set explicitly).
- :func:`initialize`: ``deepspeed.initialize`` with a torch AdamW and a LambdaLR, both of
  which DeepSpeed steps and checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regionvlp import dist
from regionvlp.config import to_container
from regionvlp.ds_schema import check_deepspeed
from regionvlp.errors import UserError
from regionvlp.train.optimizer import build_optimizer


def deepspeed_config(cfg: Any) -> dict[str, Any]:
    """The config's ``deepspeed:`` section completed with the keys the run config owns.

    ``train_micro_batch_size_per_gpu`` = data.batch_size, ``gradient_accumulation_steps``
    = train.grad_accum and ``gradient_clipping`` = optim.grad_clip are always set; the
    section may repeat them only with the same value. The section itself is checked by
    :func:`regionvlp.ds_schema.check_deepspeed` (known keys only, paths inside run.out_dir).
    """
    ds = dict(to_container(cfg.deepspeed)) if cfg.deepspeed else {}
    check_deepspeed(ds, str(cfg.run.out_dir))  # again: a config changed in code since load_config
    owned = {"train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
             "gradient_accumulation_steps": int(cfg.train.grad_accum),
             "gradient_clipping": float(cfg.optim.grad_clip)}
    where = {"train_micro_batch_size_per_gpu": "data.batch_size",
             "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.grad_clip"}
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise UserError(f"deepspeed.{key}={ds[key]} disagrees with {where[key]}={value}; "
                            f"set it through {where[key]} and drop it from the deepspeed section")
        ds[key] = value
    stage = int(ds.setdefault("zero_optimization", {"stage": 0}).get("stage", 0))
    if stage > 0:
        ds["zero_allow_untested_optimizer"] = True  # torch AdamW is fine with ZeRO 1-3
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise UserError("deepspeed.fp16.enabled needs a GPU; on CPU use bf16.enabled=true or fp32")
    ds.setdefault("steps_per_print", 10**9)  # our own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def engine_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def initialize(model: nn.Module, cfg: Any) -> tuple[Any, torch.optim.Optimizer, Any, dict[str, Any]]:
    """``deepspeed.initialize`` on the trainable parameters with AdamW + warmup/cosine.

    Returns ``(engine, optimizer, scheduler, ds_config)``; DeepSpeed steps the scheduler
    at each accumulation boundary and stores both in its checkpoints.
    """
    dist.init_distributed()
    import deepspeed  # heavy; imported by the runs that train, after the accelerator env is set

    ds = deepspeed_config(cfg)
    opt, sched = build_optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                           config=ds, dist_init_required=False)
    return engine, optimizer, scheduler, ds

