"""Two "nodes" on loopback without a shared disk (each its own run.out_dir), checkpoints
through run.remote_dir on a moto_server S3: the deepspeed launcher's --no_ssh form, torchrun
--nnodes 2, one node killed, the ranks' agreement on the resume tag, and a resume from the
bucket alone that matches the uninterrupted run; a tag cut mid-upload is never resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from emulators import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "learned.yaml"
BIN = Path(sys.executable).parent
TIMEOUT_S = 20  # run.collective_timeout_s of these runs: a dead peer ends the survivor within 2x this
COMMON = ["train.max_steps=6", "train.ckpt_every=2", "train.keep_last=2", "optim.warmup_steps=2",
          "train.log_every=1", "data.batch_size=2", f"run.collective_timeout_s={TIMEOUT_S}", "data.val.urls=[]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("nodes_synth")
    synth(str(out), videos=16, seed=0, val_videos=0, size=64, frames=4, fps=8, shard_size=4, workers=1,
          compositional=False)
    return out


def _env(s3: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **s3})
    return env


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    urls = ",".join(f'"{shards}/train/{i:06d}.tar"' for i in range(4))
    return [str(CONFIG), f"data.train.urls=[{urls}]", f"run.out_dir={out}", *COMMON, *extra]


def _torchrun(node: int, port: int, args: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "regionvlp.train", *args]


def _start(cmds: list[list[str]], env: dict[str, str]) -> list[subprocess.Popen]:
    return [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for c in cmds]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout, stderr))
    return out


def _kill_node(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in
    sessions of their own, so its process group is not the whole node)."""
    def tree(p: int) -> list[int]:
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            return [p]
        return [p] + [q for k in kids for q in tree(int(k))]
    for p in tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1])


def _state(tag: Path) -> dict:
    return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def _remote_tags(prefix: str) -> dict[str, str]:
    from regionvlp import remote

    data = remote.get_bytes(f"s3://ckpt/{prefix}/checkpoints/run_manifest.json", 1 << 20)
    return json.loads(data)["tags"] if data else {}


def test_two_nodes_no_shared_disk_kill_one_resume_from_bucket(shards, tmp_path, s3):
    env = _env(s3)
    # the uninterrupted reference: the deepspeed launcher's multi-node form without ssh
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    ref = [tmp_path / "ref0", tmp_path / "ref1"]
    done = _finish(_start([[str(BIN / "deepspeed"), "-H", str(hosts), "--no_ssh", "--node_rank", str(n),
                            "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port",
                            str(port), "--module", "regionvlp.train", *_args(shards, ref[n])] for n in (0, 1)], env))
    assert [rc for rc, *_ in done] == [0, 0], done[0][2][-3000:] + done[1][2][-3000:]
    s = _summary(done[0][1])
    assert s["steps"] == 6 and s["world_size"] == 2
    assert not [ln for ln in done[1][1].splitlines() if ln.startswith("{")]  # only global rank 0 prints
    # one global rank 0 writes the logs; each node its own ranks' checkpoint files
    assert (ref[0] / "metrics.jsonl").is_file() and not (ref[1] / "metrics.jsonl").exists()
    node1 = ref[1] / "checkpoints" / "step00000006"
    assert {p.name for p in node1.glob("*rank1*")} and not (node1 / "mp_rank_00_model_states.pt").exists()
    assert not list((ref[0] / "checkpoints" / "step00000006").glob("*rank1*"))

    # torchrun --nnodes 2, remote dir on S3; node 1 killed once step 2 is in the bucket
    run, remote_dir = [tmp_path / "n0", tmp_path / "n1"], "run.remote_dir=s3://ckpt/job"
    port = free_port()
    cmds = [_torchrun(n, port, _args(shards, run[n], remote_dir)) for n in (0, 1)]
    procs = _start(cmds, env)
    deadline = time.time() + 240
    while "step00000002" not in _remote_tags("job"):
        assert time.time() < deadline and procs[0].poll() is None, _finish(procs, 5)[0][2][-3000:]
        time.sleep(0.1)
    _kill_node(procs[1].pid)
    killed = time.time()
    (rc0, _, err0), _ = _finish(procs, timeout=2 * TIMEOUT_S + 30)
    assert rc0 != 0 and time.time() - killed < 2 * TIMEOUT_S, err0[-2000:]
    assert "step00000006" not in _remote_tags("job")

    # without the bucket the ranks disagree on what they hold: one clear error on both, fast
    started = time.time()
    port = free_port()
    bad = _finish(_start([_torchrun(n, port, _args(shards, run[n], "train.resume=auto")) for n in (0, 1)], env),
                  timeout=120)
    assert all(rc != 0 for rc, *_ in bad) and time.time() - started < 120
    for _, _, err in bad:
        assert "does not hold it" in err and "run.remote_dir" in err, err[-2000:]

    # both local folders gone: the same two commands resume from the bucket, exactly
    for folder in run:
        shutil.rmtree(folder)
    port = free_port()
    resumed = _finish(_start([_torchrun(n, port, _args(shards, run[n], remote_dir, "train.resume=auto"))
                              for n in (0, 1)], env))
    assert [rc for rc, *_ in resumed] == [0, 0], resumed[0][2][-3000:] + resumed[1][2][-3000:]
    s = _summary(resumed[0][1])
    assert s["steps"] == 6 and Path(s["resumed_from"]).name in ("step00000002", "step00000004")
    a, b = _state(ref[0] / "checkpoints" / "step00000006"), _state(run[0] / "checkpoints" / "step00000006")
    for k, v in a["module"].items():
        assert torch.equal(v, b["module"][k]), f"weights differ after the two-node resume: {k}"
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 6
    losses = [[json.loads(ln)["loss"] for ln in (d / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
              for d in (ref[0], run[0])]
    assert losses[0] == losses[1] and len(losses[0]) == 6  # same data positions: the same losses
    assert sorted(_remote_tags("job")) == ["step00000004", "step00000006"]  # keep_last=2 in the bucket

    # the bucket's forms of weights: an export uploaded, load_model / eval --checkpoint / init_from
    from regionvlp import load_model
    from regionvlp.checkpoint import export
    from regionvlp.evaluation.run import load_eval_model
    from regionvlp.train.finetune import init_weights

    os.environ["REGIONVLP_CACHE"] = str(tmp_path / "cache")
    try:
        assert export(run[0], "s3://ckpt/exp")["step"] == 6
        model = load_model("s3://ckpt/exp")
        for k, v in a["module"].items():
            assert torch.equal(model.state_dict()[k], v.float()), k
        fresh = load_eval_model("s3://ckpt/job")[0]  # a run dir in the bucket: its newest complete tag
        assert all(torch.equal(fresh.state_dict()[k], v.float()) for k, v in a["module"].items())
        torch.nn.init.zeros_(next(fresh.parameters()))
        init_weights(fresh, "s3://ckpt/exp")
        assert all(torch.equal(fresh.state_dict()[k], v.float()) for k, v in a["module"].items())
    finally:
        os.environ.pop("REGIONVLP_CACHE")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).pow(2).mean()


@pytest.mark.parametrize("where", ["s3", "gs", "path"])
def test_a_tag_cut_mid_upload_is_never_resumed_from(tmp_path, s3, gcs_emulator, monkeypatch, where):
    """Step 2's upload is killed between two of its files: with the local folder gone,
    train.resume=auto fetches step 1 (complete in the remote dir), never step 2; keep_last
    prunes the remote dir."""
    from regionvlp import remote
    from regionvlp.config import load_config
    from regionvlp.train import engine as E
    from regionvlp.train.checkpointer import Checkpointer

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    if where == "gs":
        from regionvlp.data.buckets import gcs_filesystem

        gcs_filesystem(30.0).mkdir("ckpt-gs")
    url = {"s3": f"s3://ckpt/cut-{os.getpid()}", "gs": "gs://ckpt-gs/cut", "path": str(tmp_path / "remote")}[where]
    cfg = load_config(None, ["data.batch_size=2", "train.max_steps=10"])
    torch.manual_seed(0)
    eng, *_ = E.initialize(Tiny(), cfg)
    run = tmp_path / "run"
    ck = Checkpointer(run, keep_last=2, remote_dir=url)
    saved = {}
    for step in (1, 2, 3):
        eng.backward(eng(torch.randn(2, 4)))
        eng.step()
        if step == 2:
            calls, real = [], remote.put_file

            def dying(local, dest):
                calls.append(dest)
                if len(calls) == 2:
                    raise KeyboardInterrupt  # as a kill: nothing after this runs
                real(local, dest)
            monkeypatch.setattr(remote, "put_file", dying)
            with pytest.raises(KeyboardInterrupt):
                ck.save(eng, step, {})
            monkeypatch.setattr(remote, "put_file", real)
            assert remote.list_files(remote.join(url, "checkpoints", "step00000002"))  # files, no manifest
            break
        ck.save(eng, step, {})
        saved[step] = {k: v.clone() for k, v in eng.module.state_dict().items()}
    shutil.rmtree(run)
    again = Checkpointer(run, keep_last=2, remote_dir=url)
    where_ = again.agree("auto")
    assert where_ == (again.dir, "step00000001")
    torch.nn.init.zeros_(eng.module.lin.weight)
    again.load(eng, where_)
    assert all(torch.equal(v, saved[1][k]) for k, v in eng.module.state_dict().items())
    for step in (4, 5, 6):
        again.save(eng, step, {})
    assert sorted(t for t in remote.list_folders(remote.join(url, "checkpoints")) if t.startswith("step")) == \
        ["step00000005", "step00000006"]  # keep_last in the remote dir; the cut tag's files went too
    assert sorted(again.sync.remote.register()) == ["step00000005", "step00000006"]
