"""The training loop: one loop for both pathways, single process or under a launcher.

Run it as ``regionvlp train CONFIG [k=v …]``, ``deepspeed --num_gpus N --module
regionvlp.train CONFIG [k=v …]`` or ``torchrun --nproc_per_node N -m regionvlp.train
CONFIG [k=v …]``. Library use: ``regionvlp.train.train(cfg) -> dict``.

A *step* is one optimizer step (``train.grad_accum`` micro-batches per rank). Every rank
runs the same number of steps: ranks agree each micro-batch whether all of them still
have data, and all roll over to the next epoch together. Checkpoints hold the step,
epoch, position in the epoch (the number of micro-batches consumed, replayed without
training on resume), every rank's RNG state, the config and recent losses.

The loop reads like the algorithm (:func:`train_step`); what happens every N steps —
logging, validation, checkpointing, stop handling — lives in small functions called
after each step (:func:`after_step`).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from regionvlp import dist
from regionvlp.checkpoint import list_tags, tag_for
from regionvlp.config import saved_container, to_yaml
from regionvlp.detector.weights import load_extractor_weights, save_extractor_weights
from regionvlp.model import build_batch_transform, build_model, prepare_batch
from regionvlp.qa.vocab import prepare_run_vocab
from regionvlp.runfolder import FolderLock, check_out_dir
from regionvlp.runtime import add_counts, get_autocast, local_device, peak_bytes
from regionvlp.train.engine import engine_dtype, initialize
from regionvlp.train.checkpointer import Checkpointer
from regionvlp.train.data import BatchFeed, write_loader_position
from regionvlp.train.finetune import init_weights
from regionvlp.train.nodes import pull_run_files, push_run_files
from regionvlp.train.guards import (NonFiniteGuard, NonFiniteLossError, StopFlag, floor_parameter_, grad_norm_is_finite,
                                    weights_are_finite)
from regionvlp.train.optimizer import SkippableLambdaLR, clear_skip, rebuild_schedule, skip_next_step, step_lrs
from regionvlp.train.state import (MetricsLog, TrainState, mean_finite, read_rng, read_train_state, set_rng_state,
                                   write_rng, write_train_state)
from regionvlp.train.trackers import check_report_to, protocol_of
from regionvlp.train.validate import validate


log = logging.getLogger("regionvlp.train")


# -------------------------------------------------------------------- one run
@dataclass
class Run:
    """Everything one training run holds, built once by :func:`setup_run`."""

    cfg: Any
    run_dir: Path
    device: torch.device
    world: int
    engine: Any  # the DeepSpeed engine around the DualEncoder
    optimizer: torch.optim.Optimizer
    scheduler: SkippableLambdaLR  # the LR schedule DeepSpeed steps (its .optimizer: the torch AdamW)
    dtype: torch.dtype  # the engine's compute dtype
    zero_stage: int
    extractor: Any | None  # the frozen region extractor (detector pathway), never an engine child
    ckpt: Checkpointer
    state: TrainState
    guard: NonFiniteGuard
    metrics: MetricsLog
    resumed_from: str | None = None
    pending_rng: dict[str, Any] | None = None  # restored once the data position is reached

    @property
    def max_steps(self) -> int:
        return int(self.cfg.train.max_steps)

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A loader batch on the device in the engine dtype, with regions extracted."""
        return prepare_batch(batch, self.extractor, self.device, self.dtype)


@dataclass
class Meter:
    """Loss terms, clips and data wait: of the current optimizer step, of the logging
    window, and of the whole run segment. Loss terms stay on the device (no host sync)
    until a logging step reads the window (:meth:`window`) or a save / the summary reads
    the step losses (:meth:`flush_losses`)."""

    step_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    step_micro: int = 0
    step_clips: int = 0
    win_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    win_steps: int = 0
    win_t0: float = field(default_factory=time.perf_counter)
    win_wait: float = 0.0
    win_clips: int = 0
    total_t0: float = field(default_factory=time.perf_counter)
    total_wait: float = 0.0
    total_clips: int = 0
    step_losses: list[torch.Tensor] = field(default_factory=list)  # step losses not read yet

    def waited(self, seconds: float) -> None:
        self.win_wait += seconds
        self.total_wait += seconds

    def add_micro(self, out: dict[str, Any], clips: int) -> None:
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.detach().float().reshape(())
                self.step_terms[k] = self.step_terms[k] + v if k in self.step_terms else v
        self.step_micro += 1
        self.step_clips += clips

    def drop_step(self) -> None:
        """Forget a step that was not applied (skipped or discarded at an epoch end)."""
        self.step_terms, self.step_micro, self.step_clips = {}, 0, 0

    def end_step(self) -> int:
        """Count the applied step's mean terms; returns its micro-batch count."""
        micro = self.step_micro
        for k, v in self.step_terms.items():
            mean = v / micro
            self.win_terms[k] = self.win_terms[k] + mean if k in self.win_terms else mean
            if k == "loss":
                self.step_losses.append(mean)
        self.win_steps += 1
        self.win_clips += self.step_clips
        self.total_clips += self.step_clips
        self.drop_step()
        return micro

    def window(self) -> dict[str, float]:
        """Mean terms and rates since the last call (one host read); starts a new window."""
        elapsed = max(1e-9, time.perf_counter() - self.win_t0)
        keys = sorted(self.win_terms)
        values = torch.stack([self.win_terms[k] for k in keys]).tolist() if keys else []
        out = {k: v / max(1, self.win_steps) for k, v in zip(keys, values)}
        out.update(clips_per_s=self.win_clips / elapsed, data_wait_frac=self.win_wait / elapsed)
        self.win_terms, self.win_steps = {}, 0
        self.win_t0, self.win_wait, self.win_clips = time.perf_counter(), 0.0, 0
        return out

    def flush_losses(self, state: TrainState) -> None:
        """The step losses not read yet into ``state.recent_losses`` / ``first_losses``."""
        if not self.step_losses:
            return
        for loss in torch.stack(self.step_losses).tolist():
            state.recent_losses = (state.recent_losses + [loss])[-5:]
            if len(state.first_losses) < 5:
                state.first_losses.append(loss)
        self.step_losses = []

    def elapsed(self) -> float:
        return max(1e-9, time.perf_counter() - self.total_t0)


@dataclass
class Verdict:
    """What the ranks agreed at the end of a step's micro-batches (one collective)."""

    nonfinite: bool  # a loss or the gradient norm was not finite on some rank
    ended: bool  # some rank's loader ran dry: every rank rolls over, the step is discarded
    stop: bool  # a stop signal arrived on some rank

    @property
    def apply(self) -> bool:
        return not (self.nonfinite or self.ended)


# ---------------------------------------------------------------------- setup
def write_run_config(cfg: Any, run_dir: Path) -> None:
    """Rank 0 writes ``config.yaml`` into the run folder it holds (and a QA run's answer
    vocabulary); every rank waits."""
    if dist.is_main():
        check_out_dir(run_dir)  # also when setup_run is called without train()'s folder lock
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if cfg.qa.enabled:  # QA: the answer vocabulary beside the config, before any loader reads it
            prepare_run_vocab(cfg, run_dir)
    dist.barrier()


def build_extractor_for(cfg: Any, run_dir: Path, device: torch.device) -> Any | None:
    """The frozen extractor on ``device`` with the run's own random weights (saved on a
    fresh run, loaded on resume); None on the learned pathway."""
    extractor = build_batch_transform(cfg)
    if extractor is None:
        return None
    load_extractor_weights(extractor, run_dir)
    extractor.to(device)
    if dist.is_main():
        save_extractor_weights(extractor, run_dir)
    return extractor


def setup_run(cfg: Any) -> Run:
    """Model, extractor, DeepSpeed engine and run folder; resumed when asked to."""
    run_dir = Path(cfg.run.out_dir)
    check_report_to(list(cfg.run.report_to))  # every rank, before anything starts
    device = local_device()
    write_run_config(cfg, run_dir)
    ckpt = Checkpointer(run_dir, int(cfg.train.keep_last), str(cfg.run.remote_dir))
    where = ckpt.agree(str(cfg.train.resume))  # one tag for every rank, fetched where missing
    if where is not None and ckpt.sync.remote_run and dist.is_main():
        pull_run_files(run_dir, ckpt.sync.remote_run)  # the metrics log and extractor weights follow
    torch.manual_seed(int(cfg.seed))  # same init on every rank
    extractor = build_extractor_for(cfg, run_dir, device)
    model = build_model(cfg)
    if where is None and str(cfg.train.init_from) not in ("", "none"):
        init_weights(model, str(cfg.train.init_from))
    engine, optimizer, scheduler, ds = initialize(model, cfg)
    run = Run(cfg=cfg, run_dir=run_dir, device=device, world=dist.world_size(), engine=engine,
              optimizer=optimizer, scheduler=scheduler, dtype=engine_dtype(ds),
              zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)), extractor=extractor,
              ckpt=ckpt, state=TrainState(), guard=NonFiniteGuard(int(cfg.train.max_nonfinite)),
              metrics=MetricsLog(run_dir, False, None))
    if where is not None:
        resume(run, where)
    run.guard.total = run.state.nonfinite
    protocol = protocol_of(cfg, run.world, run.zero_stage, str(run.dtype).replace("torch.", ""))
    run.metrics = MetricsLog(run_dir, dist.is_main(), run.state.step if run.resumed_from else None,
                             report_to=list(cfg.run.report_to), name=str(cfg.run.name),
                             config={"config": saved_container(cfg), "protocol": protocol})
    return run


def resume(run: Run, where: tuple[Path, str]) -> None:
    """Engine, optimizer, schedule and train state from checkpoint ``where``; the RNG
    state is kept pending until the data position has been replayed."""
    run.ckpt.load(run.engine, where)  # checks first that this run wrote the folder (manifest)
    run.state = read_train_state(Path(where[0]) / where[1])
    run.pending_rng = read_rng(Path(where[0]) / where[1], dist.rank())
    run.resumed_from = str(Path(where[0]) / where[1])
    changes = rebuild_schedule(run.scheduler, run.cfg)
    if dist.is_main():
        log.info("resumed from %s at step %d", run.resumed_from, run.state.step)
        if changes:
            log.info("LR schedule rebuilt from step %d for the new config: %s", run.state.step, "; ".join(changes))


# ----------------------------------------------------------------------- step
def agree(run: Run, feed: BatchFeed, stop: StopFlag, loss_ok: torch.Tensor) -> Verdict:
    """The step's one collective and one host sync: ``[non-finite, loader ended, stop]``
    summed over ranks. Non-finite: any micro-batch loss (``loss_ok`` False) or the
    gradient norm this rank holds."""
    ok = loss_ok & grad_norm_is_finite(run.engine.module).to(loss_ok.device)
    local = torch.stack([(~ok).float(), torch.tensor(float(feed.ended), device=ok.device),
                         torch.tensor(float(stop.requested), device=ok.device)])
    total = dist.all_reduce_sum(local.to(run.device))
    bits = int(((total > 0).long() * torch.tensor([1, 2, 4], device=total.device)).sum())  # the one host read
    return Verdict(nonfinite=bool(bits & 1), ended=bool(bits & 2), stop=bool(bits & 4))


def micro_batches(run: Run, feed: BatchFeed, meter: Meter) -> torch.Tensor:
    """Forward and backward of the step's ``train.grad_accum`` micro-batches (the engine
    counts all but the last, which :func:`train_step` steps); returns a 0-d bool tensor,
    True when every loss was finite (no host sync)."""
    accum = int(run.cfg.train.grad_accum)
    loss_ok = torch.ones((), dtype=torch.bool, device=run.device)
    for i in range(accum):
        batch, waited = feed.next_batch()
        meter.waited(waited)
        if not feed.ended:
            add_counts(run.state.skipped, batch.get("skipped"))
        with get_autocast(run.dtype, run.device.type)():
            out = run.engine(run.prepare(batch))
        loss_ok = loss_ok & torch.isfinite(out["loss"].detach()).all()
        run.engine.backward(out["loss"])
        meter.add_micro(out, clips=len(batch["__key__"]) * run.world)
        if i < accum - 1:
            run.engine.step()  # not an accumulation boundary: DeepSpeed only counts it
    return loss_ok


def train_step(run: Run, feed: BatchFeed, meter: Meter, stop: StopFlag) -> Verdict:
    """One optimizer step: the micro-batches, the ranks' agreement, then the engine step,
    which applies no update (and leaves the schedule) when the step is skipped for a
    non-finite loss / gradient norm or discarded at an epoch end."""
    verdict = agree(run, feed, stop, micro_batches(run, feed, meter))
    base_opt = run.scheduler.optimizer
    if not verdict.apply:
        skip_next_step(base_opt, run.scheduler)
    run.engine.step()
    clear_skip(base_opt, run.scheduler)
    if verdict.apply and not run.engine.was_step_applied():  # DeepSpeed's own overflow check (ZeRO)
        verdict.nonfinite = True
    if verdict.ended:
        feed.roll_over()
    elif verdict.nonfinite:
        count_nonfinite(run)
    else:
        run.guard.check(True, run.state.step)
        floor_temperature(run)
    if not verdict.apply:
        meter.drop_step()
    return verdict


def count_nonfinite(run: Run) -> None:
    """A skipped non-finite step: counted, warned; too many in a row set aside the
    checkpoints taken since the streak began, then abort."""
    try:
        run.guard.check(False, run.state.step)
    except NonFiniteLossError:
        run.ckpt.set_aside(run.guard.first_of_streak)
        raise
    run.state.nonfinite = run.guard.total
    if dist.is_main():
        log.warning("non-finite loss or gradient norm at step %d: step skipped, no weight changed (%d in a row)",
                    run.state.step, run.guard.in_a_row)


def floor_temperature(run: Run) -> None:
    """A learnable temperature back to ``loss.min_temperature`` after the step."""
    loss = run.engine.module.loss
    if isinstance(loss.log_temperature, torch.nn.Parameter):
        floor_parameter_(loss.log_temperature, loss.log_temperature_floor)


def end_step(run: Run, meter: Meter) -> None:
    """Count the finished optimizer step in the train state."""
    micro = meter.end_step()
    run.state.step += 1
    run.state.samples += int(run.cfg.data.batch_size) * run.world * micro


# ---------------------------------------------------------------- every N steps
def due(step: int, every: int, last: int) -> bool:
    """True on every ``every``-th step and on the last one."""
    return (every > 0 and step % every == 0) or step == last


def log_step(run: Run, meter: Meter, frames: int | None, pbar: Any) -> None:
    """One ``metrics.jsonl`` record of the window since the last log, and the bar's figures."""
    state = run.state
    record: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "frames": frames}
    record.update(meter.window())
    meter.flush_losses(state)
    record.update({f"lr_{k}": v for k, v in step_lrs(run.scheduler, state.step).items()})
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        record["grad_norm"] = float(grad_norm)
    record.update(nonfinite_skipped=run.guard.total, elapsed=state.elapsed + meter.elapsed(),
                  time=time.time(), skipped=sum(state.skipped.values()))
    run.metrics.write(record)
    if pbar is not None:
        shown = {k: f"{record[k]:.3g}" for k in ("loss", "global", "local", "clips_per_s", "data_wait_frac")
                 if k in record}
        pbar.set_postfix(shown | {"lr": f"{float(run.optimizer.param_groups[0]['lr']):.2e}"}, refresh=False)


def validate_step(run: Run, meter: Meter, frames: int, fallback: dict[str, Any]) -> None:
    """Validation metrics into the train state and ``metrics.jsonl``."""
    val = validate(run.engine, run.cfg, run.extractor, run.device, run.dtype, frames, run.zero_stage, fallback)
    if val:
        run.state.last_val = val
        run.metrics.write({"step": run.state.step, "elapsed": run.state.elapsed + meter.elapsed(),
                           "time": time.time(), **val})


def save(run: Run, meter: Meter, feed: BatchFeed | None = None) -> Path:
    """A checkpoint of this step: engine + optimizer + schedule (DeepSpeed, every rank),
    the train state and config as client state, this rank's RNG state and loader position.
    Weights that are not finite are never saved (the run stops instead)."""
    if dist.any_rank(not weights_are_finite(run.engine.module), run.device):
        raise NonFiniteLossError(f"the weights are not finite after step {run.state.step}: nothing saved; "
                                   "lower optim.lr and resume from the last checkpoint with train.resume=auto")
    meter.flush_losses(run.state)
    saved = asdict(run.state)
    saved["elapsed"] = run.state.elapsed + meter.elapsed()
    tag_dir = run.ckpt.dir / tag_for(run.state.step)
    write_rng(tag_dir, dist.rank())
    if feed is not None:
        write_loader_position(tag_dir, dist.rank(), feed.position)
    if dist.is_main():
        write_train_state(tag_dir, saved, saved_container(run.cfg))
    return run.ckpt.save(run.engine, run.state.step, {"regionvlp_checkpoint": 2})


def after_step(run: Run, meter: Meter, feed: BatchFeed, stop: StopFlag, stop_now: bool, pbar: Any) -> str | None:
    """Logging, validation and checkpointing when due; the stop reason when a signal
    asked the run to stop (``stop_now``, agreed in the step's collective; after its
    checkpoint), else None."""
    step, cfg = run.state.step, run.cfg
    if due(step, int(cfg.train.log_every), run.max_steps):
        log_step(run, meter, feed.frames, pbar)
    if pbar is not None:
        pbar.update(1)
    if due(step, int(cfg.train.val_every), run.max_steps):
        validate_step(run, meter, feed.frames, feed.last_batch)
    if due(step, int(cfg.train.ckpt_every), run.max_steps) or stop_now:
        save(run, meter, feed)
    if not stop_now:
        return None
    reason = signal.Signals(stop.signum).name if stop.signum else "signal"
    if dist.is_main():
        log.warning("stop requested (%s): checkpoint saved at step %d", reason, step)
    return reason


# --------------------------------------------------------------------- summary
def summarize(run: Run, meter: Meter, stopped: str) -> dict[str, Any]:
    """The run's JSON summary (also written to ``summary.json`` by rank 0)."""
    state, elapsed = run.state, meter.elapsed()
    meter.flush_losses(state)
    tags = list_tags(run.ckpt.dir)
    summary = {
        "steps": state.step,
        "final_loss": mean_finite(state.recent_losses),
        "initial_loss": mean_finite(state.first_losses),
        "checkpoint_dir": str(run.ckpt.dir / tags[-1]) if tags else None,
        "skipped": dist.sum_counts(state.skipped),
        "nonfinite_skipped": run.guard.total,
        "clips_per_s": meter.total_clips / elapsed,
        "data_wait_frac": meter.total_wait / elapsed,
        "epochs": state.epoch,
        "samples": state.samples,
        "stopped": stopped,
        "resumed_from": run.resumed_from,
        "val": state.last_val,
        "world_size": run.world,
        "zero_stage": run.zero_stage,
        "dtype": str(run.dtype).replace("torch.", ""),
        "run_dir": str(run.run_dir),
        "train_seconds": state.elapsed + elapsed,
        "peak_bytes": peak_bytes(run.device),
    }
    if dist.is_main():
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if run.ckpt.sync.remote_run:
            push_run_files(run.run_dir, run.ckpt.sync.remote_run)
    return summary


# ------------------------------------------------------------------------ loop
def train(cfg: Any, *, on_end: Callable[[Any, Any], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (or until SIGTERM/SIGINT); returns the summary.

    Keys: ``steps``, ``final_loss`` (mean of the last ≤5 step losses), ``initial_loss``
    (mean of the first ≤5), ``checkpoint_dir``, ``skipped`` (data skips by reason, all
    ranks), ``nonfinite_skipped``, ``clips_per_s``, ``data_wait_frac``, ``epochs``,
    ``stopped`` (max_steps | SIGTERM | SIGINT), ``resumed_from``, ``val`` and ``run_dir``.
    ``on_end(engine, extractor)`` is called before returning (library use: inspect the
    trained model in the same process).
    """
    with dist.process_group(float(cfg.run.collective_timeout_s)), FolderLock(cfg.run.out_dir, enabled=dist.is_main()):  # one run per folder
        run = setup_run(cfg)
        summary = run_loop(run)
        if on_end is not None:
            on_end(run.engine, run.extractor)
        return summary


def run_loop(run: Run) -> dict[str, Any]:
    """Steps until ``train.max_steps`` or a stop signal, then a final checkpoint."""
    feed, meter = BatchFeed(run.cfg, run.state, run.device, run.resumed_from), Meter()
    last_saved = run.state.step if run.resumed_from else -1  # a finished run resumed again saves nothing new
    pbar = tqdm(total=run.max_steps, initial=run.state.step, desc="train", file=sys.stderr,
                dynamic_ncols=True) if dist.is_main() else None
    stopped = "max_steps"
    run.engine.train()
    try:  # the bar is closed before an error is printed, so the error stays the last line
        with StopFlag() as stop:
            while run.state.step < run.max_steps:
                if feed.follow_curriculum() and run.pending_rng is not None:
                    set_rng_state(run.pending_rng)  # the replay drew randoms: restore after it
                    run.pending_rng = None
                verdict = train_step(run, feed, meter, stop)
                if not verdict.apply:
                    continue
                end_step(run, meter)
                reason = after_step(run, meter, feed, stop, verdict.stop, pbar)
                last_saved = run.state.step if due(run.state.step, int(run.cfg.train.ckpt_every), run.max_steps) \
                    or reason else last_saved
                if reason:
                    stopped = reason
                    break
    finally:
        if pbar is not None:
            pbar.close()
    if last_saved != run.state.step and run.state.step > 0:
        save(run, meter, feed)
    run.metrics.close()
    return summarize(run, meter, stopped)
