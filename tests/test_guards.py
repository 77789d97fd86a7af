"""Config and run-side guards of issue 25: the deepspeed section, memory bounds, config
file budgets, one run per folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regionvlp.cli import main
from regionvlp.config import MAX_CONFIG_BYTES, QUOTE_CHARS, load_config
from regionvlp.data.sources import MAX_SPEC_URLS, parse_specs
from regionvlp.errors import ConfigError, UserError
from regionvlp.runfolder import LOCK_NAME, FolderLock

TINY = str(Path(__file__).parents[1] / "configs/tiny/detector.yaml")


# ------------------------------------------------------------- deepspeed section
@pytest.mark.parametrize("override, words", [
    ("deepspeed.fp16=true", ["deepspeed.fp16", "mapping"]),
    ("deepspeed.zero_optimization.stage=abc", ["zero_optimization.stage", "choose 0, 1, 2 or 3"]),
    ("deepspeed.flops_profiler.output_file=/tmp/flops.txt", ["flops_profiler.output_file", "outside run.out_dir"]),
    ("deepspeed.csv_monitor.output_path=../elsewhere", ["csv_monitor.output_path", "outside run.out_dir"]),
    ("deepspeed.tensorboard.output_path=/etc", ["tensorboard.output_path", "outside run.out_dir"]),
    ("deepspeed.tensorboard.job_name=../../x", ["tensorboard.job_name", "plain name"]),
    ("deepspeed.csv_monitor.enabled=true", ["csv_monitor.enabled", "output_path"]),
    ("deepspeed.zero_optimization.offload_optimizer.nvme_path=/x", ["unknown", "offload_optimizer.nvme_path"]),
    ("deepspeed.some_future_key=1", ["unknown config key 'deepspeed.some_future_key'"]),
    ("deepspeed.zero_optimization.reduce_bucket_size=1e30", ["reduce_bucket_size", "an integer from 0"]),
    ("deepspeed.bf16.enabled=yes_please", ["bf16.enabled", "true or false"]),
])
def test_deepspeed_section_is_checked_at_load(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.out_dir=runs/x", override])
    line = str(err.value)
    assert "\n" not in line and all(w in line for w in words), line


def test_deepspeed_paths_inside_the_run_folder_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(None, [f"run.out_dir={out}", "deepspeed.csv_monitor.enabled=true",
                             f"deepspeed.csv_monitor.output_path={out}/csv", "deepspeed.csv_monitor.job_name=j",
                             f"deepspeed.flops_profiler.output_file={out}/flops.txt"])
    assert cfg.deepspeed.csv_monitor.output_path == f"{out}/csv"
    (tmp_path / "link").symlink_to("/tmp")  # a link inside the folder that leads out of it
    with pytest.raises(ConfigError, match="outside run.out_dir"):
        load_config(None, [f"run.out_dir={tmp_path}", f"deepspeed.flops_profiler.output_file={tmp_path}/link/f"])


# ----------------------------------------------------------------- memory bounds
@pytest.mark.parametrize("override, key", [
    ("train.frame_curriculum=[[0,100000]]", "train.frame_curriculum"),
    ("model.embed_dim=1000000000000", "model.embed_dim"),
    ("seed=100000000000000000000000000000", "seed"),
    ("seed=1e29", "seed"),
    ("data.batch_size=10000000", "data.batch_size"),
    ("data.shuffle_buffer=1000000000", "data.shuffle_buffer"),
    ("model.learner.codebook_size=1000000000", "model.learner.codebook_size"),
    ("model.region_transformer.mlp_ratio=1e9", "model.region_transformer.mlp_ratio"),
])
def test_memory_sizing_values_are_bounded(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_brace_spec_count_is_bounded_before_expanding() -> None:
    start = time.monotonic()
    with pytest.raises(UserError, match=f"more than {MAX_SPEC_URLS} URLs"):
        parse_specs("https://h/{0000000000..9999999999}.tar")
    with pytest.raises(UserError, match="more than"):
        parse_specs("https://h/{0000..9999}/{0000..9999}.tar")  # each range small, the product not
    assert time.monotonic() - start < 5
    assert len(parse_specs("https://h/{000..009}_{0..9..2}.tar").urls) == 50


# ---------------------------------------------------------------- config files
def test_base_must_be_yaml_and_is_never_quoted(tmp_path: Path) -> None:
    secret = tmp_path / "id_key"
    secret.write_text("SECRET-" * 100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {secret}\n")
    with pytest.raises(ConfigError, match="not a .yaml / .yml file") as err:
        load_config(cfg)
    assert "SECRET" not in str(err.value)
    disguised = tmp_path / "key.yaml"  # a non-YAML file under a YAML name: the error quotes <= 200 chars
    disguised.write_text("SECRET-" * 100 + ": 1\n")
    cfg.write_text(f"base: {disguised.name}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).count("SECRET") * len("SECRET-") <= QUOTE_CHARS, str(err.value)


def test_config_files_are_read_with_a_byte_budget(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:  # sparse: no disk, no memory
        fh.truncate(MAX_CONFIG_BYTES * 20)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: big.yaml\n")
    with pytest.raises(ConfigError, match="MiB"):
        load_config(cfg)


# ------------------------------------------------------------ one run per folder
HOLD = "import sys, time; from regionvlp.runfolder import FolderLock\n" \
       "with FolderLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"


def test_a_run_folder_is_held_by_one_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid} on host"):
            with FolderLock(out):
                pass
        capsys.readouterr()
        assert main(["train", TINY, f"run.out_dir={out}", "data.train.urls=[x.tar]"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("regionvlp: error:")]
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "run.out_dir" in err[0], err
        assert not (out / "config.yaml").exists()  # the second run wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: the kernel drops the lock
        holder.wait(timeout=30)
    with FolderLock(out) as lock:
        assert lock.fd is not None and (out / LOCK_NAME).read_text().startswith("{")
    with FolderLock(out):  # released on exit
        pass


def test_max_words_beyond_the_text_models_positions_is_refused_at_build(minilm_dir) -> None:
    from omegaconf import OmegaConf

    from regionvlp.config import TextConfig
    from regionvlp.text import TextTower

    tower = TextTower(OmegaConf.structured(TextConfig(name=str(minilm_dir))), 8)
    tower.check_words(512)  # exactly its positions: fine
    with pytest.raises(ConfigError, match=r"data\.max_words=4096, but the text model .* has 512 positions"):
        tower.check_words(4096)


# ------------------------------------------------------------------- hostile JSON
DEEP = "[" * 200_000 + "]" * 200_000  # past any recursion limit, 400 KB


def test_deeply_nested_json_is_a_one_line_error_or_a_skip(tmp_path: Path) -> None:
    from collections import Counter

    from regionvlp.data.qa import count_answers, load_annotations, load_vocab
    from regionvlp.data.inputs import read_manifest

    ann = tmp_path / "qa.json"
    ann.write_text(DEEP)
    with pytest.raises(UserError, match="--qa .*not a JSON list"):
        load_annotations(ann)
    ann.write_text('{"video_id": 1, "question": "q", "answer": ' + DEEP + "}\n")  # JSONL
    with pytest.raises(UserError, match="--qa"):
        load_annotations(ann)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(DEEP)
    with pytest.raises(UserError, match="not a vocab file"):
        load_vocab(vocab)
    manifest = tmp_path / "m.json"
    manifest.write_text(DEEP)
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(manifest)
    skipped: Counter = Counter()
    counts, pairs = count_answers([{"__key__": "a", "json": DEEP.encode()}], skipped)
    assert skipped == {"bad_json": 1} and pairs == 0


@pytest.mark.parametrize("body", [
    '{"answers": ["a"], "counts": [1e999]}',
    '{"answers": ["a"], "counts": ["many"]}',
    '{"answers": ["a"], "counts": [true]}',
    '{"answers": ["a"], "counts": [-3]}',
    '{"answers": ["a"], "counts": [1], "num_pairs": "x"}',
    '{"answers": ["a"], "counts": [1], "skipped": [1, 2]}',
    '{"answers": ["a"], "counts": [1], "skipped": {"bad_qa": 1e999}}',
    '["answers"]',
])
def test_vocab_counts_of_the_wrong_kind_are_one_line_errors(tmp_path: Path, body: str) -> None:
    from regionvlp.data.qa import load_vocab

    vocab = tmp_path / "vocab.json"
    vocab.write_text(body)
    with pytest.raises(UserError) as err:
        load_vocab(vocab)
    assert "\n" not in str(err.value) and str(vocab) in str(err.value)


# ----------------------------------------------------------------- disk full
class _FullDisk:
    """An engine whose save fails as a full disk does (through torch: a RuntimeError)."""

    def __init__(self, err: BaseException) -> None:
        self.err = err

    def save_checkpoint(self, folder: str, tag: str, **_: object) -> None:
        (Path(folder) / tag).mkdir(parents=True)
        (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half")
        raise self.err


@pytest.mark.parametrize("err", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
])
def test_disk_full_during_save_is_one_line_and_the_partial_checkpoint_is_never_resumed(tmp_path, err) -> None:
    from regionvlp.checkpoint import list_tags, resolve_resume
    from regionvlp.train.checkpointer import Checkpointer

    ckpt = Checkpointer(tmp_path, keep_last=2)
    with pytest.raises(UserError, match=r"checkpoint step0+12 could not be written .*GiB free.*resume=auto") as got:
        ckpt.save(_FullDisk(err), 12, {})
    assert "\n" not in str(got.value)
    assert list_tags(ckpt.dir) == [] and resolve_resume("auto", ckpt.dir) is None
    with pytest.raises(RuntimeError, match="NCCL"):  # not a write failure: raised as it is
        ckpt.save(_FullDisk(RuntimeError("NCCL communicator was aborted")), 13, {})


# --------------------------------------------------------------- QA eval keys
def test_qa_questions_are_keyed_by_shard_so_colliding_keys_are_all_scored(caplog) -> None:
    from regionvlp.qa.evaluate import QARecord, merge_records

    a = [QARecord("set_a/000000.tar", "00000001", i, f"qa{i}", "x", "x") for i in range(3)]
    b = [QARecord("set_b/000000.tar", "00000001", i, f"qb{i}", "y", "x") for i in range(2)]
    with caplog.at_level("WARNING"):
        records, duplicates, collisions = merge_records([a, b + a[:1]])  # a[0] answered twice: a repeat
    assert len(records) == 5 and duplicates == 1 and collisions == 2
    assert "more than one shard" in caplog.text
    assert merge_records([a])[1:] == (0, 0)
