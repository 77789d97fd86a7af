"""A hung endpoint (accepts connections, never answers) is skipped within
data.read_timeout_s × (1 + data.retries); the abort after an outage names the source,
the endpoint and how many shards could not be read, as the last line on stderr."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from regionvlp.config import ConfigError, load_config
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.skips import SkipCounter

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def hung_endpoint():
    """A loopback server that accepts every connection and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def s3_env(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.parametrize("scheme", ["http", "s3", "gs"])
def test_hung_endpoint_skipped_within_timeout_times_tries(hung_endpoint, monkeypatch, scheme):
    pytest.importorskip("boto3") if scheme == "s3" else None
    if scheme == "s3":
        s3_env(monkeypatch, hung_endpoint)
        url = "s3://bucket/000000.tar"
    elif scheme == "gs":  # gcsfs (the test extra) against an emulator host that never answers
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", hung_endpoint)
        url = "gs://bucket/000000.tar"
    else:
        url = f"{hung_endpoint}/000000.tar"
    counter = SkipCounter()
    timeout, retries, backoff = 0.4, 1, 0.05
    start = time.perf_counter()
    got = list(tar_samples([url], counter, ReadOptions(retries=retries, backoff=backoff, timeout=timeout)))
    took = time.perf_counter() - start
    assert got == [] and counter.skipped == {"unreadable_shard": 1}
    tries = 1 + retries
    assert timeout * tries * 0.9 <= took <= timeout * tries + backoff + 2.0, took  # not 60 s per try
    assert "gave up after 1 retries" in counter.bad[0]["detail"]


def test_read_timeout_is_validated():
    assert load_config(None, ["data.read_timeout_s=2.5"]).data.read_timeout_s == 2.5
    for bad in ("0", "-1", "7200"):
        with pytest.raises(ConfigError, match="data.read_timeout_s"):
            load_config(None, [f"data.read_timeout_s={bad}"])


def test_outage_abort_names_source_endpoint_and_count(hung_endpoint, tmp_path):
    pytest.importorskip("boto3")
    env = dict(os.environ, AWS_ENDPOINT_URL=hung_endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    spec = "s3://bucket/train/{000..002}.tar"
    cmd = [str(BIN / "regionvlp"), "train", str(ROOT / "configs" / "tiny" / "learned.yaml"),
           f"data.train.urls=['{spec}']", "data.val.urls=[]", f"run.out_dir={tmp_path / 'run'}",
           "data.read_timeout_s=0.3", "data.retries=0", "data.retry_backoff=0.01"]
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    took = time.perf_counter() - start
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("regionvlp: error: no training batch for a whole epoch"), p.stderr[-2000:]
    assert f"3 of 3 shards of {spec} (endpoint {hung_endpoint})" in last
    assert "data.batch_size" not in last and "Read timeout" in last
    assert took < 120  # 2 epochs x 3 shards x 0.3 s of waiting, plus start-up (not 3 x 730 s)
