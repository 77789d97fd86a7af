"""Detector regions vs learned regions under one budget: ``regionvlp compare``.

Two ways in:

* :func:`compare` trains both pathways with ``regionvlp.train.train`` on the same data,
  losses, steps and seed (each in its own process, so peak memory is measured per
  pathway), then reports;
* :func:`compare_runs` takes two finished run directories and reports.

The report (``OUT/report.md``) has PNG plots — text→video R@1 over steps and over
wall-clock, training loss over steps, throughput and peak memory per pathway — and a
final metrics table; ``OUT/summary.json`` holds the same figures (also returned).

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from regionvlp import dist
from regionvlp.config import default_config, load_config, saved_container
from regionvlp.errors import UserError
from regionvlp.evaluation import evaluate_model, load_eval_model
from regionvlp.runtime import device_name, local_device, peak_bytes, resolve_device
from regionvlp.qa.evaluate import evaluate_qa
from regionvlp.qa.stage import qa_section, run_qa_stage, wants_qa
from regionvlp.show import report_figures
from regionvlp.train import train


log = logging.getLogger(__name__)

PATHWAYS = ("detector", "learned")
FINAL_KEYS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_r50", "t2v_medr", "t2v_meanr",
              "v2t_r1", "v2t_r5", "v2t_r10", "v2t_r50", "v2t_medr", "v2t_meanr", "mc_accuracy")
# config keys both pathways must share for the comparison to be fair
SHARED_KEYS = ("seed", "data.train", "data.val", "data.num_frames", "data.size", "data.batch_size",
               "data.max_words", "data.train_sampling", "data.eval_sampling", "loss", "train.max_steps",
               "train.grad_accum", "model.embed_dim", "model.text", "qa")


@dataclass
class RunResult:
    """What the report needs from one trained pathway."""

    name: str
    run_dir: str
    val: list[dict[str, float]] = field(default_factory=list)  # {step, elapsed, t2v_r1, ...} per validation
    loss: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    final: dict[str, Any] = field(default_factory=dict)  # eval metrics at the end
    clips_per_s: float | None = None
    peak_bytes: int | None = None
    train_seconds: float | None = None
    steps: int | None = None
    final_loss: float | None = None


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


# -------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _fmt_bytes(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


@contextmanager
def _figure(path: Path, ncols: int = 1, figsize: tuple[float, float] = (5.5, 3.6)):
    """Axes for one PNG (Agg backend, no display); saved to ``path`` and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _finish_lines(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_curves(runs: Sequence[RunResult], x: str, path: Path, xlabel: str, chance: float | None) -> None:
    with _figure(path) as ax:
        for r in runs:
            pts = [(v[x], v["t2v_r1"]) for v in r.val if not math.isnan(v.get(x, math.nan))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=r.name)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        _finish_lines(ax, xlabel, "text→video R@1 (%)", f"val R@1 over {xlabel.split(' ')[0]}")


def _plot_loss(runs: Sequence[RunResult], path: Path) -> None:
    with _figure(path) as ax:
        for r in runs:
            if r.loss:
                xs, ys = zip(*r.loss)
                ax.plot(xs, ys, label=r.name)
        _finish_lines(ax, "step", "training loss", "training loss")


def _plot_cost(runs: Sequence[RunResult], path: Path) -> None:
    names = [r.name for r in runs]
    colors = ["C0", "C1"][: len(runs)]
    with _figure(path, ncols=2, figsize=(7.5, 3.4)) as (a, b):
        a.bar(names, [r.clips_per_s or 0.0 for r in runs], color=colors)
        a.set_title("training throughput")
        a.set_ylabel("clips / s")
        b.bar(names, [(r.peak_bytes or 0) / 2**20 for r in runs], color=colors)
        b.set_title("peak memory")
        b.set_ylabel("MiB")


def region_figures(runs: Sequence[RunResult], out: Path, device: str = "cpu") -> dict[str, str]:
    """``regions.png`` + ``retrieval.png`` of the runs' checkpoints (:mod:`regionvlp.show`);
    when they cannot be drawn (e.g. a run without a checkpoint), ``{"note": why}``."""
    try:
        return report_figures({r.name: r.run_dir for r in runs}, out, device=device)
    except UserError as err:
        log.warning("compare: no region figures: %s", err)
        return {"note": str(err)}
    except Exception as err:  # noqa: BLE001 - pictures must not cost a finished comparison its report
        log.exception("compare: drawing the region figures failed")
        return {"note": f"drawing them failed ({type(err).__name__}: {err}); see the log"}


def _figure_lines(figures: Mapping[str, str]) -> list[str]:
    lines = ["## Regions", ""]
    if "regions" in figures:
        lines += ["What each pathway calls a region, on a few validation clips (one sampled frame each): "
                  "the detector's real boxes coloured by score, the argmax of the RegionLearner's masks.", "",
                  f"![regions per pathway]({Path(figures['regions']).name})", "",
                  "Top-5 clips each pathway retrieves for a few validation captions (the true clip outlined):", "",
                  f"![top-5 retrieved clips per pathway]({Path(figures['retrieval']).name})", ""]
    else:
        lines += [f"No region figures: {figures.get('note', 'not drawn')}", ""]
    return lines


def write_report(runs: Sequence[RunResult], out_dir: str | os.PathLike, *, title: str = "Detector vs learned regions",
                 setup: Mapping[str, Any] | None = None, device: str | None = None,
                 figures: Mapping[str, str] | None = None, qa: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``out_dir/report.md`` + PNG plots + ``summary.json``; returns the summary.
    ``figures``: what :func:`region_figures` returned (a "Regions" section); ``qa``: the
    QA stage's metrics (a "Video QA" table and ``qa.png``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError("no runs to report")
    num_videos = next((r.final.get("num_videos") for r in runs if r.final.get("num_videos")), None)
    chance = 100.0 / num_videos if num_videos else None
    plots = {"r1_steps": "r1_vs_steps.png", "r1_time": "r1_vs_time.png", "loss": "loss.png", "cost": "cost.png"}
    _plot_curves(runs, "step", out / plots["r1_steps"], "steps", chance)
    _plot_curves(runs, "elapsed", out / plots["r1_time"], "wall-clock seconds", chance)
    _plot_loss(runs, out / plots["loss"])
    _plot_cost(runs, out / plots["cost"])

    lines = [f"# {title}", ""]
    if setup:
        lines += ["Both pathways ran with the same data, losses, steps and seed:", ""]
        lines += [f"- `{k}`: `{v}`" for k, v in setup.items()]
        lines.append("")
    if device:
        lines += [f"Device: {device}", ""]
    lines += ["## Final metrics (val)", ""]
    if chance is not None:
        lines += [f"{num_videos} val videos; chance text→video R@1 = {chance:.2f} %.", ""]
    lines.append("| metric | " + " | ".join(r.name for r in runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    keys = [k for k in FINAL_KEYS if any(k in r.final for r in runs)] + ["num_videos", "num_texts"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(r.final.get(k)) for r in runs) + " |")
    if chance:
        lines.append("| t2v_r1 / chance | " + " | ".join(
            _fmt(r.final["t2v_r1"] / chance if "t2v_r1" in r.final else None) + ("×" if "t2v_r1" in r.final else "")
            for r in runs) + " |")
    lines += ["", "## Cost", "", "| | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
    lines.append("| steps | " + " | ".join(_fmt(r.steps) for r in runs) + " |")
    lines.append("| final training loss | " + " | ".join(_fmt(r.final_loss) for r in runs) + " |")
    lines.append("| throughput (clips/s) | " + " | ".join(_fmt(r.clips_per_s) for r in runs) + " |")
    lines.append("| peak memory | " + " | ".join(_fmt_bytes(r.peak_bytes) for r in runs) + " |")
    lines.append("| training wall-clock (s) | " + " | ".join(_fmt(r.train_seconds) for r in runs) + " |")
    lines += ["", "## Plots", "",
              f"![R@1 over steps]({plots['r1_steps']})", "",
              f"![R@1 over wall-clock]({plots['r1_time']})", "",
              f"![training loss]({plots['loss']})", "",
              f"![throughput and peak memory]({plots['cost']})", ""]
    if qa:
        lines += qa_section(qa, out, _figure)
    if figures is not None:
        lines += _figure_lines(figures)
    lines += ["## Runs", ""]
    lines += [f"- {r.name}: `{r.run_dir}`" for r in runs]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    summary: dict[str, Any] = {
        "report": str(out / "report.md"),
        "plots": [str(out / p) for p in plots.values()],
        "chance_r1": chance,
    }
    if figures is not None:
        summary["figures"] = dict(figures)
    if qa:
        summary["qa"] = dict(qa)
    for r in runs:
        summary[r.name] = {**r.final, "clips_per_s": r.clips_per_s, "peak_bytes": r.peak_bytes,
                           "steps": r.steps, "final_loss": r.final_loss, "train_seconds": r.train_seconds,
                           "run_dir": r.run_dir, "curve": r.val}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Report on finished run directories (names default to each run's model.regions)."""
    if len(run_dirs) < 2:
        raise UserError("compare needs two run directories (detector and learned)")
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
    """Both pathways must share data, losses, steps and seed; raise naming what differs."""
    (na, a), (nb, b) = list(cfgs.items())[:2]
    differ = [k for k in SHARED_KEYS if _select(a, k) != _select(b, k)]
    if differ:
        detail = "; ".join(f"{k}: {na}={_select(a, k)!r} {nb}={_select(b, k)!r}" for k in differ[:3])
        raise UserError(f"compare: the two configs differ in {', '.join(differ)} ({detail}); "
                        f"set them equal (shared key=value overrides apply to both)")


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
    return evaluate_model(model, cfg, "val", batch_transform=transform, device=device)


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
            isolate: bool = True) -> dict[str, Any]:
    """Train each config (``{"detector": cfg, "learned": cfg}``) under one budget into
    ``out_dir/<name>`` and write the report. Periodic validation is switched on
    (``val_points`` evaluations over the run) when the configs leave it at the end only.
    ``isolate``: each training in its own spawned process (clean peak memory per pathway)."""
    if len(cfgs) != 2:
        raise UserError("compare trains exactly two configs")
    check_same_budget(cfgs)
    if any(cfg.qa.enabled for cfg in cfgs.values()):
        raise UserError("compare trains retrieval runs first; for video QA leave qa.enabled=false and set "
                        "qa.stage_steps=N (a QA head fine-tuned N steps from each retrieval run)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, cfg in cfgs.items():
        if not list(cfg.data.val.urls):
            raise UserError("compare needs validation shards: set data.val.urls")
        cfg.run.out_dir = str(out / name)
        if int(cfg.train.val_every) <= 0:
            cfg.train.val_every = max(1, int(cfg.train.max_steps) // max(1, val_points))
        print(f"compare: training {name} pathway for {cfg.train.max_steps} steps → {cfg.run.out_dir}",
              file=sys.stderr, flush=True)
        result = train_isolated(cfg, out / f".{name}.result.json") if isolate else train_in_process(cfg)
        run = read_run(cfg.run.out_dir, name)
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
    first = next(iter(cfgs.values()))
    setup = {k: _select(first, k) for k in ("seed", "train.max_steps", "data.batch_size", "data.num_frames",
                                            "data.size", "data.train.urls", "data.val.urls", "loss")}
    qa, qa_seconds = None, None
    if wants_qa(cfgs):
        print("compare: QA stage, a QA head from each retrieval run", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        qa = run_qa_stage(cfgs, out, train_isolated if isolate else train_in_process)
        qa_seconds = time.perf_counter() - t0

    device = resolve_device(str(first.run.device))
    summary = write_report(runs, out, setup=setup, device=device_name(device),
                           figures=region_figures(runs, out, str(device)), qa=qa)
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
                 runs: Sequence[str] | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The ``compare`` command: ``runs`` (two finished run dirs) or train ``detector`` and
    ``learned`` configs with the shared ``overrides``."""
    if runs:
        if detector or learned or overrides:
            raise UserError("compare: give either --runs A B or --detector/--learned configs (+ overrides), not both")
        return compare_runs(runs, out)
    if not (detector and learned):
        raise UserError("compare: give --detector CONFIG and --learned CONFIG to train both, or --runs RUN_A RUN_B")

    cfgs = {"detector": load_config(detector, overrides), "learned": load_config(learned, overrides)}
    for name, cfg in cfgs.items():
        if str(cfg.model.regions) != name:
            raise UserError(f"compare: --{name} config has model.regions={cfg.model.regions}; it must be {name}")
    return compare(cfgs, out)
