"""launch/gpu_check.sh: every command it would run on a GPU parses with the real CLI, and a
CPU-sized run writes one JSON line per check (a failure becomes an error line, not a gap)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from regionvlp.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_check.sh"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=300)


def test_gpu_commands_parse_with_the_cli():
    proc = _run("--print")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 10
    benches = []
    for line in lines:
        argv = shlex.split(line)
        assert argv[1:3] == ["-m", "regionvlp"]
        args = build_parser().parse_args(argv[3:])  # a wrong flag exits here
        benches.append(argv[4])
        assert getattr(args, "device") == "cuda"
    assert benches == ["regions", "learner", "train", "train", "loss"] + ["train"] * 5
    paper = [build_parser().parse_args(shlex.split(line)[3:]) for line in lines[5:9]]
    assert [Path(a.config).name for a in paper] == ["demovlp_pretrain.yaml", "demovlp_finetune_msrvtt.yaml",
                                                     "regionlearner_pretrain.yaml", "regionlearner_finetune_msrvtt.yaml"]
    assert all((ROOT / a.config).is_file() for a in paper) and [a.regions for a in paper][2:] == ["learned"] * 2
    assert "--size 384 --batch 64 --dtype bf16" in lines[0] and "--batch 256" in lines[4]
    shards = build_parser().parse_args(shlex.split(lines[9])[3:])
    assert shards.source == "region_shards" and shards.regions == "detector" and shards.frames == 1


def _small_check(name: str, out: Path) -> dict:
    """The one JSON line of ``--small --only NAME`` (into a fresh ``out``)."""
    proc = _run("--small", "--only", name, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = out.read_text().splitlines()
    return json.loads(line)


def test_small_run_writes_one_json_line_per_check(tmp_path):
    out = tmp_path / "gpu.jsonl"
    result = _small_check("loss", out)
    assert result["batch"] == 16 and result["device"].startswith("cpu") and "error" not in result
    # a check that fails is recorded as such
    proc = _run("--small", "--only", "loss", "--out", str(out), env={"CHECK_TIMEOUT": "0.01"})
    bad = json.loads(out.read_text().splitlines()[-1])
    assert bad["bench"] == "loss" and bad["rc"] == 124 and "timed out" in bad["error"]
    assert _run("--bogus").returncode == 2


def test_small_train_from_region_shards_against_the_in_loop_detector(tmp_path):
    result = _small_check("train_region_shards", tmp_path / "gpu.jsonl")
    assert "error" not in result, result
    assert result["from"] == "region_shards" and result["extract_clips"] > 0
    assert result["region_shards_per_s"] > 0 and result["in_loop_per_s"] > 0
    assert result["region_shards_vs_in_loop"] == result["region_shards_per_s"] / result["in_loop_per_s"]
    assert 0 <= result["region_shards_data_wait_frac"] <= 1 and 0 <= result["in_loop_data_wait_frac"] <= 1
