"""The ``compare`` report: ``OUT/report.md`` with PNG plots — text→video R@1 over steps
and over wall-clock, training loss over steps, throughput and peak memory per pathway —
a final metrics table, each pathway's own settings, and ``OUT/summary.json`` with the
same figures. :func:`write_report` takes one :class:`RunResult` per pathway (as
:func:`regionvlp.compare.read_run` reads them from run directories), any number of them.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from regionvlp import pathways
from regionvlp.qa.stage import qa_section

FINAL_KEYS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_r50", "t2v_medr", "t2v_meanr",
              "v2t_r1", "v2t_r5", "v2t_r10", "v2t_r50", "v2t_medr", "v2t_meanr", "mc_accuracy")


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
    route: dict[str, Any] = field(default_factory=dict)  # where its regions came from (regionvlp.region_cache)


# -------------------------------------------------------------------- report
def route_lines(runs: Sequence[RunResult]) -> list[str]:
    """Cost-table rows: where each row's training, validation and final-eval regions came
    from, and the one-off extraction a region-cache row paid before training (not in its
    training wall-clock)."""
    if not any(r.route for r in runs):
        return []
    rows = [("regions route", "route"), ("training regions", "train"), ("validation regions", "val"),
            ("final eval regions", "eval")]
    lines = [f"| {label} | " + " | ".join(str(r.route.get(key, "–")) for r in runs) + " |" for label, key in rows]
    if any("extract_seconds" in r.route for r in runs):
        lines.append("| region extraction, once (s) | " + " | ".join(_fmt(r.route.get("extract_seconds")) for r in runs)
                     + " |")
    return lines


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
    colors = [f"C{i}" for i in range(len(runs))]
    with _figure(path, ncols=2, figsize=(7.5, 3.4)) as (a, b):
        a.bar(names, [r.clips_per_s or 0.0 for r in runs], color=colors)
        a.set_title("training throughput")
        a.set_ylabel("clips / s")
        b.bar(names, [(r.peak_bytes or 0) / 2**20 for r in runs], color=colors)
        b.set_title("peak memory")
        b.set_ylabel("MiB")


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


def default_title(runs: Sequence[RunResult]) -> str:
    """"Detector vs learned regions" for runs named detector and learned."""
    title = " vs ".join(r.name for r in runs) + " regions"
    return title[:1].upper() + title[1:]


def settings_lines(settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The report's "Pathways" section: each pathway's registry summary and the config
    sections only it reads (their values are in summary.json)."""
    lines = ["## Pathways", ""]
    for name, own in settings.items():
        entry = pathways.get(name)
        lines.append(f"- `{name}`: {entry.summary}; its own settings: " + ", ".join(f"`{k}`" for k in own))
    return lines + [""]


def protocol_lines(runs: Sequence[RunResult]) -> list[str]:
    """A "Protocol" table (how each final number was obtained), from the eval results'
    ``protocol`` objects; nothing when no run has one."""
    protocols = [r.final.get("protocol") if isinstance(r.final.get("protocol"), dict) else {} for r in runs]
    keys = list(dict.fromkeys(k for p in protocols for k in p))
    if not keys:
        return []
    lines = ["", "## Protocol", "", "| | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join("—" if p.get(k) is None else str(p.get(k)) for p in protocols) + " |")
    return lines


def write_report(runs: Sequence[RunResult], out_dir: str | os.PathLike, *, title: str | None = None,
                 setup: Mapping[str, Any] | None = None, device: str | None = None,
                 figures: Mapping[str, str] | None = None, qa: Mapping[str, Any] | None = None,
                 settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """``out_dir/report.md`` + PNG plots + ``summary.json``; returns the summary.
    ``figures``: what :func:`region_figures` returned (a "Regions" section); ``qa``: the
    QA stage's metrics (a "Video QA" table and ``qa.png``); ``settings``: per pathway the
    values of the config sections its registry entry names (a "Pathways" section)."""
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

    lines = [f"# {title or default_title(runs)}", ""]
    if setup:
        lines += [f"{'Both' if len(runs) == 2 else f'All {len(runs)}'} pathways ran with the same data, losses, "
                  "steps and seed:", ""]
        lines += [f"- `{k}`: `{v}`" for k, v in setup.items()]
        lines.append("")
    if device:
        lines += [f"Device: {device}", ""]
    if settings:
        lines += settings_lines(settings)
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
    lines += protocol_lines(runs)
    lines += ["", "## Cost", "", "| | " + " | ".join(r.name for r in runs) + " |", "|---|" + "---|" * len(runs)]
    lines.append("| steps | " + " | ".join(_fmt(r.steps) for r in runs) + " |")
    lines.append("| final training loss | " + " | ".join(_fmt(r.final_loss) for r in runs) + " |")
    lines.append("| throughput (clips/s) | " + " | ".join(_fmt(r.clips_per_s) for r in runs) + " |")
    lines.append("| peak memory | " + " | ".join(_fmt_bytes(r.peak_bytes) for r in runs) + " |")
    lines.append("| training wall-clock (s) | " + " | ".join(_fmt(r.train_seconds) for r in runs) + " |")
    lines += route_lines(runs)
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
                           "run_dir": r.run_dir, "curve": r.val, **({"route": dict(r.route)} if r.route else {})}
        if settings and r.name in settings:
            summary[r.name]["settings"] = dict(settings[r.name])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


