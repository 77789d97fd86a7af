"""run.report_to: names validated, wandb missing is one clear error, and a tiny run
logged to W&B offline keeps its W&B run id across a resume, with its metrics, config
and protocol in the offline run files."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from regionvlp.config import ConfigError, load_config
from regionvlp.errors import UserError
from regionvlp.train import trackers

ROOT = Path(__file__).resolve().parents[1]


def test_report_to_is_validated():
    assert list(load_config(None, []).run.report_to) == ["tensorboard"]
    assert list(load_config(None, ["run.report_to=[tensorboard,wandb]"]).run.report_to) == ["tensorboard", "wandb"]
    assert list(load_config(None, ["run.report_to=[]"]).run.report_to) == []
    for bad in ("[mlflow]", "[wandb,wandb]"):
        with pytest.raises(ConfigError, match="run.report_to"):
            load_config(None, [f"run.report_to={bad}"])


def test_wandb_missing_says_how_to_install(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r"pip install 'regionvlp\[wandb\]'"):
        trackers.check_report_to(["tensorboard", "wandb"])
    trackers.check_report_to(["tensorboard"])


def wandb_records(path: Path):
    """The protobuf records of a W&B ``run-ID.wandb`` file (its LevelDB-log framing:
    32 KiB blocks of [crc u32, length u16, type u8] chunks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            pos += left - 7
            continue
        buf, pos = buf + data[pos:pos + n], pos + n
        if kind in (1, 4):  # FULL or LAST chunk: one record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_resumes_the_same_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the test extra")
    from regionvlp.data.synth import synth
    from regionvlp.train import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    s = synth(tmp_path / "data", videos=4, val_videos=2, size=64, frames=4, shard_size=100, progress=False)
    out = tmp_path / "run"
    common = [f"data.train.urls=['{s['train']['urls']}']", "data.val.urls=[]", f"run.out_dir={out}",
              "data.batch_size=2", "train.log_every=1", "run.report_to=[wandb]", "run.name=tiny-wandb"]
    config = str(ROOT / "configs" / "tiny" / "learned.yaml")
    assert run(config, common + ["train.max_steps=2"])["steps"] == 2
    run_id = (out / trackers.WANDB_ID).read_text().strip()
    assert run(config, common + ["train.max_steps=3", "train.resume=auto"])["steps"] == 3
    assert (out / trackers.WANDB_ID).read_text().strip() == run_id
    assert not (out / "tensorboard").exists()  # only what report_to names

    files = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    deadline = time.time() + 30  # wandb-core may still be writing the last records after finish() returns
    while time.time() < deadline and not all(any(r.WhichOneof("record_type") == "exit" for r in wandb_records(f))
                                             for f in files):
        time.sleep(0.2)
    steps, config_keys = [], set()
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                assert "loss" in items
                steps.append(items["_step"])
            elif kind == "run":
                assert r.run.run_id == run_id and r.run.project == "tiny-wandb"
                config_keys |= {u.key for u in r.run.config.update}
                proto = {u.key: json.loads(u.value_json) for u in r.run.config.update}.get("protocol")
                if proto:
                    assert proto["pathway"] == "learned" and proto["global_batch"] == 2
    assert steps == [1, 2, 3]  # the resumed segment continues the same run's steps
    assert {"config", "protocol"} <= config_keys
