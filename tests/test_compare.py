"""`compare`: the report from two run directories, and the budget check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regionvlp.compare import check_same_budget, compare_runs, read_run
from regionvlp.config import load_config
from regionvlp.errors import UserError


def fake_run(run_dir: Path, regions: str, r1s: list[float], seconds_per_step: float) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl, summary.json, config.yaml."""
    run_dir.mkdir(parents=True)
    lines = []
    t0 = 1_700_000_000.0
    for step in range(1, 9):
        lines.append({"step": step, "time": t0 + step * seconds_per_step, "loss": 4.0 - 0.3 * step})
        if step % 4 == 0:
            r1 = r1s[step // 4 - 1]
            lines.append({"step": step, "time": t0 + step * seconds_per_step + 0.5, "val/t2v_r1": r1,
                          "val/t2v_r5": min(100.0, 3 * r1), "val/v2t_r1": r1 / 2, "val/num_videos": 20,
                          "val/num_texts": 40, "val/loss": 3.0})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 9, \"lo")
    (run_dir / "summary.json").write_text(json.dumps({"steps": 8, "final_loss": 1.6, "clips_per_s": 3.5,
                                                      "peak_bytes": 512 * 2**20}))
    (run_dir / "config.yaml").write_text(f"model:\n  regions: {regions}\n")
    return run_dir


def test_read_run_parses_curves_and_ignores_torn_line(tmp_path):
    run = read_run(fake_run(tmp_path / "a", "detector", [10.0, 25.0], 2.0))
    assert run.name == "detector"
    assert [v["step"] for v in run.val] == [4, 8]
    assert run.val[0]["elapsed"] == pytest.approx(6.5)  # from the first record's time
    assert run.final["t2v_r1"] == 25.0 and run.final["num_videos"] == 20
    assert len(run.loss) == 8 and run.loss[-1] == (8, pytest.approx(1.6))
    assert run.clips_per_s == 3.5 and run.peak_bytes == 512 * 2**20


def test_compare_runs_writes_report_with_both_pathways(tmp_path):
    a = fake_run(tmp_path / "runs" / "det", "detector", [10.0, 25.0], 2.0)
    b = fake_run(tmp_path / "runs" / "learn", "learned", [5.0, 15.0], 1.0)
    summary = compare_runs([a, b], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| metric | detector | learned |" in report
    assert "| t2v_r1 | 25.00 | 15.00 |" in report
    assert "| t2v_r1 / chance | 5.00× | 3.00× |" in report
    assert "512 MiB" in report and "chance text→video R@1 = 5.00 %" in report
    for png in summary["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
        assert f"({Path(png).name})" in report
    assert summary["detector"]["t2v_r1"] == 25.0 and summary["learned"]["t2v_r1"] == 15.0
    # run dirs without checkpoints: the report says why it has no region pictures
    assert "## Regions" in report and "No region figures:" in report and "no trained model" in report
    assert "no trained model" in summary["figures"]["note"]
    assert summary["chance_r1"] == 5.0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["learned"]["clips_per_s"] == 3.5


def test_a_drawing_failure_costs_the_report_only_its_pictures(tmp_path, monkeypatch):
    from regionvlp import compare as compare_mod

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(compare_mod, "report_figures", broken)
    a = fake_run(tmp_path / "runs" / "det", "detector", [10.0, 25.0], 2.0)
    b = fake_run(tmp_path / "runs" / "learn", "learned", [5.0, 15.0], 1.0)
    summary = compare_runs([a, b], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| t2v_r1 | 25.00 | 15.00 |" in report
    assert "No region figures: drawing them failed (RuntimeError: out of memory)" in report
    assert summary["figures"]["note"].startswith("drawing them failed")


def test_compare_runs_needs_validation_records(tmp_path):
    a = fake_run(tmp_path / "a", "detector", [10.0, 25.0], 2.0)
    b = tmp_path / "b"
    b.mkdir()
    (b / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(UserError, match="no validation records"):
        compare_runs([a, b], tmp_path / "out")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        compare_runs([a, tmp_path / "missing"], tmp_path / "out")


def test_budget_check_names_the_differing_keys():
    a = load_config(overrides=["model.regions=detector", "train.max_steps=10"])
    b = load_config(overrides=["model.regions=learned", "train.max_steps=20", "seed=3"])
    with pytest.raises(UserError, match="seed, .*train.max_steps"):
        check_same_budget({"detector": a, "learned": b})
    check_same_budget({"detector": a, "learned": load_config(overrides=["model.regions=learned", "train.max_steps=10"])})


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[str, str]:
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    s = synth(out, videos=8, val_videos=3, size=64, frames=4, shard_size=100, progress=False)
    return s["train"]["urls"], s["val"]["urls"]


def tiny_configs(train_urls: str, val_urls: str) -> dict:
    """Both tiny pathways for 2 steps on the same shards (validated at step 2)."""
    root = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    shared = ["train.max_steps=2", "train.val_every=2", "data.batch_size=2", "train.ckpt_every=2"]
    cfgs = {name: load_config(root / f"{name}.yaml", shared) for name in ("detector", "learned")}
    for cfg in cfgs.values():
        cfg.data.train.urls = [train_urls]
        cfg.data.val.urls = [val_urls]
    return cfgs


def test_compare_trains_both_tiny_pathways_and_reports(tmp_path, tiny_shards, capsys):
    """Both tiny configs, same data/steps/seed, trained by regionvlp.train.train; the
    report has both pathways' curves, final metrics, throughput and peak memory."""
    from regionvlp.compare import compare

    root = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    train_urls, val_urls = tiny_shards
    cfgs = tiny_configs(train_urls, val_urls)
    summary = compare(cfgs, tmp_path / "cmp", isolate=False)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| metric | detector | learned |" in report
    for name in ("detector", "learned"):
        res = summary[name]
        assert res["num_videos"] == 3 and res["num_texts"] >= 3
        assert 0.0 <= res["t2v_r1"] <= 100.0 and res["t2v_meanr"] >= 1.0
        assert [v["step"] for v in res["curve"]] == [2]  # the trainer's validation, read back
        assert res["clips_per_s"] > 0 and res["peak_bytes"] > 0 and res["steps"] == 2
        assert (tmp_path / "cmp" / name / "metrics.jsonl").is_file()
    assert summary["chance_r1"] == pytest.approx(100 / 3)
    assert all(Path(p).stat().st_size > 1000 for p in summary["plots"])
    for name in ("regions", "retrieval"):  # pictures of both pathways' regions and top-5 clips
        png = tmp_path / "cmp" / f"{name}.png"
        assert summary["figures"][name] == str(png) and f"]({name}.png)" in report
        assert png.read_bytes()[:4] == b"\x89PNG" and 1000 < png.stat().st_size < 500_000

    # `regionvlp eval` on the exported detector run gives the compare's final numbers
    from regionvlp.checkpoint import export
    from regionvlp.cli import main

    export(tmp_path / "cmp" / "detector", tmp_path / "export")
    capsys.readouterr()
    assert main(["eval", str(root / "detector.yaml"), "--checkpoint", str(tmp_path / "export"),
                 f"data.val.urls=[{val_urls}]", "data.batch_size=2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["regions"] == "detector" and out["num_videos"] == 3
    for key in ("t2v_r1", "t2v_r5", "t2v_medr", "t2v_meanr", "v2t_r1", "v2t_meanr", "num_texts"):
        assert out[key] == pytest.approx(summary["detector"][key], abs=1e-6), key


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    from regionvlp.cli import main

    root = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    assert main(["eval", str(root / "detector.yaml"), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "c"), "--detector", str(root / "detector.yaml")]) == 2
    assert "--learned" in capsys.readouterr().err


def test_region_cache_route_trains_the_detector_from_extracted_regions(tmp_path, tiny_shards, monkeypatch):
    """--region-cache: the detector row trains and validates from regions extracted once,
    its final eval runs the detector in the loop on the raw val frames; the learned row is
    untouched; the report says which route each row took."""
    from omegaconf import OmegaConf

    from regionvlp.compare import compare
    from regionvlp.region_cache import RegionCache

    train_urls, val_urls = tiny_shards
    cfgs = tiny_configs(train_urls, val_urls)
    import regionvlp.compare as cmp

    final_evals = {}

    def recording_eval(model, cfg, split, batch_transform=None, **kw):
        final_evals[str(cfg.model.regions)] = (list(cfg.data.val.urls), batch_transform is not None)
        return evaluate_model(model, cfg, split, batch_transform=batch_transform, **kw)

    evaluate_model = cmp.evaluate_model
    monkeypatch.setattr(cmp, "evaluate_model", recording_eval)
    summary = compare(cfgs, tmp_path / "cmp", isolate=False, region_cache=RegionCache(tmp_path / "cache", frames=4))
    det, learned = summary["detector"]["route"], summary["learned"]["route"]
    assert det["route"] == "region-cache" and learned["route"] == "in-loop"
    assert "4 frames stored per clip, 8 clips" in det["train"] and det["eval"].startswith("frames")
    assert "2 frames stored per clip, 3 clips" in det["val"]  # data.num_frames, as evaluation samples them
    cache = tmp_path / "cache" / "detector"
    assert json.loads((cache / "train" / "sizes.json").read_text()) == {Path(train_urls).name: 8}
    saved = OmegaConf.load(tmp_path / "cmp" / "detector" / "config.yaml")
    assert [Path(u).parent for u in saved.data.train.urls] == [cache / "train"]  # trained from the cache
    assert [Path(u).parent for u in saved.data.val.urls] == [cache / "val"]  # validated from it
    assert final_evals["detector"] == ([val_urls], True)  # the final eval: raw frames, the detector in the loop
    assert summary["detector"]["num_videos"] == 3 and [v["step"] for v in summary["detector"]["curve"]] == [2]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| regions route | region-cache | in-loop |" in report
    assert "| region extraction, once (s) |" in report
    assert set(summary["figures"]) == {"regions", "retrieval"}  # drawn on the raw val frames
    assert f"- `data.train.urls`: `['{train_urls}']`" in report  # the budget line names the clips, not the cache


def test_region_cache_flags_are_checked(tmp_path, capsys):
    from regionvlp.cli import main

    root = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    assert main(["compare", "--out", str(tmp_path / "c"), "--learned", str(root / "learned.yaml"),
                 "--detector", str(root / "detector.yaml"), "--region-cache-frames", "8"]) == 2
    assert "need --region-cache DIR" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "c"), "--pathways", "learned,fused",
                 "--config", f"learned={root / 'learned.yaml'}", "--config", f"fused={root / 'fused.yaml'}",
                 "--region-cache", str(tmp_path / "cache")]) == 2
    assert "none of learned, fused trains from region shards" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "c"), "--learned", str(root / "learned.yaml"),
                 "--detector", str(root / "detector.yaml"), "--region-cache", str(tmp_path / "cache"),
                 "--region-cache-frames", "0"]) == 2
    assert "--region-cache-frames 0" in capsys.readouterr().err


def test_region_cache_keeps_the_sources_weights():
    """`a@3 :: {b,c}` resampled draws a 3:1 source, then a shard in it: the cached shards
    keep that (each its own source at weight / count); equal weights stay plain paths."""
    from regionvlp.data.sources import parse_specs
    from regionvlp.region_cache import cached_urls

    assert cached_urls([(1.0, 2), (1.0, 2)], ["a", "b", "c", "d"]) == ["a", "b", "c", "d"]
    assert cached_urls([(2.0, 2), (1.0, 1)], ["a", "b", "c"]) == ["a", "b", "c"]  # 1 per shard either way
    urls = cached_urls([(3.0, 1), (1.0, 2)], ["/r/a.tar", "/r/b.tar", "/r/c.tar"])
    assert urls == ["/r/a.tar@3.0", "/r/b.tar@0.5", "/r/c.tar@0.5"]
    sources = parse_specs(urls).sources
    assert [(s.urls, s.weight) for s in sources] == [(["/r/a.tar"], 3.0), (["/r/b.tar"], 0.5), (["/r/c.tar"], 0.5)]
