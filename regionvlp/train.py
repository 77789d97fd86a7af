"""The training loop: one loop for both pathways, single process or under a launcher.

Run it as ``regionvlp train CONFIG [k=v …]``, ``deepspeed --num_gpus N --module
regionvlp.train CONFIG [k=v …]`` or ``torchrun --nproc_per_node N -m regionvlp.train
CONFIG [k=v …]``. Library use: ``regionvlp.train.train(cfg) -> dict``.

A *step* is one optimizer step (``train.grad_accum`` micro-batches per rank). Every rank
runs the same number of steps: ranks agree each micro-batch whether all of them still
have data, and all roll over to the next epoch together. Checkpoints hold the step,
epoch, position in the epoch (the number of micro-batches consumed, replayed without
training on resume), every rank's RNG state, the config and recent losses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from regionvlp.engine import setup_accelerator_env

setup_accelerator_env()  # before anything imports deepspeed

import torch  # noqa: E402

from regionvlp import engine as E  # noqa: E402
from regionvlp.errors import UserError  # noqa: E402

log = logging.getLogger("regionvlp.train")


# ------------------------------------------------------------------------ state
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed from this epoch's loader (this rank)
    samples: int = 0  # clips trained on, all ranks
    nonfinite: int = 0  # micro-batches skipped for a non-finite loss
    skipped: dict[str, int] = field(default_factory=dict)  # data skips by reason, this rank
    recent_losses: list[float] = field(default_factory=list)  # last 5 step losses
    first_losses: list[float] = field(default_factory=list)  # first 5 step losses
    last_val: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0  # training seconds, summed over resumed segments


def frames_at(step: int, curriculum: Any, default: int) -> int:
    """T at ``step`` from ``[[start_step, T], ...]`` (the last entry that has started)."""
    frames = default
    for start, t in sorted((int(s), int(t)) for s, t in curriculum or []):
        if step >= start:
            frames = t
    return frames


def steps_per_epoch(cfg: Any, world: int) -> int | None:
    """Micro-batches per rank per epoch from samples_per_epoch / sizes.json (None: unknown)."""
    from regionvlp.data import epoch_size

    n = epoch_size(cfg.data.train, allow_pipe=bool(cfg.data.allow_pipe))
    if not n:
        return None
    per = n // (int(cfg.data.batch_size) * world)
    if per < 1:
        raise UserError(f"an epoch of {n} samples is smaller than one batch on every rank "
                        f"(data.batch_size={cfg.data.batch_size} x {world} ranks); lower data.batch_size")
    return per


def _add_counts(total: dict[str, int], more: dict[str, int] | None) -> None:
    for k, v in (more or {}).items():
        total[k] = total.get(k, 0) + int(v)


def _all_reduce_counts(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(counts)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    out: dict[str, int] = {}
    for c in gathered:
        _add_counts(out, c)
    return out


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; floating tensors (region features/boxes) to the engine dtype."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        out[k] = v
    return out


def autocast_for(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------- run
class MetricsLog:
    """Rank 0: metrics.jsonl + TensorBoard in the run dir. Other ranks: no-op."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # the loss curve continues from the checkpoint: drop what came after it
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except Exception as err:  # tensorboard missing/broken: JSONL still written
            log.warning("tensorboard disabled: %s", err)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _save_extractor(extractor: Any, run_dir: Path) -> None:
    """A frozen detector with random weights (``weights: none``) cannot be named, so its
    weights are saved once beside the run for export/eval to reuse."""
    from safetensors.torch import save_file

    if str(getattr(extractor, "weights", "")).lower() != "none":
        return
    path = run_dir / "extractor.safetensors"
    if not path.exists():
        state = {k: v.detach().cpu().contiguous() for k, v in extractor.detector.state_dict().items()}
        save_file(state, str(path))


def load_extractor_weights(extractor: Any, run_dir: Path) -> None:
    path = Path(run_dir) / "extractor.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        extractor.detector.load_state_dict(load_file(str(path)))


def _val_loss(engine: Any, cfg: Any, transform: Callable | None, device: torch.device, dtype: torch.dtype,
              num_frames: int, fallback: dict[str, Any]) -> dict[str, float]:
    """Mean loss terms over data.val; every rank runs the same number of forwards (a rank
    out of data repeats its last batch, or ``fallback`` if it had none, uncounted) so
    ZeRO-3 gathers never hang."""
    from regionvlp.data import build_loader

    loader = build_loader(cfg, "val", training=False, num_frames=num_frames)
    it = iter(loader)
    sums: dict[str, float] = {}
    count = 0
    last = fallback
    engine.eval()
    with torch.no_grad():
        while True:
            batch = next(it, None)
            if E.any_rank(batch is not None, device) is False:
                break
            real = batch is not None
            batch = batch if real else last
            last = batch
            b = to_device(batch, device, dtype)
            if transform is not None and "frames" in b and "region_feats" not in b:
                b = to_device(transform(b), device, dtype)
            with autocast_for(device, dtype):
                out = engine(b)
            if real:
                n = len(batch["__key__"])
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.float()) * n
                count += n
    engine.train()
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        keys = _agree_keys(keys)
        t = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(count)], dtype=torch.float64)
        dist.all_reduce(t)
    total = max(1.0, float(t[-1]))
    return {f"val_{k}": float(v) / total for k, v in zip(keys, t[:-1].tolist())} | {"val_samples": int(t[-1])}


def _agree_keys(keys: list[str]) -> list[str]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return sorted(set().union(*map(set, gathered)))


def validate(engine: Any, cfg: Any, transform: Callable | None, device: torch.device, dtype: torch.dtype,
             num_frames: int, zero_stage: int, fallback: dict[str, Any]) -> dict[str, float]:
    """Val loss, plus retrieval R@1/R@5 from :mod:`regionvlp.evaluate` (not under ZeRO-3,
    where ranks' differing val batch counts would stall the parameter gathers)."""
    if not list(cfg.data.val.urls):
        return {}
    out = _val_loss(engine, cfg, transform, device, dtype, num_frames, fallback)
    if zero_stage < 3 and cfg.qa.enabled:
        from regionvlp.qa.evaluate import evaluate_qa, run_vocab

        engine.module.answers = run_vocab(cfg)
        with autocast_for(device, dtype):
            m = evaluate_qa(engine.module, cfg, "val", batch_transform=transform, device=device)
        out.update({f"val_{k}": float(v) for k, v in m.items() if k in ("qa_accuracy", "qa_majority_accuracy")})
        engine.train()
    elif zero_stage < 3:
        try:
            from regionvlp.evaluate import evaluate_model
        except ImportError:  # pragma: no cover - evaluate ships with the package
            return out
        with autocast_for(device, dtype):
            m = evaluate_model(engine.module, cfg, "val", batch_transform=transform, device=device, progress=False)
        out.update({f"val_{k}": float(v) for k, v in m.items()
                    if k in ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5", "t2v_medr")})
        engine.train()
    return out


def train(cfg: Any, *, on_end: Callable[[Any, Any], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (or until SIGTERM/SIGINT); returns the summary.

    Keys: ``steps``, ``final_loss`` (mean of the last ≤5 step losses), ``initial_loss``
    (mean of the first ≤5), ``checkpoint_dir``, ``skipped`` (data skips by reason, all
    ranks), ``nonfinite_skipped``, ``clips_per_s``, ``data_wait_frac``, ``epochs``,
    ``stopped`` (max_steps | SIGTERM | SIGINT), ``resumed_from``, ``val`` and ``run_dir``.
    ``on_end(engine, extractor)`` is called before returning (library use: inspect the
    trained model in the same process).
    """
    with E.process_group():
        return _train(cfg, on_end=on_end)


def _train(cfg: Any, *, on_end: Callable[[Any, Any], None] | None) -> dict[str, Any]:
    from regionvlp.config import check_out_dir, to_yaml
    from regionvlp.data import build_loader
    from regionvlp.model import build_batch_transform, build_model
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    device = E.train_device()
    run_dir = Path(cfg.run.out_dir)
    if is_main:
        check_out_dir(run_dir)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if cfg.qa.enabled:  # QA: the answer vocabulary beside the config, before any loader reads it
            from regionvlp.qa.vocab import prepare_run_vocab

            prepare_run_vocab(cfg, run_dir)
    dist.barrier()

    torch.manual_seed(int(cfg.seed))  # same init on every rank
    transform_obj = build_batch_transform(cfg)  # frozen extractor, never an engine child
    model = build_model(cfg)
    transform: Callable | None = None
    if transform_obj is not None:
        load_extractor_weights(transform_obj, run_dir)  # the run's own random detector, on resume
        if hasattr(transform_obj, "to"):
            transform_obj.to(device)
        if is_main and hasattr(transform_obj, "detector"):
            _save_extractor(transform_obj, run_dir)
        from regionvlp.model import prepare_batch

        transform = lambda b: prepare_batch(dict(b), transform_obj)  # noqa: E731

    where = E.resolve_resume(str(cfg.train.resume), E.Checkpointer(run_dir, 1).dir)
    if where is None and str(cfg.train.init_from) not in ("", "none"):
        init_weights(model, Path(str(cfg.train.init_from)))
    eng, optimizer, scheduler, ds = E.initialize(model, cfg)
    dtype = E.engine_dtype(ds)
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    ckpt = E.Checkpointer(run_dir, int(cfg.train.keep_last))
    state = TrainState()
    guard = E.NonFiniteGuard(int(cfg.train.max_nonfinite))

    if where is None and E.list_tags(ckpt.dir):
        raise UserError(f"{ckpt.dir} already holds checkpoints of another run; continue it with "
                        "train.resume=auto, or pick a new run.out_dir")
    resumed_from = None
    pending_rng: dict[str, Any] | None = None
    if where is not None:
        client = ckpt.load(eng, where)
        saved = client.get("train_state")
        if saved is None:
            raise UserError(f"checkpoint {where[0]}/{where[1]} has no regionvlp train state; "
                            "it was not written by regionvlp train")
        state = TrainState(**saved)
        rng_file = Path(where[0]) / where[1] / f"rng_rank{rank}.pt"
        if rng_file.exists():  # restored after the data position is replayed (replay draws randoms)
            pending_rng = torch.load(rng_file, weights_only=False)
        resumed_from = str(Path(where[0]) / where[1])
        if is_main:
            log.info("resumed from %s at step %d", resumed_from, state.step)
    guard.total = state.nonfinite
    metrics = MetricsLog(run_dir, is_main, state.step if resumed_from else None)

    spe = steps_per_epoch(cfg, world)
    max_steps = int(cfg.train.max_steps)
    cur_frames: int | None = None
    it: Iterator[dict[str, Any]] | None = None

    def open_epoch(replay: int) -> Iterator[dict[str, Any]]:
        loader = build_loader(cfg, "train", training=True, epoch=state.epoch, num_frames=cur_frames)
        stream = iter(loader)
        for _ in range(replay):  # resume / curriculum switch: skip what this epoch already gave
            if next(stream, None) is None:
                break
        return stream

    def next_batch() -> tuple[dict[str, Any], float]:
        """The next micro-batch; all ranks roll over to a new epoch together."""
        nonlocal it
        t0 = time.perf_counter()
        empty_epochs = 0
        while True:
            assert it is not None
            out_of_budget = spe is not None and state.batch_in_epoch >= spe
            batch = None if out_of_budget else next(it, None)
            if not E.any_rank(batch is None, device):
                state.batch_in_epoch += 1
                return batch, time.perf_counter() - t0
            if state.batch_in_epoch == 0:
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise UserError("the training shards gave no batch on some rank for a whole epoch; check "
                                    "data.train.urls (`regionvlp shards check`) and data.batch_size")
            state.epoch += 1
            state.batch_in_epoch = 0
            it = open_epoch(0)

    micro_bs = int(cfg.data.batch_size)
    stopped = "max_steps"
    pbar = None
    if is_main:
        from tqdm import tqdm

        pbar = tqdm(total=max_steps, initial=state.step, desc="train", file=sys.stderr, dynamic_ncols=True)
    win_t0, win_wait, win_clips, win_terms = time.perf_counter(), 0.0, 0, {}
    total_t0, total_wait, total_clips = time.perf_counter(), 0.0, 0
    step_terms: dict[str, float] = {}
    step_micro = 0
    last_ckpt_step = state.step if resumed_from else -1  # a finished run resumed again saves nothing new
    eng.train()

    with E.StopFlag() as stop:
        while state.step < max_steps:
            frames = frames_at(state.step, cfg.train.frame_curriculum, int(cfg.data.num_frames))
            if frames != cur_frames:
                cur_frames = frames
                it = open_epoch(state.batch_in_epoch)
                if pending_rng is not None:
                    E.set_rng_state(pending_rng)
                    pending_rng = None
            batch, waited = next_batch()
            _add_counts(state.skipped, batch.get("skipped"))
            win_wait += waited
            total_wait += waited
            b = to_device(batch, device, dtype)
            if transform is not None and "frames" in b and "region_feats" not in b:
                b = to_device(transform(b), device, dtype)
            with autocast_for(device, dtype):
                out = eng(b)
            loss = out["loss"]
            finite = not E.any_rank(not bool(torch.isfinite(loss.detach()).all()), device)
            if not guard.check(finite, state.step):
                state.nonfinite = guard.total
                if is_main:
                    log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)",
                                state.step, guard.in_a_row)
                continue
            boundary = eng.is_gradient_accumulation_boundary()
            eng.backward(loss)
            eng.step()
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    step_terms[k] = step_terms.get(k, 0.0) + float(v.detach().float())
            step_micro += 1
            clips = len(batch["__key__"]) * world
            win_clips += clips
            total_clips += clips
            if not boundary:
                continue

            # ---- one optimizer step done
            state.step += 1
            state.samples += micro_bs * world * step_micro
            terms = {k: v / step_micro for k, v in step_terms.items()}
            step_terms, step_micro = {}, 0
            step_loss = terms.get("loss", float("nan"))
            state.recent_losses = (state.recent_losses + [step_loss])[-5:]
            if len(state.first_losses) < 5:
                state.first_losses.append(step_loss)
            for k, v in terms.items():
                win_terms[k] = win_terms.get(k, 0.0) + v
            win_terms["_n"] = win_terms.get("_n", 0.0) + 1

            if state.step % int(cfg.train.log_every) == 0 or state.step == max_steps:
                elapsed = max(1e-9, time.perf_counter() - win_t0)
                n = win_terms.pop("_n")
                record: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "frames": cur_frames}
                record.update({k: v / n for k, v in win_terms.items()})
                record.update({f"lr_{k}": v for k, v in E.current_lrs(optimizer).items()})
                gn = eng.get_global_grad_norm()
                if gn is not None and math.isfinite(float(gn)):
                    record["grad_norm"] = float(gn)
                record["clips_per_s"] = win_clips / elapsed
                record["data_wait_frac"] = win_wait / elapsed
                record["nonfinite_skipped"] = guard.total
                record["elapsed"] = state.elapsed + (time.perf_counter() - total_t0)
                record["time"] = time.time()
                record["skipped"] = sum(state.skipped.values())
                metrics.write(record)
                if pbar is not None:
                    pbar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "global", "local", "clips_per_s",
                                                                      "data_wait_frac") if k in record}
                                     | {"lr": f"{float(optimizer.param_groups[0]['lr']):.2e}"}, refresh=False)
                win_t0, win_wait, win_clips, win_terms = time.perf_counter(), 0.0, 0, {}
            if pbar is not None:
                pbar.update(1)

            val_every = int(cfg.train.val_every)
            if (val_every > 0 and state.step % val_every == 0) or state.step == max_steps:
                v = validate(eng, cfg, transform, device, dtype, cur_frames, zero_stage, batch)
                if v:
                    state.last_val = v
                    metrics.write({"step": state.step, "elapsed": state.elapsed + (time.perf_counter() - total_t0),
                                   "time": time.time(), **v})

            stop_now = E.any_rank(stop.requested, device)
            if (state.step % int(cfg.train.ckpt_every) == 0 or state.step == max_steps or stop_now):
                _save(ckpt, eng, state, cfg, rank, time.perf_counter() - total_t0)
                last_ckpt_step = state.step
            if stop_now:
                stopped = signal.Signals(stop.signum).name if stop.signum else "signal"
                if is_main:
                    log.warning("stop requested (%s): checkpoint saved at step %d", stopped, state.step)
                break

    if last_ckpt_step != state.step and state.step > 0:
        _save(ckpt, eng, state, cfg, rank, time.perf_counter() - total_t0)
    if pbar is not None:
        pbar.close()
    metrics.close()
    elapsed = max(1e-9, time.perf_counter() - total_t0)
    skipped = _all_reduce_counts(state.skipped, device)
    tags = E.list_tags(ckpt.dir)
    summary = {
        "steps": state.step,
        "final_loss": _mean(state.recent_losses),
        "initial_loss": _mean(state.first_losses),
        "checkpoint_dir": str(ckpt.dir / tags[-1]) if tags else None,
        "skipped": skipped,
        "nonfinite_skipped": guard.total,
        "clips_per_s": total_clips / elapsed,
        "data_wait_frac": total_wait / elapsed,
        "epochs": state.epoch,
        "samples": state.samples,
        "stopped": stopped,
        "resumed_from": resumed_from,
        "val": state.last_val,
        "world_size": world,
        "zero_stage": zero_stage,
        "dtype": str(dtype).replace("torch.", ""),
        "run_dir": str(run_dir),
        "train_seconds": state.elapsed + elapsed,
        "peak_bytes": _peak_bytes(device),
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if on_end is not None:
        on_end(eng, transform_obj)
    return summary


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _peak_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated, or the CPU max resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def init_weights(model: torch.nn.Module, source: Path) -> None:
    """``train.init_from``: weights only (no optimizer, no step) from an export folder,
    a run dir or a checkpoint; loaded before DeepSpeed wraps the model, so any ZeRO stage."""
    from regionvlp.checkpoint import _find_checkpoint, consolidated_state_dict

    if (source / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(source / "model.safetensors"))
    elif source.is_dir():
        state = consolidated_state_dict(*_find_checkpoint(source, None))
    else:
        raise UserError(f"train.init_from={source}: not an export folder or run directory")
    load_init_state(model, state, str(source))


def load_init_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict weights-only load for finetuning. A RegionLearner pathway goes through its own
    loader (temporal embeddings resized to the new frame count, identity-initialised
    temporal attention kept); every other key must match by name and shape, so no
    pretrained weight is silently dropped. Mismatches are one UserError naming the keys."""
    own = model.state_dict()
    rest = dict(state)
    if not any(k.startswith("qa_head.") for k in rest):  # a retrieval checkpoint: the QA head starts fresh
        own = {k: v for k, v in own.items() if not k.startswith("qa_head.")}
    if model_pathway_is_learned(model):
        from regionvlp.region_learner import load_pathway_state

        load_pathway_state(model.pathway, state)
        rest = {k: v for k, v in state.items() if not k.startswith("pathway.")}
        own = {k: v for k, v in own.items() if not k.startswith("pathway.")}
    missing = [k for k in own if k not in rest]
    unexpected = [k for k in rest if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in rest.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{name}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatch (checkpoint vs config)", mismatched)) if keys]
        raise UserError(f"train.init_from={source} does not match this config's model ({'; '.join(parts)}); "
                        "use a checkpoint of the same pathway, text model and sizes")
    model.load_state_dict(rest, strict=False)  # strict by the checks above; pathway keys loaded already


def model_pathway_is_learned(model: torch.nn.Module) -> bool:
    from regionvlp.region_learner.checkpoint import _ANCHOR

    return any(k.startswith("pathway.") and k.endswith(_ANCHOR) for k in model.state_dict())


def _save(ckpt: E.Checkpointer, eng: Any, state: TrainState, cfg: Any, rank: int, seg_elapsed: float) -> Path:
    from regionvlp.config import saved_container

    saved = asdict(state)
    saved["elapsed"] = state.elapsed + seg_elapsed
    client = {"train_state": saved, "config": saved_container(cfg), "regionvlp_checkpoint": 1}
    tag_dir = ckpt.dir / E.tag_for(state.step)
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(E.rng_state(), tag_dir / f"rng_rank{rank}.pt")
    return ckpt.save(eng, state.step, client)


# ------------------------------------------------------------------------ entry
def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """``CONFIG [k=v …]``; the ``--local_rank=N`` / ``--local_rank N`` the deepspeed
    launcher appends is accepted (LOCAL_RANK is taken from it when unset)."""
    import argparse

    p = argparse.ArgumentParser(prog="regionvlp.train", description="train a regionvlp dual encoder")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args.config, list(args.overrides)


def run(config: str, overrides: list[str]) -> dict[str, Any]:
    from regionvlp.config import load_config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(config, overrides)
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    """Launcher entry: the JSON summary is printed by rank 0 only."""
    from regionvlp.cli import print_json

    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(config, overrides)
    except UserError as err:
        print(f"regionvlp: error: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if int(os.environ.get("RANK", 0)) == 0:
        print_json(summary)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
