"""The trainer end to end on synthetic shards: both tiny configs, deepspeed with 2 ranks
(ZeRO-2 / ZeRO-3, bf16), SIGKILL + exact resume, SIGTERM checkpoint, export/load_model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tiny"
CONFIG_DET = CONFIGS / "detector.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """16 train clips in 4 shards of 4, 4 val clips (64 px, 4 frames)."""
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("train_synth")
    synth(str(out), videos=16, seed=0, val_videos=4, size=64, frames=4, fps=8, shard_size=4, workers=1,
          compositional=False)
    return out


def data_overrides(shards: Path, out: Path, *, train_shards: int = 4, val: bool = True) -> list[str]:
    train = ",".join(f'"{shards}/train/{i:06d}.tar"' for i in range(train_shards))
    return [f"data.train.urls=[{train}]", f"data.val.urls=[{shards}/val/000000.tar]" if val else "data.val.urls=[]",
            f"run.out_dir={out}"]


# overfit one batch of 4 clips: the loss must fall within a few steps
OVERFIT = ["train.max_steps=14", "optim.lr=1e-3", "optim.warmup_steps=4", "optim.text_lr_mult=1.0",
           "train.ckpt_every=7", "train.log_every=1"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary on stdout:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _module_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def _fixed_batch(cfg, shards: Path) -> dict:
    from regionvlp.data import build_loader

    return next(iter(build_loader(cfg, "val", training=False)))


def test_detector_trains_loss_falls_frozen_detector_and_export(shards, tmp_path):
    from safetensors.torch import load_file

    from regionvlp import load_model
    from regionvlp.checkpoint import export
    from regionvlp.config import load_config
    from regionvlp.model import prepare_batch
    from regionvlp.train import train

    run = tmp_path / "det"
    cfg = load_config(CONFIGS / "detector.yaml", data_overrides(shards, run, train_shards=1) + OVERFIT)
    seen: dict = {}

    def on_end(engine, extractor):
        seen["extractor"] = {k: v.clone() for k, v in extractor.detector.state_dict().items()}
        batch = prepare_batch(_fixed_batch(cfg, shards), extractor)
        with torch.no_grad():
            engine.module.eval()
            v = engine.module.encode_video(batch)
            t = engine.module.encode_text(batch["input_ids"], batch["attention_mask"])
        seen["batch"], seen["video"], seen["text"] = batch, v, t
        seen["trainable_in_engine"] = {id(p) for p in engine.module.parameters()}
        seen["detector_params"] = {id(p) for p in extractor.detector.parameters()}

    s = train(cfg, on_end=on_end)
    assert s["steps"] == 14 and s["stopped"] == "max_steps" and s["skipped"] == {}
    assert s["final_loss"] < s["initial_loss"] - 0.2, (s["initial_loss"], s["final_loss"], _losses(run))
    assert Path(s["checkpoint_dir"]).name == "step00000014"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step00000007", "step00000014"]
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert list((run / "tensorboard").glob("events.*"))
    assert [st for st, _ in _losses(run)] == list(range(1, 15))
    assert "t2v_r1" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) or "val_t2v_r1" in s["val"]
    assert 0.0 <= s["val"]["val_t2v_r1"] <= 100.0 and s["val"]["val_samples"] == 4

    # the frozen detector: not in the engine, bit-identical to the weights it started with
    assert not (seen["trainable_in_engine"] & seen["detector_params"])
    start = load_file(str(run / "extractor.safetensors"))
    assert start.keys() == seen["extractor"].keys()
    for k, v in start.items():
        assert torch.equal(v, seen["extractor"][k]), k

    # export -> load_model: the same embeddings as the model that trained
    out = tmp_path / "export"
    info = export(run, out)
    assert info["step"] == 14 and (out / "model.safetensors").is_file() and (out / "text").is_dir()
    model = load_model(out)
    batch = prepare_batch({k: v for k, v in seen["batch"].items() if not k.startswith("region_")},
                          model.batch_transform)
    with torch.no_grad():
        v = model.encode_video(batch)
        t = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(v.cls, seen["video"].cls, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.regions, seen["video"].regions, rtol=0, atol=1e-6)
    torch.testing.assert_close(t.cls, seen["text"].cls, rtol=0, atol=1e-6)


def test_learned_trains_loss_falls(shards, tmp_path):
    from regionvlp.config import load_config
    from regionvlp.train import train

    run = tmp_path / "learned"
    cfg = load_config(CONFIGS / "learned.yaml",
                      data_overrides(shards, run, train_shards=1, val=False) + OVERFIT + ["train.ckpt_every=100"])
    import torch.distributed as dist

    assert "RANK" not in os.environ
    s = train(cfg)
    assert s["steps"] == 14 and s["nonfinite_skipped"] == 0
    assert s["final_loss"] < s["initial_loss"] - 0.2, (s["initial_loss"], s["final_loss"], _losses(run))
    assert s["val"] == {}
    # the env vars train() set for its own 1-process group are restored, and the data side
    # (regionvlp.dist) follows a later RANK / WORLD_SIZE over that leftover group
    assert dist.is_initialized() and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    from regionvlp import dist as rdist

    os.environ.update(RANK="1", WORLD_SIZE="2")
    try:
        assert (rdist.rank(), rdist.world_size()) == (1, 2)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


def test_frame_curriculum_and_epochs(shards, tmp_path):
    """T follows the curriculum (loader rebuilt), epochs roll over when the shards run dry."""
    from regionvlp.config import load_config
    from regionvlp.train import train
    from regionvlp.train.data import frames_at

    assert frames_at(0, [[0, 1], [500, 4]], 8) == 1 and frames_at(499, [[0, 1], [500, 4]], 8) == 1
    assert frames_at(500, [[0, 1], [500, 4]], 8) == 4 and frames_at(3, [], 8) == 8
    run = tmp_path / "cur"
    cfg = load_config(CONFIGS / "learned.yaml", data_overrides(shards, run, train_shards=1, val=False) + [
        "train.max_steps=3", "train.frame_curriculum=[[0,1],[2,2]]", "train.ckpt_every=100", "data.batch_size=2"])
    s = train(cfg)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in recs if "loss" in r] == [1, 1, 2]
    assert s["epochs"] == 1 and s["samples"] == 6  # 2 batches of 2 per epoch from one 4-clip shard


def _kill_after_checkpoint(cmd: list[str], ckpt: Path, env: dict, timeout: float = 240) -> int:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if (ckpt / "client_state.done").exists():
                running = proc.poll() is None
                proc.kill()  # SIGKILL: no handler runs
                proc.wait()
                assert running, "the run finished before it could be killed"
                return proc.returncode
            if proc.poll() is not None:
                raise AssertionError(f"run ended early rc={proc.returncode}:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_then_resume_matches_uninterrupted_run(shards, tmp_path):
    from regionvlp.config import load_config
    from regionvlp.train import train

    common = ["train.max_steps=5", "train.ckpt_every=2", "train.keep_last=5", "optim.warmup_steps=2",
              "train.log_every=1"]
    ref_dir, run = tmp_path / "ref", tmp_path / "killed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact CPU reductions need one fixed thread count
    try:
        ref = train(load_config(CONFIG_DET, data_overrides(shards, ref_dir, val=False) + common))
    finally:
        torch.set_num_threads(threads)
    assert ref["steps"] == 5

    cmd = [str(BIN / "regionvlp"), "train", str(CONFIGS / "detector.yaml"),
           *data_overrides(shards, run, val=False), *common]
    rc = _kill_after_checkpoint(cmd, run / "checkpoints" / "step00000002", _env(OMP_NUM_THREADS="1"))
    assert rc == -signal.SIGKILL
    done = subprocess.run(cmd + ["train.resume=auto"], cwd=ROOT, env=_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    s = _summary(done.stdout)
    assert s["steps"] == 5 and Path(s["resumed_from"]).name in ("step00000002", "step00000004")

    a = _module_state(ref_dir / "checkpoints" / "step00000005")
    b = _module_state(run / "checkpoints" / "step00000005")
    for k, v in a["module"].items():
        assert torch.equal(v, b["module"][k]), f"weights differ after resume: {k}"
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 5
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) and sa[i]["step"] == sb[i]["step"]
    # the loss curve continues: same steps, same values
    assert _losses(run) == _losses(ref_dir)


def test_sigterm_leaves_loadable_checkpoint(shards, tmp_path):
    from regionvlp import load_model
    from regionvlp.checkpoint import export

    run = tmp_path / "term"
    cmd = [str(BIN / "regionvlp"), "train", str(CONFIGS / "learned.yaml"), *data_overrides(shards, run, val=False),
           "train.max_steps=10000", "train.ckpt_every=10000", "train.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    s = _summary(stdout)
    assert s["stopped"] == "SIGTERM" and 1 <= s["steps"] < 10000
    assert Path(s["checkpoint_dir"]).name == f"step{s['steps']:08d}"
    info = export(run, tmp_path / "exp")
    assert info["step"] == s["steps"]
    model = load_model(tmp_path / "exp")
    assert model.batch_transform is None and not model.training


# ZeRO-3 on both pathways: the detector pathway's RegionTransformer keeps its temporal
# embedding and [CLS] in submodules (ZeRO-3 gathers a parameter only around its own
# module's forward). ZeRO-3 on the detector pathway runs 1 step (CI time).
@pytest.mark.parametrize("stage,regions,steps", [(2, "detector", 2), (3, "learned", 2), (3, "detector", 1)])
def test_deepspeed_two_ranks_bf16(shards, tmp_path, stage, regions, steps):
    run = tmp_path / f"zero{stage}_{regions}"
    port = 29500 + stage * 7 + (regions == "detector") * 3 + os.getpid() % 500
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "regionvlp.train", str(CONFIGS / f"{regions}.yaml"), *data_overrides(shards, run),
           f"train.max_steps={steps}", f"deepspeed.zero_optimization.stage={stage}", "deepspeed.bf16.enabled=true",
           "data.batch_size=2"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    s = _summary(p.stdout)
    assert s["steps"] == steps and s["world_size"] == 2 and s["zero_stage"] == stage and s["dtype"] == "bfloat16"
    assert s["final_loss"] is not None and s["val"]["val_samples"] == 4  # every val clip once over 2 ranks
    tag = Path(s["checkpoint_dir"])
    assert len(list(tag.glob("*zero_pp_rank_*optim_states.pt"))) == 2
    if stage == 3:  # consolidation across ranks' partitions
        from regionvlp import load_model
        from regionvlp.checkpoint import export

        export(run, tmp_path / "exp")
        model = load_model(tmp_path / "exp")
        assert all(p.dtype == torch.float32 and p.numel() > 0 for p in model.parameters())
        # the consolidated weights are the fp32 master copy the engine trained, not the init
        from regionvlp.config import load_config
        from regionvlp.model import build_model

        torch.manual_seed(0)
        init = build_model(load_config(CONFIGS / f"{regions}.yaml"))
        changed = [n for n, p in init.named_parameters()
                   if p.requires_grad and not torch.equal(p, dict(model.named_parameters())[n])]
        assert changed, "exported weights equal the initial weights"
        if regions == "detector":  # the submodule-held temporal embedding and [CLS] trained too
            assert any(n.endswith("temporal.pos_embed") for n in changed), changed
            assert any(n.endswith("cls.cls_token") for n in changed), changed


def test_torchrun_two_ranks(shards, tmp_path):
    """The same entry point under torchrun (env:// rendezvous, no --local_rank argument)."""
    run = tmp_path / "torchrun"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(30500 + os.getpid() % 500),
           "-m", "regionvlp.train", str(CONFIGS / "learned.yaml"), *data_overrides(shards, run, val=False),
           "train.max_steps=2", "data.batch_size=2"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    s = _summary(p.stdout)
    assert s["steps"] == 2 and s["world_size"] == 2 and s["samples"] == 8
    assert len([ln for ln in p.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 prints the summary


def test_one_shard_two_ranks_zero2_trains_then_extends(tmp_path):
    """`synth --videos 64` (one shard) under `deepspeed --num_gpus 2` with ZeRO-2: samples,
    not shards, are split over the ranks; 6 steps, then extended to 10 by a resume, which
    trains steps 7-10 at LR > 0 (issue 12's "Done when")."""
    from regionvlp.data.synth import synth

    data = tmp_path / "one_shard"
    synth(str(data), videos=64, seed=0, val_videos=4, size=64, frames=4, fps=8, shard_size=100, workers=1,
          progress=False)
    assert sorted(p.name for p in (data / "train").glob("*.tar")) == ["000000.tar"]
    run = tmp_path / "run"
    port = 31500 + os.getpid() % 500
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "regionvlp.train",
           str(CONFIG_DET), f"data.train.urls=[{data}/train/000000.tar]", "data.val.urls=[]", f"run.out_dir={run}",
           "deepspeed.zero_optimization.stage=2", "train.ckpt_every=3", "train.log_every=1"]
    first = subprocess.run(cmd + ["train.max_steps=6"], cwd=ROOT, env=_env(OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, (first.stdout[-2000:], first.stderr[-4000:])
    s = _summary(first.stdout)
    assert s["steps"] == 6 and s["world_size"] == 2 and s["zero_stage"] == 2 and s["samples"] == 6 * 4 * 2
    assert "keeps 1 sample in 2" in first.stderr
    more = subprocess.run(cmd + ["train.max_steps=10", "train.resume=auto"], cwd=ROOT, env=_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=400)
    assert more.returncode == 0, (more.stdout[-2000:], more.stderr[-4000:])
    s = _summary(more.stdout)
    assert s["steps"] == 10 and Path(s["resumed_from"]).name == "step00000006"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 11))
    # the schedule followed the new horizon: steps 7-10 ran at LR > 0 (the old one ended at 0 at step 6)
    lrs = {r["step"]: r["lr_video_decay"] for r in records if "loss" in r}
    assert all(lrs[step] > 0 for step in range(7, 11)), lrs
    assert "LR schedule rebuilt from step 6 for the new config: train.max_steps 6 → 10" in more.stderr
