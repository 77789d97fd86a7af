"""The QA stage of ``regionvlp compare`` / ``make demo``: after each pathway's retrieval
run, a QA head fine-tuned from it (``qa.stage_steps`` > 0 in the compare configs), the
final QA metrics, and the report's QA table and plot.

The QA run is the retrieval config with ``qa.enabled``, ``train.init_from`` = the
retrieval run, ``train.max_steps`` = ``qa.stage_steps`` (``optim.lr`` = ``qa.stage_lr``
when set) into ``OUT/<pathway>_qa``; it trains without periodic validation and is
evaluated once at the end on ``data.val.urls`` (:func:`regionvlp.qa.evaluate.evaluate_qa`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from regionvlp.data.qa import QUESTION_TYPES

QA_PLOT = "qa.png"


def stage_config(cfg: Any, retrieval_run: str | Path, out_dir: str | Path) -> Any:
    """The QA fine-tuning config that follows a retrieval run of ``cfg``."""
    qa_cfg = copy.deepcopy(cfg)
    qa_cfg.qa.enabled = True
    qa_cfg.qa.vocab = "auto"
    qa_cfg.train.init_from = str(retrieval_run)
    qa_cfg.train.resume = "none"
    qa_cfg.train.max_steps = int(cfg.qa.stage_steps)
    qa_cfg.train.val_every = 0
    qa_cfg.train.ckpt_every = int(cfg.qa.stage_steps)
    qa_cfg.train.frame_curriculum = []
    if float(cfg.qa.stage_lr) > 0:
        qa_cfg.optim.lr = float(cfg.qa.stage_lr)
    qa_cfg.optim.warmup_steps = min(int(cfg.optim.warmup_steps), max(1, int(cfg.qa.stage_steps) // 10))
    qa_cfg.run.out_dir = str(out_dir)
    return qa_cfg


def wants_qa(cfgs: Mapping[str, Any]) -> bool:
    return any(int(cfg.qa.stage_steps) > 0 for cfg in cfgs.values())


def run_qa_stage(cfgs: Mapping[str, Any], out: Path, train_fn: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``{"detector": metrics, "learned": metrics, "majority": accuracy}``; ``train_fn(cfg,
    result_file, eval_urls=...)`` trains one config, evaluates it on ``eval_urls`` and returns
    ``{"summary", "final", "train_seconds"}`` (compare's isolated or in-process trainer)."""
    result: dict[str, Any] = {}
    for name, cfg in cfgs.items():
        qa_cfg = stage_config(cfg, cfg.run.out_dir, out / f"{name}_qa")
        val_urls = list(qa_cfg.data.val.urls)
        qa_cfg.data.val.urls = []  # no validation inside the run: one evaluation at the end
        outcome = train_fn(qa_cfg, out / f".{name}_qa.result.json", eval_urls=val_urls)
        final = {k: v for k, v in outcome["final"].items() if k not in ("skipped", "world_size")}
        final.update(steps=outcome["summary"].get("steps"), final_loss=outcome["summary"].get("final_loss"),
                     train_seconds=outcome.get("train_seconds"), run_dir=qa_cfg.run.out_dir)
        result[name] = final
    result["majority"] = next(m["qa_majority_accuracy"] for k, m in result.items() if k != "majority")
    return result


def plot_qa(qa: Mapping[str, Any], path: Path, figure: Callable) -> None:
    """Overall and per-question-type accuracy per pathway, the majority baseline dashed."""
    names = [k for k in qa if k != "majority"]
    kinds = [k for k in QUESTION_TYPES if any(qa[n].get(f"qa_count_{k}") for n in names)]
    with figure(path, ncols=2, figsize=(9.0, 3.6)) as (a, b):
        a.bar(names, [qa[n]["qa_accuracy"] for n in names], color=[f"C{i}" for i in range(len(names))])
        a.axhline(qa["majority"], color="grey", linestyle="--", linewidth=1, label="majority answer")
        a.set_ylabel("accuracy (%)")
        a.set_title("val QA accuracy")
        a.legend()
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            xs = [j + i * width for j in range(len(kinds))]
            b.bar(xs, [qa[n].get(f"qa_accuracy_{k}") or 0.0 for k in kinds], width=width, label=n)
        b.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(kinds))], kinds)
        b.set_ylabel("accuracy (%)")
        b.set_title("by question type")
        b.legend()


def qa_report_lines(qa: Mapping[str, Any]) -> list[str]:
    """The report's QA section (table + plot link)."""
    names = [k for k in qa if k != "majority"]
    lines = ["## Video QA (val)", "",
             "Each pathway's QA head fine-tuned from its retrieval run (same steps, data and seed); "
             "answers are classes of the training answer vocabulary.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("qa_accuracy", "qa_accuracy"), ("majority-answer accuracy", "qa_majority_accuracy"),
            ("accuracy / majority", None)]
    rows += [(f"qa_accuracy_{k}", f"qa_accuracy_{k}") for k in QUESTION_TYPES
             if any(qa[n].get(f"qa_count_{k}") for n in names)]
    rows += [("questions", "num_questions"), ("QA steps", "steps"), ("QA wall-clock (s)", "train_seconds")]
    for label, key in rows:
        cells = [_ratio(qa[n]) if key is None else _fmt(qa[n].get(key)) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", f"![QA accuracy per pathway and question type]({QA_PLOT})", ""]


def _ratio(m: Mapping[str, Any]) -> str:
    acc, maj = m.get("qa_accuracy"), m.get("qa_majority_accuracy")
    return f"{acc / maj:.2f}×" if acc is not None and maj else "–"


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def qa_section(qa: Mapping[str, Any], out: Path, figure: Callable) -> list[str]:
    """Draw ``out/qa.png`` and return the report lines for it."""
    plot_qa(qa, out / QA_PLOT, figure)
    return qa_report_lines(qa)
