"""Shard sources: spec parsing, http(s) from a loopback server (with retries and byte-range
resume), s3 from a moto_server on loopback, pipe: gating."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest

from data_shards import clip_shards
from emulators import emulator
from regionvlp.config import load_config
from regionvlp.data import build_loader, epoch_size, iter_samples, load_tokenizer, parse_specs
from regionvlp.data import sources
from regionvlp.errors import UserError


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    clip_shards(root, shards=3, per_shard=3)
    return root


def cfg_for(*extra: str):
    return load_config(None, ["data.size=16", "data.num_frames=2", "data.batch_size=2", "data.num_workers=2",
                              "data.retries=3", "data.retry_backoff=0.01", "data.max_words=8", *extra])


def keys_of(stream) -> list[str]:
    return [s["__key__"] for s in stream]


# ------------------------------------------------------------------------ specs
def test_parse_specs_braces_sources_weights_folders(shard_dir):
    sl = parse_specs(["a/{00..02}.tar", "s3://b/x-{a,b}.tar@2.5::https://h/y.tar@1"])
    assert [s.urls for s in sl.sources] == [["a/00.tar", "a/01.tar", "a/02.tar"], ["s3://b/x-a.tar", "s3://b/x-b.tar"],
                                            ["https://h/y.tar"]]
    assert [s.weight for s in sl.sources] == [1.0, 2.5, 1.0]
    assert parse_specs(str(shard_dir)).urls == [str(shard_dir / f"shard-{i:03d}.tar") for i in range(3)]
    assert parse_specs("gs://bucket/{0..1}.tar").urls == ["gs://bucket/0.tar", "gs://bucket/1.tar"]
    with pytest.raises(UserError, match="unsupported scheme 'ftp'"):
        parse_specs("ftp://host/a.tar")
    with pytest.raises(UserError, match="no shard URLs"):
        parse_specs([])


def test_pipe_refused_by_default_allowed_when_asked(shard_dir):
    spec = f"pipe:cat {shard_dir}/shard-{{000..001}}.tar"
    with pytest.raises(UserError, match="data.allow_pipe=true"):
        iter_samples([spec], cfg_for())
    stream = iter_samples([spec, "pipe:exit 3"], cfg_for("data.allow_pipe=true"))
    assert keys_of(stream) == [f"s{s}_{i}" for s in range(2) for i in range(3)]
    assert stream.skipped == {"unreadable_shard": 1}


def test_cli_refuses_pipe_without_flag(shard_dir, capsys):
    from regionvlp.cli import main

    assert main(["data", "inspect", f"pipe:cat {shard_dir}/shard-000.tar"]) == 2
    err = capsys.readouterr().err
    assert "allow_pipe" in err and "Traceback" not in err


# ------------------------------------------------------------------------- http
class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``root`` with byte ranges; ``plan`` scripts failures per path:
    ``503`` answers an error, ``cut`` sends half the body and drops the connection."""

    root: Path
    plan: dict[str, list[str]]
    log: list[tuple[str, str]]

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.log.append((name, self.headers.get("Range", "")))
        action = self.plan.get(name, []).pop(0) if self.plan.get(name) else ""
        if action == "503":
            self.send_error(503)
            return
        path = self.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if action == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture()
def http_server(shard_dir):
    handler = type("H", (_Handler,), {"root": shard_dir, "plan": {}, "log": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_http_shards_with_retries_and_resume(http_server, shard_dir, minilm_dir, monkeypatch):
    base, handler = http_server
    handler.plan.update({"shard-000.tar": ["503", "503"], "shard-001.tar": ["cut"], "shard-002.tar": ["503"] * 9})
    stream = iter_samples([f"{base}/shard-{{000..002}}.tar", f"{base}/missing.tar"], cfg_for())
    keys = keys_of(stream)
    # 000 after two 503s; 001 resumed with a Range request after the cut; 002 gave up
    assert keys == [f"s{s}_{i}" for s in range(2) for i in range(3)]
    assert stream.skipped == {"unreadable_shard": 2}
    assert any(name == "shard-001.tar" and r.startswith("bytes=") and r != "bytes=0-" for name, r in handler.log)
    assert sum(name == "missing.tar" for name, _ in handler.log) == 1  # 404: not retried
    assert epoch_size(cfg_for(f"data.train.urls=['{base}/shard-{{000..002}}.tar']").data.train) == 9

    # the full loader over http with 2 workers (no more scripted failures)
    handler.plan.clear()
    for offset in (0, 1024):  # the shard's whole size (part of a resume position), from any range start
        with sources.open_shard(f"{base}/shard-001.tar", offset=offset) as f:
            assert f.size == (shard_dir / "shard-001.tar").stat().st_size
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = cfg_for(f"data.val.urls=['{base}/shard-{{000..002}}.tar']")
    got = [k for b in build_loader(cfg, "val", training=False, tokenizer=load_tokenizer(str(minilm_dir)))
           for k in b["__key__"]]
    assert sorted(got) == sorted(f"s{s}_{i}" for s in range(3) for i in range(3))


# --------------------------------------------------------------------------- s3
@pytest.fixture(scope="module")
def moto_endpoint():
    with emulator("moto_server", lambda port: ["-H", "127.0.0.1", "-p", str(port)], "'moto[server]'") as url:
        yield url


def test_s3_shards_from_moto_server(moto_endpoint, shard_dir, minilm_dir, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    sources._s3_clients.clear()
    client = sources.s3_client()
    client.create_bucket(Bucket="vids")
    for p in sorted(shard_dir.iterdir()):
        client.upload_file(str(p), "vids", f"train/{p.name}")

    stream = iter_samples(["s3://vids/train/shard-{000..002}.tar", "s3://vids/train/nope.tar"], cfg_for())
    assert keys_of(stream) == [f"s{s}_{i}" for s in range(3) for i in range(3)]
    assert stream.skipped == {"unreadable_shard": 1}
    cfg = cfg_for("data.train.urls=['s3://vids/train/shard-{000..002}.tar']", "data.batch_size=1")
    assert epoch_size(cfg.data.train) == 9

    for offset in (0, 1024):  # the object's whole size (part of a resume position), from any range start
        with sources.open_shard("s3://vids/train/shard-001.tar", offset=offset) as f:
            assert f.size == (shard_dir / "shard-001.tar").stat().st_size

    # DataLoader workers (forked) make their own boto3 clients
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    got = [k for b in build_loader(cfg, "train", training=True, tokenizer=load_tokenizer(str(minilm_dir)))
           for k in b["__key__"]]
    assert sorted(got) == sorted(f"s{s}_{i}" for s in range(3) for i in range(3))

    # the handler is registered with webdataset, so plain wds pipelines read s3:// too
    import webdataset as wds

    sources.register_webdataset_handlers()
    wkeys = [s["__key__"] for s in wds.WebDataset("s3://vids/train/shard-000.tar", shardshuffle=False)]
    assert wkeys == ["s0_0", "s0_1", "s0_2"]

    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (a dead general endpoint is ignored)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    sources._s3_clients.clear()
    assert keys_of(iter_samples(["s3://vids/train/shard-000.tar"], cfg_for())) == ["s0_0", "s0_1", "s0_2"]
    sources._s3_clients.clear()
