"""Pathways under one budget (detector regions vs learned regions vs ...): ``regionvlp compare``.

Two ways in:

* :func:`compare` trains two or more pathways (any registered in :mod:`regionvlp.pathways`)
  with ``regionvlp.train.train`` on the same data, losses, steps and seed (each in its
  own process, so peak memory is measured per pathway), then reports;
* :func:`compare_runs` takes two or more finished run directories and reports.

The report (``OUT/report.md``, :mod:`regionvlp.report`) has PNG plots — text→video R@1
over steps and over wall-clock, training loss over steps, throughput and peak memory per
pathway — and a final metrics table; ``OUT/summary.json`` holds the same figures (also
returned).

What is read from a run directory (the trainer's layout): ``metrics.jsonl`` (one JSON
object per line: ``step``, ``time`` / ``elapsed``, ``loss`` for training records,
``val/<metric>`` keys for validation records), ``summary.json`` (the ``train`` result)
and ``config.yaml`` (the resolved config).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from regionvlp import dist, pathways
from regionvlp.config import default_config, load_config, saved_container
from regionvlp.errors import UserError
from regionvlp.evaluation import checkpoint_stamp, evaluate_model, load_eval_model, loaded_weights
from regionvlp.runtime import device_name, local_device, peak_bytes, resolve_device
from regionvlp.qa.evaluate import evaluate_qa
from regionvlp.qa.stage import run_qa_stage, wants_qa
from regionvlp.region_cache import RegionCache, can_cache, route_of, use_region_cache
from regionvlp.report import RunResult, write_report
from regionvlp.show import report_figures
from regionvlp.train import train


log = logging.getLogger(__name__)

# config keys every pathway must share for the comparison to be fair
SHARED_KEYS = ("seed", "data.train", "data.val", "data.num_frames", "data.size", "data.batch_size",
               "data.max_words", "data.train_sampling", "data.eval_sampling", "loss", "train.max_steps",
               "train.grad_accum", "model.embed_dim", "model.text", "qa")


# ------------------------------------------------------------------ run dirs
def _strip_val(key: str) -> str | None:
    for prefix in ("val/", "val_", "val."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> RunResult:
    """A finished run directory → :class:`RunResult` (validation curve, loss curve,
    final metrics, throughput, peak memory)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; pass a finished `regionvlp train` run directory")
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    regions = name or _run_regions(run_dir) or run_dir.name
    res = RunResult(name=regions, run_dir=str(run_dir))
    t0: float | None = None
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if "time" in rec and t0 is None:
            t0 = float(rec["time"])
        elapsed = rec.get("elapsed")
        if elapsed is None and "time" in rec and t0 is not None:
            elapsed = float(rec["time"]) - t0
        val = {k2: float(v) for k, v in rec.items() if (k2 := _strip_val(k)) and isinstance(v, (int, float))}
        if "t2v_r1" in val:
            val.update(step=int(rec["step"]), elapsed=float(elapsed) if elapsed is not None else math.nan)
            res.val.append(val)
        elif isinstance(rec.get("loss"), (int, float)):
            res.loss.append((int(rec["step"]), float(rec["loss"])))
    if res.val:
        res.final = {k: v for k, v in res.val[-1].items() if k not in ("step", "elapsed")}
    res.steps = summary.get("steps", res.loss[-1][0] if res.loss else None)
    res.final_loss = summary.get("final_loss", res.loss[-1][1] if res.loss else None)
    res.clips_per_s = summary.get("clips_per_s")
    res.peak_bytes = summary.get("peak_bytes")
    res.train_seconds = summary.get("train_seconds", summary.get("elapsed"))
    return res


def _run_regions(run_dir: Path) -> str | None:
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return None

    try:
        return str(OmegaConf.select(OmegaConf.load(cfg_file), "model.regions"))
    except Exception:  # noqa: BLE001 - a name is only a label here
        return None


def region_figures(runs: Sequence[RunResult], out: Path, device: str = "cpu",
                   urls: Sequence[str] | None = None) -> dict[str, str]:
    """``regions.png`` + ``retrieval.png`` of the runs' checkpoints (:mod:`regionvlp.show`)
    on the raw val frames ``urls`` (default: the first run's ``data.val.urls``); when they
    cannot be drawn (e.g. a run without a checkpoint), ``{"note": why}``."""
    try:
        return report_figures({r.name: r.run_dir for r in runs}, out, device=device, urls=urls)
    except UserError as err:
        log.warning("compare: no region figures: %s", err)
        return {"note": str(err)}
    except Exception as err:  # noqa: BLE001 - pictures must not cost a finished comparison its report
        log.exception("compare: drawing the region figures failed")
        return {"note": f"drawing them failed ({type(err).__name__}: {err}); see the log"}


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Report on two or more finished run directories (names default to each run's model.regions)."""
    if len(run_dirs) < 2:
        raise UserError(f"compare needs at least two run directories, got {len(run_dirs)}")
    runs = [read_run(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    seen = [r.name for r in runs]
    if len(set(seen)) < len(seen):  # two runs of one pathway: label by folder
        for r in runs:
            r.name = f"{r.name} ({Path(r.run_dir).name})"
    for r in runs:
        if not r.val:
            raise UserError(f"{r.run_dir}: no validation records in metrics.jsonl; train with data.val.urls set")
    return write_report(runs, out_dir, figures=region_figures(runs, Path(out_dir)))


# ------------------------------------------------------------------ training
def _select(cfg: Any, key: str) -> Any:
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def check_same_budget(cfgs: Mapping[str, Any]) -> None:
    """Every pathway must share data, losses, steps and seed with the first; raise naming
    what differs."""
    (na, a), *others = list(cfgs.items())
    for nb, b in others:
        differ = [k for k in SHARED_KEYS if _select(a, k) != _select(b, k)]
        if differ:
            detail = "; ".join(f"{k}: {na}={_select(a, k)!r} {nb}={_select(b, k)!r}" for k in differ[:3])
            raise UserError(f"compare: the {na} and {nb} configs differ in {', '.join(differ)} ({detail}); "
                            f"set them equal (shared key=value overrides apply to all)")


def _train_child(cfg_container: dict[str, Any], result_file: str, eval_urls: list[str] | None = None) -> None:
    """Runs in a fresh process: train one pathway, record wall-clock and peak memory."""
    cfg = OmegaConf.merge(default_config(), cfg_container)
    start = time.perf_counter()
    summary = train(cfg)
    seconds, peak = time.perf_counter() - start, peak_bytes()
    final = final_eval(cfg, eval_urls)
    result = {"summary": summary, "train_seconds": seconds, "peak_bytes": peak, "final": final}
    Path(result_file).write_text(json.dumps(result, default=str))


def final_eval(cfg: Any, eval_urls: Sequence[str] | None = None) -> dict[str, Any]:
    """Full eval metrics of the newest checkpoint in ``cfg.run.out_dir`` (the trainer's
    periodic validation logs only R@1/R@5/MedR) on ``eval_urls`` (default data.val.urls);
    QA metrics for a QA run."""
    device = local_device(str(cfg.run.device))
    model, transform, _, _ = load_eval_model(cfg.run.out_dir, device)
    if eval_urls is not None:
        cfg.data.val.urls = list(eval_urls)
    if cfg.qa.enabled:
        return evaluate_qa(model, cfg, "val", batch_transform=transform, device=device)
    out = evaluate_model(model, cfg, "val", batch_transform=transform, device=device)
    out["protocol"].update(checkpoint_stamp(str(cfg.run.out_dir), loaded_weights(Path(cfg.run.out_dir))))
    return out


def train_isolated(cfg: Any, result_file: Path, eval_urls: Sequence[str] | None = None) -> dict[str, Any]:
    """``regionvlp.train.train(cfg)`` in a spawned process (clean peak-memory reading,
    no state shared between the two pathways); returns its summary plus
    ``train_seconds`` and ``peak_bytes``."""
    result_file.unlink(missing_ok=True)
    urls = None if eval_urls is None else list(eval_urls)
    proc = mp.get_context("spawn").Process(target=_train_child, args=(saved_container(cfg), str(result_file), urls))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result_file.is_file():
        raise UserError(f"compare: training {cfg.model.regions} failed (exit code {proc.exitcode}); "
                        f"see the log above and {cfg.run.out_dir}")
    return json.loads(result_file.read_text())


def train_in_process(cfg: Any, result_file: Path | None = None, eval_urls: Sequence[str] | None = None
                     ) -> dict[str, Any]:
    """:func:`train_isolated` without the process: faster to start, but the second
    pathway's CPU peak memory reading includes the first's (ru_maxrss never falls)."""
    start = time.perf_counter()
    summary = train(cfg)
    seconds, peak = time.perf_counter() - start, peak_bytes()
    return {"summary": summary, "train_seconds": seconds, "peak_bytes": peak, "final": final_eval(cfg, eval_urls)}


def compare(cfgs: Mapping[str, Any], out_dir: str | os.PathLike, *, val_points: int = 4,
            isolate: bool = True, region_cache: RegionCache | None = None) -> dict[str, Any]:
    """Train each config (``{"detector": cfg, "learned": cfg, ...}``, two or more) under
    one budget into ``out_dir/<name>`` and write the report. Periodic validation is
    switched on (``val_points`` evaluations over the run) when the configs leave it at the
    end only. ``isolate``: each training in its own spawned process (clean peak memory
    per pathway). ``region_cache``: the pathways that can train from region shards do,
    from regions extracted once (:mod:`regionvlp.region_cache`); validation and the final
    evaluation still run their detector in the loop."""
    if len(cfgs) < 2:
        raise UserError(f"compare trains two or more configs, got {len(cfgs)}")
    check_same_budget(cfgs)
    if any(cfg.qa.enabled for cfg in cfgs.values()):
        raise UserError("compare trains retrieval runs first; for video QA leave qa.enabled=false and set "
                        "qa.stage_steps=N (a QA head fine-tuned N steps from each retrieval run)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(cfgs.values()))
    setup = {k: _select(first, k) for k in ("seed", "train.max_steps", "data.batch_size", "data.num_frames",
                                            "data.size", "data.train.urls", "data.val.urls", "loss")}
    runs = []
    for name, cfg in cfgs.items():
        if not list(cfg.data.val.urls):
            raise UserError("compare needs validation shards: set data.val.urls")
        cfg.run.out_dir = str(out / name)
        route, eval_urls = route_of(), None
        if region_cache is not None and can_cache(cfg):
            eval_urls = list(cfg.data.val.urls)  # the final eval: the raw val frames, the detector in the loop
            route = use_region_cache(cfg, name, region_cache)
        if int(cfg.train.val_every) <= 0:
            cfg.train.val_every = max(1, int(cfg.train.max_steps) // max(1, val_points))
        print(f"compare: training {name} pathway for {cfg.train.max_steps} steps → {cfg.run.out_dir}",
              file=sys.stderr, flush=True)
        result = (train_isolated(cfg, out / f".{name}.result.json", eval_urls) if isolate
                  else train_in_process(cfg, None, eval_urls))
        run = read_run(cfg.run.out_dir, name)
        run.route = route
        summary = result["summary"]
        run.train_seconds = result["train_seconds"]
        run.peak_bytes = int(summary.get("peak_bytes") or result["peak_bytes"])
        run.steps = summary.get("steps", run.steps)
        run.final_loss = summary.get("final_loss", run.final_loss)
        run.clips_per_s = summary.get("clips_per_s") or _clips_per_s(cfg, run)
        run.final = {k: v for k, v in result["final"].items() if k not in ("skipped", "cached")}
        if not run.val:
            raise UserError(f"compare: {name} logged no validation retrieval metrics in {cfg.run.out_dir}/metrics.jsonl")
        runs.append(run)
    qa, qa_seconds = None, None
    if wants_qa(cfgs):
        print("compare: QA stage, a QA head from each retrieval run", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        qa = run_qa_stage(cfgs, out, train_isolated if isolate else train_in_process)
        qa_seconds = time.perf_counter() - t0

    device = resolve_device(str(first.run.device))
    settings = {name: {f"model.{sec}": _select(cfg, f"model.{sec}") for sec in pathways.of(cfg).sections}
                for name, cfg in cfgs.items()}
    summary = write_report(runs, out, setup=setup, device=device_name(device),
                           figures=region_figures(runs, out, str(device), setup["data.val.urls"]), qa=qa,
                           settings=settings)  # the raw val frames, whatever route a row's regions took
    if qa_seconds is not None:
        summary["qa_seconds"] = qa_seconds  # the QA stage's wall-clock (training + evaluation, both pathways)
    return summary


def _clips_per_s(cfg: Any, run: RunResult) -> float | None:
    """Fallback throughput: clips seen / training wall-clock (validation included)."""
    if not run.steps or not run.train_seconds:
        return None

    clips = run.steps * int(cfg.data.batch_size) * int(cfg.train.grad_accum) * dist.world_size()
    return clips / run.train_seconds


def compare_main(out: str | os.PathLike, detector: str | None = None, learned: str | None = None,
                 runs: Sequence[str] | None = None, overrides: Sequence[str] = (),
                 pathways_arg: str | None = None, configs: Sequence[str] = (),
                 region_cache: RegionCache | None = None) -> dict[str, Any]:
    """The ``compare`` command: ``runs`` (two or more finished run dirs), or train the
    pathways ``pathways_arg`` names (``detector,learned,fused``; default: those given a
    config) with one config each, ``configs`` as ``NAME=CONFIG`` (``detector`` /
    ``learned``: the ``--detector`` / ``--learned`` flags), and the shared ``overrides``;
    ``region_cache``: the ``--region-cache*`` flags."""
    paths = pathway_configs(configs, detector=detector, learned=learned)
    if runs:
        if paths or overrides or pathways_arg or region_cache:
            raise UserError("compare: give either --runs A B ... or pathway configs (+ overrides, --region-cache), "
                            "not both")
        return compare_runs(runs, out)
    names = [n.strip() for n in pathways_arg.split(",") if n.strip()] if pathways_arg else list(paths)
    if not pathways_arg and len(names) < 2:
        raise UserError("compare: give --detector CONFIG and --learned CONFIG to train both, "
                        "--pathways A,B,... --config A=CONFIG ..., or --runs RUN_A RUN_B")
    for name in names:
        pathways.get(name)  # a registered pathway
    if len(names) < 2 or len(set(names)) < len(names):
        raise UserError(f"compare: --pathways needs two or more different pathways, got {','.join(names)}")
    missing = [n for n in names if n not in paths]
    extra = [n for n in paths if n not in names]
    if missing or extra:
        raise UserError(f"compare: one config per pathway: {'no --config for ' + ', '.join(missing) if missing else ''}"
                        f"{'; ' if missing and extra else ''}{'not in --pathways: ' + ', '.join(extra) if extra else ''}")
    cfgs = {name: load_config(paths[name], overrides) for name in names}
    for name, cfg in cfgs.items():
        if str(cfg.model.regions) != name:
            raise UserError(f"compare: the {name} config has model.regions={cfg.model.regions}; it must be {name}")
    if region_cache is not None and not any(can_cache(cfg) for cfg in cfgs.values()):
        raise UserError(f"compare: --region-cache: none of {', '.join(cfgs)} trains from region shards "
                        "(the detector pathway does)")
    return compare(cfgs, out, region_cache=region_cache)


def pathway_configs(configs: Sequence[str], *, detector: str | None = None, learned: str | None = None
                    ) -> dict[str, str]:
    """``NAME=CONFIG`` items (plus the ``--detector`` / ``--learned`` shorthands) -> name -> path."""
    paths: dict[str, str] = {}
    shorthand = [f"{name}={path}" for name, path in (("detector", detector), ("learned", learned)) if path]
    for item in [*shorthand, *configs]:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"compare: --config takes NAME=CONFIG (e.g. fused=configs/pretrain_fused.yaml), got {item!r}")
        if name.strip() in paths:
            raise UserError(f"compare: two configs for the {name.strip()} pathway")
        paths[name.strip()] = path.strip()
    return paths
