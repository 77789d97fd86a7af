"""`regionvlp demo` at reduced size: synth → detector fit → both pathways → eval → report,
through the CLI, with the JSON keys DESIGN.md promises and every figure in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regionvlp.cli import main
from regionvlp.demo import DemoSettings, default_config_dir, load_settings

# the demo's own configs, shrunk: few clips, 2 frames, a few steps, in-process training
TINY = ["demo.videos=12", "demo.val_videos=6", "demo.frames=2", "demo.workers=1", "demo.fit.steps=3",
        "demo.fit.batch_size=4", "demo.isolate=false", "train.max_steps=2", "data.batch_size=4",
        "data.num_frames=2", "data.num_workers=0", "model.detector.num_regions=4", "qa.stage_steps=2"]


def test_demo_configs_load_and_bad_demo_keys_are_errors():
    from regionvlp.config import load_config
    from regionvlp.errors import UserError

    cdir = default_config_dir()
    s = load_settings(cdir / "demo.yaml")
    assert isinstance(s.videos, int) and s.fit.steps > 0
    det, learned = load_config(cdir / "detector.yaml"), load_config(cdir / "learned.yaml")
    assert det.model.regions == "detector" and learned.model.regions == "learned"
    # nothing downloads: random-init tiny backbones and the bundled MiniLM
    assert det.model.detector.arch == "fasterrcnn_tiny" and learned.model.learner.pretrained == "none"
    assert Path(det.model.text.name).is_dir()
    with pytest.raises(UserError, match="demo.vidoes"):
        load_settings(cdir / "demo.yaml", ["demo.vidoes=3"])
    assert DemoSettings().val_videos >= 2


def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]  # stdout: JSON lines only
    summary = lines[-1]
    assert "=== demo: synth" in captured.err and "=== demo: compare" in captured.err  # progress on stderr

    for name in ("detector", "learned"):
        m = summary[name]
        assert m["num_videos"] == 6 and m["num_texts"] >= 6
        for key in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10"):
            assert 0 <= m[key] <= 100
        assert 1 <= m["t2v_medr"] <= 6 and 1 <= m["t2v_meanr"] <= 6  # ranks among the 6 videos
        assert 1 <= m["v2t_medr"] <= m["num_texts"] and 1 <= m["v2t_meanr"] <= m["num_texts"]
    assert summary["chance_r1"] == pytest.approx(100 / 6)
    assert 0.0 <= summary["detector_box_recall"] <= 1.0
    assert set(summary["targets"]) >= {"detector_t2v_r1_ok", "learned_t2v_r1_ok", "box_recall_ok"}
    assert Path(summary["detector_checkpoint"]).is_file()

    report = Path(summary["report"]).read_text()
    assert "| t2v_r1 |" in report and "detector" in report and "learned" in report
    assert "Box recall at IoU 0.5" in report and "## Demo: targets" in report
    assert f"{summary['detector']['t2v_r1']:.2f} %" in report
    for png in Path(summary["report"]).parent.glob("*.png"):
        assert png.stat().st_size > 1000
    for name in ("regions", "retrieval"):  # both pathways' regions, top-5 clips per caption
        assert f"]({name}.png)" in report and (Path(summary["report"]).parent / f"{name}.png").is_file()
    assert json.loads((out / "summary.json").read_text())["report"] == summary["report"]
    # the QA stage: a QA head from each pathway's retrieval run, the majority baseline, a table and a plot
    qa = summary["qa"]
    assert set(qa) == {"detector", "learned", "majority"} and 0 < qa["majority"] < 100
    for name in ("detector", "learned"):
        assert qa[name]["steps"] == 2 and qa[name]["num_questions"] >= 6 and qa[name]["qa_duplicates"] == 0
        assert 0 <= qa[name]["qa_accuracy"] <= 100 and qa[name]["qa_majority_accuracy"] == qa["majority"]
        assert isinstance(summary["targets"][f"{name}_qa_ok"], bool)
    assert "## Video QA (val)" in report and "](qa.png)" in report and (out / "report" / "qa.png").is_file()
    assert "QA accuracy ≥ 2 × majority" in report
    # the detector row's route: regions extracted once for training and validation, the final eval in the loop
    assert summary["detector"]["route"]["route"] == "region-cache" and summary["learned"]["route"]["route"] == "in-loop"
    assert "| regions route | region-cache | in-loop |" in report and "(`compare --region-cache`)" in report
    assert (out / "report" / "region_cache" / "detector" / "train" / "sizes.json").is_file()


def test_rerun_replaces_only_previous_demo_runs(tmp_path):
    from regionvlp.demo import _clear_previous_runs

    report = tmp_path / "report"
    (report / "detector" / "checkpoints").mkdir(parents=True)
    (report / "detector" / "metrics.jsonl").write_text("{}\n")
    (report / "learned").mkdir()
    (report / "learned" / "notes.txt").write_text("not a run dir")  # kept: not a demo run
    (report / "report.md").write_text("# old")
    (report / "region_cache" / "detector" / "train").mkdir(parents=True)
    (report / "region_cache" / "detector" / "train" / "extract.json").write_text("{}")  # the old detector's regions
    _clear_previous_runs(report)
    assert not (report / "detector").exists() and not (report / "region_cache").exists()
    assert (report / "learned" / "notes.txt").exists() and (report / "report.md").exists()
