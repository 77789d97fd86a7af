"""Engine pieces with toy modules: parameter groups, LR schedule, DeepSpeed config,
checkpoint keep-last-K / resume resolution, non-finite guard, stop flag."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from regionvlp import checkpoint as C
from regionvlp.optim import lr_lambda
from regionvlp.train.checkpointer import Checkpointer
from regionvlp.train import engine as E
from regionvlp.train import guards as G
from regionvlp.train import optimizer as O
from regionvlp.config import LossConfig, load_config
from regionvlp.errors import UserError
from regionvlp.losses import AlignmentLoss
from regionvlp.outputs import TextOutput, VideoOutput

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "learned.yaml"


class ToyPathway(nn.ModuleDict):
    def __init__(self) -> None:
        super().__init__({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pathway = ToyPathway()
        self.text_tower = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4)})
        self.loss = nn.Module()
        self.loss.log_temperature = nn.Parameter(torch.tensor([0.0]))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pathway["norm"](self.pathway["proj"](x)) + self.text_tower["lin"](x)).pow(2).mean()


def test_param_groups_decay_and_tower_lr():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.text_lr_mult=0.1", "optim.video_lr_mult=2.0",
                             "optim.weight_decay=0.05"])
    groups = {g["group"]: g for g in O.param_groups(Toy(), cfg.optim)}
    names = {k: set(g["names"]) for k, g in groups.items()}
    assert names["video_decay"] == {"pathway.proj.weight"}
    assert names["video_no_decay"] == {"pathway.proj.bias", "pathway.norm.weight", "pathway.norm.bias",
                                       "pathway.pos_embed"}
    assert names["text_decay"] == {"text_tower.lin.weight"}
    assert names["text_no_decay"] == {"text_tower.emb.weight", "text_tower.lin.bias"}
    assert names["loss_no_decay"] == {"loss.log_temperature"}
    assert all("frozen" not in n for g in names.values() for n in g)  # only trainable parameters
    assert groups["video_decay"]["lr"] == pytest.approx(2e-3) and groups["text_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["loss_no_decay"]["lr"] == pytest.approx(1e-3)
    assert groups["video_decay"]["weight_decay"] == 0.05 and groups["text_no_decay"]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    lam = [lr_lambda(s, 4, 12, 0.1) for s in range(13)]
    assert lam[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lam[4] == pytest.approx(1.0) and lam[8] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lam[12] == pytest.approx(0.1) and all(a >= b for a, b in zip(lam[3:], lam[4:]))
    cfg = load_config(None, ["optim.warmup_steps=2", "train.max_steps=6", "optim.lr=1.0"])
    opt, sched = O.build_optimizer(Toy(), cfg)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, *cos], abs=1e-9)


def test_deepspeed_config_is_completed_and_checked():
    cfg = load_config(None, ["data.batch_size=3", "train.grad_accum=2", "optim.grad_clip=0.5",
                             "deepspeed.zero_optimization.stage=2", "deepspeed.bf16.enabled=true"])
    ds = E.deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"] is True
    assert E.engine_dtype(ds) == torch.bfloat16
    for bad, word in [("deepspeed.gradient_clipping=2.0", "optim.grad_clip"),
                      ("deepspeed.train_batch_size=64", "derived"),
                      ("deepspeed.zero_optimization.stage=4", "choose 0, 1, 2 or 3"),
                      ("deepspeed.optimizer.type=Adam", "optim: section")]:
        with pytest.raises(UserError, match=word):
            E.deepspeed_config(load_config(None, [bad]))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a GPU"):
            E.deepspeed_config(load_config(None, ["deepspeed.fp16.enabled=true"]))


def test_toy_engine_checkpoint_keep_last_and_resume(tmp_path):
    cfg = load_config(None, ["data.batch_size=2", "train.max_steps=10", "optim.warmup_steps=1"])
    torch.manual_seed(0)
    eng, opt, sched, ds = E.initialize(Toy(), cfg)
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 5):
        loss = eng(torch.randn(2, 4))
        eng.backward(loss)
        eng.step()
        ck.save(eng, step, {"train_state": {"step": step}})
    assert C.list_tags(ck.dir) == ["step00000003", "step00000004"]
    assert C.resolve_resume("auto", ck.dir) == (ck.dir, "step00000004")
    assert C.resolve_resume("none", ck.dir) is None
    assert C.resolve_resume(str(ck.dir / "step00000003"), ck.dir) == (ck.dir, "step00000003")
    with pytest.raises(UserError, match="not a checkpoint"):
        C.resolve_resume(str(tmp_path / "nowhere"), ck.dir)
    # a torn save (no done marker) is never resumed from
    (ck.dir / "step00000009").mkdir()
    assert C.resolve_resume("auto", ck.dir) == (ck.dir, "step00000004")

    want = {k: v.clone() for k, v in eng.module.state_dict().items()}
    lr = opt.param_groups[0]["lr"]
    torch.manual_seed(1)
    eng2, opt2, _, _ = E.initialize(Toy(), cfg)
    client = ck.load(eng2, (ck.dir, "step00000004"))
    assert client["train_state"] == {"step": 4}
    for k, v in eng2.module.state_dict().items():
        assert torch.equal(v, want[k])
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr) and eng2.global_steps == 4


class TempToy(nn.Module):
    """Linear toy towers in front of the real AlignmentLoss with loss.learnable_temperature=true."""

    def __init__(self) -> None:
        super().__init__()
        self.pathway = nn.Linear(4, 8)
        self.text_tower = nn.Linear(4, 8)
        self.loss = AlignmentLoss(OmegaConf.structured(LossConfig(learnable_temperature=True, temperature=0.1,
                                                                  local_weight=0.5, chunk_size=2)))

    def forward(self, xv: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.pathway(xv), dim=-1)  # [B, 1+R, 8]: [CLS] then regions
        t = F.normalize(self.text_tower(xt), dim=-1)  # [B, 1+L, 8]: [CLS] then words
        rm = torch.ones(v.shape[0], v.shape[1] - 1, dtype=torch.bool)
        wm = torch.ones(t.shape[0], t.shape[1] - 1, dtype=torch.bool)
        return self.loss(VideoOutput(v[:, 0], v[:, 1:], rm), TextOutput(t[:, 0], t[:, 1:], wm))["loss"]


@pytest.mark.parametrize("stage", [0, 2])
def test_learnable_temperature_trains_under_the_engine(stage):
    """The [1]-shaped log_temperature goes through deepspeed.initialize, gets the exact
    gradient (autograd of the same model outside the engine, and finite differences),
    sits in the loss no-decay group, and the optimizer moves it."""
    from deepspeed.utils import safe_get_full_grad

    cfg = load_config(None, ["data.batch_size=4", "train.max_steps=3", "optim.warmup_steps=1", "optim.lr=1e-2",
                             f"deepspeed.zero_optimization.stage={stage}"])
    torch.manual_seed(0)
    model = TempToy()
    ref = copy.deepcopy(model)
    eng, opt, _, _ = E.initialize(model, cfg)
    tau_param = eng.module.loss.log_temperature
    assert tau_param.shape == (1,)
    group = next(g for g in opt.param_groups if g.get("group") == "loss_no_decay")
    assert group["weight_decay"] == 0.0

    g = torch.Generator().manual_seed(1)
    xv, xt = torch.randn(4, 4, 4, generator=g), torch.randn(4, 5, 4, generator=g)
    loss = eng(xv, xt)
    eng.backward(loss)
    grad = safe_get_full_grad(tau_param)
    ref_loss = ref(xv, xt)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    want = ref.loss.log_temperature.grad
    assert grad.shape == (1,) and float(want.abs()) > 1e-4
    torch.testing.assert_close(grad.float(), want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # d loss / d log_temperature by central differences
        eps, base = 1e-3, ref.loss.log_temperature.clone()
        ref.loss.log_temperature.copy_(base + eps)
        up = ref(xv, xt).item()
        ref.loss.log_temperature.copy_(base - eps)
        down = ref(xv, xt).item()
    assert float(grad) == pytest.approx((up - down) / (2 * eps), rel=2e-3)

    before = float(tau_param.detach())
    eng.step()
    for _ in range(2):
        loss = eng(xv, xt)
        eng.backward(loss)
        eng.step()
    after = float(eng.module.loss.log_temperature.detach())
    assert after != before and math.isfinite(after)
    assert eng.module.loss.temperature().shape == ()

    # the floor lands on the parameter after the step: the module's copy and DeepSpeed's
    # fp32 master (ZeRO-2: the fragment), so the next step starts from it
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    floor = math.log(0.2)  # above the current temperature 0.1
    G.floor_parameter_(tau_param, floor)
    assert float(tau_param.detach()) == pytest.approx(floor)
    master = safe_get_full_fp32_param(tau_param)
    assert master is None if stage == 0 else float(master) == pytest.approx(floor)
    low = torch.tensor([math.log(0.05)])
    tau_param.data.copy_(low)
    if stage:
        safe_set_full_fp32_param(tau_param, low)
    eng.backward(eng(xv, xt))
    assert float(safe_get_full_grad(tau_param).abs()) > 1e-5  # below the floor it still learns
    eng.step()
    G.floor_parameter_(tau_param, floor)
    assert float(tau_param.detach()) == pytest.approx(floor)


def test_nonfinite_guard_skips_then_aborts():
    g = G.NonFiniteGuard(max_in_a_row=3)
    assert g.check(True, 0) and not g.check(False, 1) and not g.check(False, 2) and g.check(True, 3)
    assert g.total == 2 and g.in_a_row == 0
    assert not g.check(False, 4) and not g.check(False, 5)
    with pytest.raises(G.NonFiniteLossError, match="3 non-finite steps in a row"):
        g.check(False, 6)


def test_stop_flag_catches_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    with G.StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_nonfinite_losses_in_the_loop(tmp_path, monkeypatch):
    """The real loop on the tiny learned config with a model whose loss is NaN on chosen calls."""
    import regionvlp.train.loop as loop_mod
    from regionvlp.data.synth import synth
    from regionvlp.train import train

    synth(str(tmp_path / "s"), videos=4, seed=1, val_videos=1, size=64, frames=2, fps=8, shard_size=4, workers=1,
          compositional=False)
    real_build = loop_mod.build_model
    bad_calls: set[int] = {2, 3}
    calls = {"n": 0}

    def build(cfg):
        m = real_build(cfg)
        fwd = m.forward

        def forward(batch):
            calls["n"] += 1
            out = fwd(batch)
            if calls["n"] in bad_calls:
                out["loss"] = out["loss"] * math.nan
            return out

        m.forward = forward
        return m

    monkeypatch.setattr(loop_mod, "build_model", build)
    base = ["data.train.urls=[" + str(tmp_path / "s/train/000000.tar") + "]", "data.val.urls=[]",
            "data.batch_size=2", "train.ckpt_every=100", "train.max_nonfinite=3"]
    cfg = load_config(CONFIG, base + ["train.max_steps=3", f"run.out_dir={tmp_path}/a"])
    s = train(cfg)
    assert s["steps"] == 3 and s["nonfinite_skipped"] == 2 and math.isfinite(s["final_loss"])

    calls["n"] = 0
    bad_calls.update(range(2, 100))
    cfg = load_config(CONFIG, base + ["train.max_steps=5", f"run.out_dir={tmp_path}/b"])
    with pytest.raises(G.NonFiniteLossError, match="non-finite steps in a row"):
        train(cfg)

    # a fresh run never mixes with an old run's checkpoints
    cfg = load_config(CONFIG, base + ["train.max_steps=3", f"run.out_dir={tmp_path}/a"])
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(cfg)


# ------------------------------------------------- schedule on resume, blown-up steps
def _tiny_learned(tmp_path: Path, videos: int = 4) -> list[str]:
    from regionvlp.data.synth import synth

    synth(str(tmp_path / "s"), videos=videos, seed=1, val_videos=1, size=64, frames=2, fps=8, shard_size=videos,
          workers=1, compositional=False)
    return ["data.train.urls=[" + str(tmp_path / "s/train/000000.tar") + "]", "data.val.urls=[]",
            "data.batch_size=2", "train.log_every=1", f"run.out_dir={tmp_path}/run"]


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_extending_a_run_or_changing_the_lr_rebuilds_the_schedule(tmp_path, caplog):
    """max_steps 3 -> 5 on resume trains steps 4-5 at LR > 0 (the schedule of the new
    config from step 6 on), a new optim.lr takes effect, and the change is one log line."""
    from regionvlp.train import train

    base = _tiny_learned(tmp_path) + ["optim.warmup_steps=1", "optim.lr=1e-3", "train.ckpt_every=100"]
    train(load_config(CONFIG, base + ["train.max_steps=3"]))
    assert _records(tmp_path / "run")[3]["lr_video_decay"] == pytest.approx(1e-3 * lr_lambda(2, 1, 3))
    assert lr_lambda(3, 1, 3) == 0.0  # the old schedule would train on at LR 0
    with caplog.at_level("INFO", logger="regionvlp.train"):
        s = train(load_config(CONFIG, base + ["train.max_steps=5", "train.resume=auto"]))
    assert s["steps"] == 5 and Path(s["resumed_from"]).name == "step00000003"
    lines = [r.message for r in caplog.records if "schedule rebuilt" in r.message]
    assert len(lines) == 1 and "train.max_steps 3 → 5" in lines[0] and "optim.lr" not in lines[0]
    recs = _records(tmp_path / "run")
    for step in (4, 5):
        assert recs[step]["lr_video_decay"] == pytest.approx(1e-3 * lr_lambda(step - 1, 1, 5))
        assert recs[step]["lr_video_decay"] > 0
    caplog.clear()
    with caplog.at_level("INFO", logger="regionvlp.train"):
        train(load_config(CONFIG, base + ["train.max_steps=6", "optim.lr=5e-4", "train.resume=auto"]))
    line = next(r.message for r in caplog.records if "schedule rebuilt" in r.message)
    assert "optim.lr (video_decay) 0.001 → 0.0005" in line and "train.max_steps 5 → 6" in line
    recs = _records(tmp_path / "run")
    assert recs[6]["lr_video_decay"] == pytest.approx(5e-4 * lr_lambda(5, 1, 6)) and recs[6]["lr_video_decay"] > 0


def test_blown_up_steps_never_reach_weights_or_checkpoints_and_a_lower_lr_recovers(tmp_path):
    """An LR of 1e30 sends the weights to ~1e30 and the next losses are NaN: those steps
    are skipped, the run aborts with the advice, the checkpoint of the blown-up step is set
    aside, and resuming with a lower LR continues from the last good checkpoint to the end."""
    from regionvlp.train import train

    base = _tiny_learned(tmp_path) + ["optim.warmup_steps=0", "train.ckpt_every=1", "train.keep_last=10",
                                      "train.max_nonfinite=2"]
    train(load_config(CONFIG, base + ["train.max_steps=2", "optim.lr=1e-4"]))
    with pytest.raises(G.NonFiniteLossError, match="non-finite steps in a row") as err:
        train(load_config(CONFIG, base + ["train.max_steps=8", "optim.lr=1e30", "train.resume=auto"]))
    assert "before step 3" in str(err.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert C.list_tags(ckpts) == ["step00000001", "step00000002"] and (ckpts / "step00000003.nonfinite").is_dir()
    s = train(load_config(CONFIG, base + ["train.max_steps=5", "optim.lr=1e-4", "train.resume=auto"]))
    assert s["steps"] == 5 and Path(s["resumed_from"]).name == "step00000002" and math.isfinite(s["final_loss"])
    for tag in C.list_tags(ckpts):
        state = torch.load(ckpts / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in state.values() if v.is_floating_point())


def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_step(tmp_path, monkeypatch):
    """The fused check looks at the gradient norm too: a NaN gradient (finite loss) moves
    no weight and does not advance the schedule."""
    import regionvlp.train.loop as loop_mod
    from regionvlp.train import train

    real_build, seen = loop_mod.build_model, {}

    def build(cfg):
        model = real_build(cfg)
        proj = next(p for n, p in model.named_parameters() if p.requires_grad and n.startswith("pathway"))
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * math.nan if calls["n"] == 2 else grad
        proj.register_hook(hook)
        seen["model"] = model
        return model

    monkeypatch.setattr(loop_mod, "build_model", build)
    s = train(load_config(CONFIG, _tiny_learned(tmp_path) + ["train.max_steps=3", "train.ckpt_every=100",
                                                             "optim.warmup_steps=0"]))
    assert s["steps"] == 3 and s["nonfinite_skipped"] == 1 and math.isfinite(s["final_loss"])
    assert all(torch.isfinite(p).all() for p in seen["model"].parameters())
    state = torch.load(Path(s["checkpoint_dir"]) / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["lr_scheduler"]["last_epoch"] == 3  # the skipped step did not advance the schedule


# ------------------------------------------------------------- nothing pickled runs
class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_rng_state_round_trips_without_pickle_and_an_old_pickled_file_is_refused(tmp_path):
    import random

    import numpy as np

    from regionvlp.train.state import read_rng, set_rng_state, write_rng

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    write_rng(tmp_path / "t", 0)
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["rng_rank0.safetensors"]
    want = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(read_rng(tmp_path / "t", 0))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]

    marker = tmp_path / "pwned"
    (tmp_path / "old").mkdir()
    torch.save({"torch": Payload(marker)}, tmp_path / "old" / "rng_rank0.pt")
    with pytest.raises(UserError, match=r"old pickled RNG file that torch.load\(weights_only=True\) refuses"):
        read_rng(tmp_path / "old", 0)
    assert not marker.exists()


def test_resume_only_from_folders_this_run_wrote(tmp_path):
    """A foreign folder planted among the run's checkpoints (even one that brings a valid
    manifest of its own), a swapped or an extra file in a listed folder, and a checkpoint of
    another run are refused before DeepSpeed unpickles anything; the run's own loads."""
    cfg = load_config(None, ["data.batch_size=2", "train.max_steps=10"])
    torch.manual_seed(0)
    eng, *_ = E.initialize(Toy(), cfg)
    ck = Checkpointer(tmp_path / "run", keep_last=5)
    eng.backward(eng(torch.randn(2, 4)))
    eng.step()
    ck.save(eng, 1, {})
    listed = json.loads((ck.dir / "run_manifest.json").read_text())["tags"]
    assert list(listed) == ["step00000001"] and len(listed["step00000001"]) == 64

    marker = tmp_path / "pwned"
    foreign = ck.dir / "step00000009"
    foreign.mkdir()
    torch.save(Payload(marker), foreign / "mp_rank_00_model_states.pt")
    (foreign / "client_state.done").write_text("9")
    assert C.resolve_resume("auto", ck.dir) == (ck.dir, "step00000009")
    with pytest.raises(UserError, match="no valid manifest.json"):
        ck.load(eng, (ck.dir, "step00000009"))
    C.write_manifest(foreign)  # as the run that made it would have: its own manifest is valid
    with pytest.raises(UserError, match="not listed in .*run_manifest.json: this run did not write it"):
        ck.load(eng, (ck.dir, "step00000009"))
    swapped = ck.dir / "step00000001" / "mp_rank_00_model_states.pt"
    good = swapped.read_bytes()
    torch.save(Payload(marker), swapped)
    with pytest.raises(UserError, match="changed since this run wrote it"):
        ck.load(eng, (ck.dir, "step00000001"))
    swapped.write_bytes(good)
    extra = ck.dir / "step00000001" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(Payload(marker), extra)
    with pytest.raises(UserError, match="changed since this run wrote it"):
        ck.load(eng, (ck.dir, "step00000001"))
    extra.unlink()
    other = Checkpointer(tmp_path / "other", keep_last=5)
    with pytest.raises(UserError, match="not a checkpoint of this run.*train.init_from"):
        other.load(eng, (ck.dir, "step00000001"))
    assert not marker.exists()
    ck.load(eng, (ck.dir, "step00000001"))


def test_a_cut_off_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    from regionvlp.train.state import MetricsLog

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # a kill mid-write
    with caplog.at_level("WARNING", logger="regionvlp.train"):
        log = MetricsLog(tmp_path, True, resume_step=3)
    log.write({"step": 4, "loss": 0.5})
    log.close()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [r.message for r in caplog.records if "unreadable" in r.message] != [] and \
        sum("unreadable" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("stage", [0, 2])
def test_a_skipped_step_moves_no_weight_and_keeps_the_schedule(stage):
    """ZeRO-2 calls the optimizer once per parameter group: the skip holds for all of them."""
    cfg = load_config(None, ["data.batch_size=2", "train.max_steps=10", "optim.warmup_steps=0", "optim.lr=1e-2",
                             f"deepspeed.zero_optimization.stage={stage}"])
    torch.manual_seed(0)
    eng, _, sched, _ = E.initialize(Toy(), cfg)
    before = {n: p.detach().clone() for n, p in eng.module.named_parameters() if p.requires_grad}
    eng.backward(eng(torch.randn(2, 4)))
    O.skip_next_step(sched.optimizer, sched)
    eng.step()
    O.clear_skip(sched.optimizer, sched)
    assert all(torch.equal(p, before[n]) for n, p in eng.module.named_parameters() if p.requires_grad)
    assert sched.last_epoch == 0
    eng.backward(eng(torch.randn(2, 4)))
    eng.step()
    moved = {n for n, p in eng.module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert {"pathway.proj.weight", "text_tower.lin.weight", "pathway.norm.weight"} <= moved
    assert sched.last_epoch == 1
