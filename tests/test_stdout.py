"""stdout is only the JSON result: DeepSpeed's op-builder lines, its logger, library
prints and warnings go to stderr (``regionvlp.runtime.json_stdout``). Run as the user
runs them: the console script in a subprocess, stdout parsed line by line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("stdout_synth")
    s = synth(out, videos=4, val_videos=2, size=64, frames=4, shard_size=100, progress=False)
    return s["train"]["urls"], s["val"]["urls"]


def run_cli(*args: str) -> list[dict]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([str(BIN / "regionvlp"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines, p.stderr[-2000:]
    return [json.loads(line) for line in lines]  # every line is JSON, or this raises


def test_train_stdout_is_only_the_summary(shards, tmp_path):
    train, val = shards
    out = run_cli("train", str(ROOT / "configs" / "tiny" / "detector.yaml"), f"data.train.urls=['{train}']",
                  f"data.val.urls=['{val}']", f"run.out_dir={tmp_path / 'run'}", "train.max_steps=2",
                  "data.batch_size=2")
    assert len(out) == 1 and out[0]["steps"] == 2


def test_compare_stdout_is_only_the_summary(shards, tmp_path):
    train, val = shards
    tiny = ROOT / "configs" / "tiny"
    out = run_cli("compare", "--out", str(tmp_path / "cmp"), "--detector", str(tiny / "detector.yaml"),
                  "--learned", str(tiny / "learned.yaml"), f"data.train.urls=['{train}']", f"data.val.urls=['{val}']",
                  "train.max_steps=1", "train.val_every=1", "train.ckpt_every=1", "data.batch_size=2")
    assert len(out) == 1 and "detector" in out[0] and "learned" in out[0]


def test_json_stdout_moves_fd1_prints_and_stdout_loggers(capfd):
    import logging

    from regionvlp.runtime import json_stdout, print_json

    chatty = logging.getLogger("third.party")
    handler = logging.StreamHandler(sys.stdout)  # as DeepSpeed binds its logger at import
    chatty.addHandler(handler)
    try:
        with json_stdout():
            print("op built successfully")
            chatty.warning("from a logger")
            os.write(1, b"from C or a child process\n")
            subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
            print_json({"ok": 1})
        print_json({"after": 2})
    finally:
        chatty.removeHandler(handler)
    captured = capfd.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [{"ok": 1}, {"after": 2}]
    for text in ("op built successfully", "from a logger", "from C or a child process", "from a child"):
        assert text in captured.err
