"""gs:// shards from ``gcp-storage-emulator`` on loopback (``STORAGE_EMULATOR_HOST``):
streaming, sizes.json, DataLoader workers, webdataset, opening at a byte offset, and a
connection cut mid-shard resumed with a Range request at the byte already read."""

from __future__ import annotations

import http.client
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from data_shards import clip_shards
from regionvlp.config import load_config
from regionvlp.data import build_loader, epoch_size, iter_samples, load_tokenizer
from regionvlp.data import buckets, sources

ALL = [f"s{s}_{i}" for s in range(3) for i in range(3)]


@pytest.fixture(scope="module")
def gcs_bucket(gcs_emulator, tmp_path_factory):
    """Bucket ``vids`` on the emulator holding ``train/shard-00{0..2}.tar`` + sizes.json;
    yields (emulator URL, local shard folder)."""
    root = tmp_path_factory.mktemp("gcs")
    clip_shards(root, shards=3, per_shard=3)
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = gcs_emulator
    fs = buckets.gcs_filesystem(10.0)
    fs.mkdir("vids")
    for p in sorted(root.iterdir()):
        fs.put_file(str(p), f"vids/train/{p.name}")
    yield gcs_emulator, root
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture()
def emulator_env(gcs_bucket, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_bucket[0])
    return gcs_bucket


def cfg_for(*extra: str):
    return load_config(None, ["data.size=16", "data.num_frames=2", "data.batch_size=2", "data.num_workers=2",
                              "data.retries=3", "data.retry_backoff=0.01", "data.max_words=8", *extra])


def keys_of(stream) -> list[str]:
    return [s["__key__"] for s in stream]


def test_gs_shards_from_emulator(emulator_env, minilm_dir, monkeypatch):
    _, root = emulator_env
    stream = iter_samples(["gs://vids/train/shard-{000..002}.tar", "gs://vids/train/nope.tar"], cfg_for())
    assert keys_of(stream) == ALL
    assert stream.skipped == {"unreadable_shard": 1}  # a missing object: skipped, counted, not retried
    assert "FileNotFoundError" in stream.bad[-1]["detail"], stream.bad
    cfg = cfg_for("data.train.urls=['gs://vids/train/shard-{000..002}.tar']", "data.batch_size=1")
    assert epoch_size(cfg.data.train) == 9  # sizes.json read from the bucket

    # DataLoader workers (forked) open the bucket themselves
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    got = [k for b in build_loader(cfg, "train", training=True, tokenizer=load_tokenizer(str(minilm_dir)))
           for k in b["__key__"]]
    assert sorted(got) == sorted(ALL)

    # opened at a byte offset: the object's bytes from there (how a resumed position is reached)
    data = (root / "shard-001.tar").read_bytes()
    with sources.open_shard("gs://vids/train/shard-001.tar", offset=1536) as f:
        assert f.size == len(data)  # the object's whole size (part of a resume position)
        assert f.read() == data[1536:]

    import webdataset as wds

    sources.register_webdataset_handlers()
    assert [s["__key__"] for s in wds.WebDataset("gs://vids/train/shard-000.tar", shardshuffle=False)] == \
        ["s0_0", "s0_1", "s0_2"]


class _CutProxy(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to the emulator; a media GET whose turn is in ``cut`` sends its
    headers and half its body, then drops the connection. ``log``: (path, Range)."""

    upstream: str
    cut: set[int]
    log: list[tuple[str, str]]
    media = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range", "")
        self.log.append((self.path, rng))
        up = urlparse(self.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
        conn.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        cut = False
        if "alt=media" in self.path:
            type(self).media += 1
            cut = type(self).media in self.cut
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)
        self.wfile.flush()
        if cut:
            self.close_connection = True


@pytest.fixture()
def cut_proxy(emulator_env, monkeypatch):
    handler = type("P", (_CutProxy,), {"upstream": emulator_env[0], "cut": set(), "log": [], "media": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    yield handler, emulator_env[1]
    server.shutdown()
    server.server_close()


def test_gs_cut_mid_shard_resumes_at_the_byte_read(cut_proxy, monkeypatch):
    handler, root = cut_proxy
    block = 4096
    monkeypatch.setattr(buckets, "GCS_BLOCK_SIZE", block)  # several ranged GETs per shard
    size = (root / "shard-001.tar").stat().st_size
    assert size > 3 * block
    handler.cut = {2}  # the shard's second block comes half and the connection drops
    stream = iter_samples(["gs://vids/train/shard-001.tar"], cfg_for("data.num_workers=0"))
    assert keys_of(stream) == ["s1_0", "s1_1", "s1_2"]  # none lost, none twice
    assert stream.skipped == {}
    media = [(p, r) for p, r in handler.log if "alt=media" in p]
    cut_start = int(media[1][1].split("=")[1].split("-")[0])
    assert cut_start > 0  # the cut block began mid-shard...
    assert 0 < int(media[2][1].split("=")[1].split("-")[0]) <= cut_start  # ...the retry resumed mid-shard

    # gcsfs does not retry on its own: a cut with data.retries=0 ends the shard (counted)
    handler.cut, handler.media, handler.log[:] = {2}, 0, []
    stream = iter_samples(["gs://vids/train/shard-001.tar"], cfg_for("data.num_workers=0", "data.retries=0"))
    assert keys_of(stream) != ["s1_0", "s1_1", "s1_2"]
    assert sum(stream.skipped.values()) == 1, stream.skipped
    assert sum("alt=media" in p for p, _ in handler.log) == 2
