"""RegionLearner pathway: shapes, gradients, EMA codebook, dead codes, masks,
distributed codebook statistics, checkpoint loading across frame counts."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from regionvlp.config import load_config
from regionvlp.errors import UserError
from regionvlp.region_learner import build_pathway, load_checkpoint, load_pathway_state
from regionvlp.region_learner.checkpoint import resize_time_embed
from regionvlp.region_learner.quantizer import EMAQuantizer

TINY = [
    "model.regions=learned",
    "model.embed_dim=32",
    "model.learner.backbone=vit_tiny_patch16_224",
    "model.learner.img_size=32",  # 2x2 patch grid
    "model.learner.depth=3",
    "model.learner.codebook_size=16",
    "model.learner.code_dim=8",
    "model.learner.num_regions=3",
    "model.learner.max_frames=4",
]


def tiny_cfg(*overrides: str):
    return load_config(None, TINY + list(overrides))


def tiny_pathway(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_pathway(tiny_cfg(*overrides))


def clip(b: int, t: int, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(b * 100 + t)
    return {"frames": torch.randint(0, 256, (b, t, 3, size, size), dtype=torch.uint8, generator=g)}


# ------------------------------------------------------------------------ pathway
@pytest.mark.parametrize("frames,size", [(1, 32), (3, 48)])
def test_output_shapes(frames, size):
    model = tiny_pathway("model.learner.commitment=0.25", "model.learner.interaction_layers=2")
    out = model(clip(2, frames, size))  # 48 px frames are resized to img_size 32
    R = 3
    assert out.cls.shape == (2, 32)
    assert out.regions.shape == (2, frames * R, 32)
    assert out.region_mask.shape == (2, frames * R) and out.region_mask.dtype == torch.bool
    assert out.region_mask.all()
    assert set(out.aux_losses) == {"commitment"} and out.aux_losses["commitment"].dim() == 0
    assert set(out.logs) == {"perplexity", "codebook_usage"}
    assert 1.0 <= out.logs["perplexity"] <= 16 and 0 < out.logs["codebook_usage"] <= 1
    assert torch.isfinite(out.cls).all() and torch.isfinite(out.regions).all()


def test_no_commitment_loss_when_beta_is_zero():
    out = tiny_pathway("model.learner.commitment=0")(clip(1, 2))
    assert out.aux_losses == {}


def test_commitment_is_on_by_default_at_vqvae_beta():
    model = tiny_pathway()
    assert model.learner.quantizer.commitment == 0.25
    out = model.train()(clip(1, 2))
    assert set(out.aux_losses) == {"commitment"} and out.aux_losses["commitment"] > 0


def test_temporal_attention_is_skipped_at_one_frame_with_the_same_weights():
    plain = tiny_pathway().eval()
    divided = tiny_pathway("model.learner.divided_space_time=true").eval()
    load_pathway_state(divided, plain.state_dict())
    with torch.no_grad():
        for blk in divided.temporal:  # as if trained: no longer the identity
            blk.proj.weight.normal_(std=0.5)
            blk.proj.bias.normal_(std=0.5)
    with torch.no_grad():
        one_p, one_d = plain(clip(2, 1)), divided(clip(2, 1))
        two_p, two_d = plain(clip(2, 2)), divided(clip(2, 2))
    torch.testing.assert_close(one_d.cls, one_p.cls)  # T = 1: temporal attention not run
    torch.testing.assert_close(one_d.regions, one_p.regions)
    assert not torch.allclose(two_d.cls, two_p.cls, atol=1e-3)  # T = 2: the same weights are used
    # and trained at T > 1 only: no gradient reaches them from a 1-frame step
    divided.train()(clip(2, 1)).cls.sum().backward()
    assert divided.temporal[0].proj.weight.grad is None


def test_learned_forward_makes_no_host_syncs():
    from host_syncs import host_syncs

    model = tiny_pathway("model.learner.divided_space_time=true").train()
    model(clip(2, 2))  # the first training step seeds the codebook (reads one flag once)
    for frames in (1, 2):
        n, names = host_syncs(lambda: model(clip(2, frames)))
        assert n == 0, names
        out = model(clip(2, frames))
        assert all(torch.is_tensor(v) and v.dim() == 0 for v in out.logs.values())  # logs stay on device


@pytest.mark.parametrize("extra", [[], ["model.learner.divided_space_time=true", "model.learner.insert_after=1"]])
def test_gradients_reach_masks_interaction_and_backbone(extra):
    model = tiny_pathway("model.learner.commitment=0.1", "model.learner.interaction_layers=2", *extra)
    out = model(clip(2, 2))
    (out.cls.pow(2).sum() + out.regions.pow(2).sum() + out.aux_losses["commitment"]).backward()
    params = dict(model.named_parameters())
    names = ["learner.masks.conv.weight",  # masks
             "learner.pre_quant.1.weight",  # through the straight-through estimator
             "learner.interaction.layers.0.attn.qkv.weight", "learner.interaction.layers.1.mlp.fc1.weight",
             "learner.interaction.time_embed",
             "vit.blocks.0.attn.qkv.weight", "vit.patch_embed.proj.weight", "time_embed.weight",
             "region_head.weight", "cls_head.weight", "region_pool.weight"]
    if extra:
        names += ["temporal.0.proj.weight", "vit.blocks.2.mlp.fc1.weight"]
    for name in names:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_softmax_masks_sum_to_one_over_regions():
    model = tiny_pathway("model.learner.img_size=64")
    patches = torch.randn(2, 2, 16, model.vit.embed_dim)
    out = model.learner(patches, (4, 4))
    assert out.masks.shape == (2, 2, 3, 16)
    torch.testing.assert_close(out.masks.sum(dim=2), torch.ones(2, 2, 16))
    sig = tiny_pathway("model.learner.img_size=64", "model.learner.mask_norm=sigmoid").learner(patches, (4, 4))
    assert ((sig.masks > 0) & (sig.masks < 1)).all()
    assert not torch.allclose(sig.masks.sum(dim=2), torch.ones(2, 2, 16))


def test_divided_space_time_starts_as_identity():
    plain = tiny_pathway().eval()
    divided = tiny_pathway("model.learner.divided_space_time=true").eval()
    info = load_pathway_state(divided, plain.state_dict())  # temporal.* keep their identity init
    assert info["kept_init"] and all(k.startswith("temporal.") for k in info["kept_init"])
    batch = clip(2, 3)
    with torch.no_grad():
        a, b = plain(batch), divided(batch)
    torch.testing.assert_close(a.cls, b.cls)
    torch.testing.assert_close(a.regions, b.regions)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="insert_after"):
        tiny_pathway("model.learner.insert_after=3")
    with pytest.raises(UserError, match="not a timm model"):
        tiny_pathway("model.learner.backbone=vit_nonexistent_patch99")
    with pytest.raises(UserError, match="not a timm VisionTransformer"):
        tiny_pathway("model.learner.backbone=resnet18")
    with pytest.raises(UserError, match="max_frames"):
        tiny_pathway()(clip(1, 5))
    with pytest.raises(UserError, match=r"model.learner.max_frames >= 8"):
        tiny_pathway("data.num_frames=2", "train.frame_curriculum=[[0,2],[100,8]]")
    with pytest.raises(UserError, match="mask_norm"):
        tiny_pathway("model.learner.mask_norm=hard")


def test_pretrained_local_file_and_offline_timm(tmp_path, monkeypatch):
    import timm

    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=3)  # 14x14 grid
    path = tmp_path / "vit_tiny.pth"
    torch.save(src.state_dict(), path)
    model = tiny_pathway(f"model.learner.pretrained={path}")
    torch.testing.assert_close(model.vit.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    assert model.vit.pos_embed.shape == (1, 1 + 4, 192)  # resampled to the 2x2 grid
    with pytest.raises(UserError, match="does not load into"):
        tiny_pathway(f"model.learner.pretrained={path}", "model.learner.depth=2")  # a block too many
    with pytest.raises(UserError, match="no checkpoint file"):
        tiny_pathway(f"model.learner.pretrained={tmp_path / 'missing.pth'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as conftest sets it: never reach the hub in tests
    with pytest.raises(UserError, match="could not load timm weights"):
        tiny_pathway("model.learner.pretrained=timm")


# ---------------------------------------------------------------------- quantizer
def _toy_quantizer(threshold: float) -> EMAQuantizer:
    q = EMAQuantizer(3, 2, decay=0.9, eps=1e-5, dead_code_threshold=threshold)
    q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    q.cluster_size.copy_(torch.tensor([2.0, 1.0, 0.5]))
    q.embed_sum.copy_(q.embed * q.cluster_size[:, None])
    q.initialized.fill_(True)
    return q


TOY_Z = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [9.0, 1.0]])


def test_one_ema_update_matches_hand_computation():
    q = _toy_quantizer(threshold=0.0).train()
    z = TOY_Z.clone().requires_grad_(True)
    out = q(z)
    assert out.indices.tolist() == [0, 0, 1]
    # the output is the pre-update code, and the gradient passes straight through
    torch.testing.assert_close(out.quantized.detach(), torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]]))
    out.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones(3, 2))
    # by hand: counts (2, 1, 0), sums ((0, 1), (9, 1), (0, 0)), decay 0.9
    n = [0.9 * 2.0 + 0.1 * 2, 0.9 * 1.0 + 0.1 * 1, 0.9 * 0.5 + 0.1 * 0]  # 2.0, 1.0, 0.45
    s = [[0.9 * 0 * 2.0 + 0.1 * 0, 0.9 * 0 * 2.0 + 0.1 * 1],
         [0.9 * 10 * 1.0 + 0.1 * 9, 0.9 * 0 * 1.0 + 0.1 * 1],
         [0.9 * 0 * 0.5 + 0.1 * 0, 0.9 * 10 * 0.5 + 0.1 * 0]]
    total = sum(n)
    smooth = [(ni + 1e-5) / (total + 3 * 1e-5) * total for ni in n]
    expected = torch.tensor([[s[c][j] / smooth[c] for j in range(2)] for c in range(3)])
    torch.testing.assert_close(q.cluster_size, torch.tensor(n))
    torch.testing.assert_close(q.embed_sum, torch.tensor(s))
    torch.testing.assert_close(q.embed, expected)
    assert q.restarts.item() == 0
    # perplexity of the batch's code use (2/3, 1/3, 0) and usage 2 of 3
    p = [2 / 3, 1 / 3]
    assert out.perplexity.item() == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-5)
    assert out.usage.item() == pytest.approx(2 / 3)


def test_eval_mode_leaves_the_codebook_alone():
    q = _toy_quantizer(threshold=0.6).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(TOY_Z)
    for k, v in q.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_dead_codes_restart_from_current_features():
    q = _toy_quantizer(threshold=0.5).train()  # code 2 decays to 0.45 < 0.5 -> dead
    q(TOY_Z)
    assert q.restarts.item() == 1
    assert any(torch.equal(q.embed[2], row) for row in TOY_Z)
    assert q.cluster_size[2].item() == pytest.approx((2.0 + 1.0 + 0.45) / 3)  # the mean code's count
    assert q.cluster_size[0].item() == pytest.approx(2.0)  # live codes untouched by the restart
    # the restarted code now wins its feature
    row = int(next(i for i, r in enumerate(TOY_Z) if torch.equal(q.embed[2], r)))
    assert q.assign(TOY_Z[row:row + 1]).item() == 2


def test_dead_code_threshold_is_relative_to_the_mean_code_use():
    # counts (2, 1, 0.5) then (200, 100, 50): after the update code 2 holds 0.39 x the mean count
    # at both scales, so a 0.5 x mean rule restarts it at both (an absolute 0.5 only at the first)
    for scale in (1.0, 100.0):
        q = _toy_quantizer(threshold=0.5).train()
        q.cluster_size.mul_(scale)
        q.embed_sum.mul_(scale)
        q(TOY_Z)
        assert q.restarts.item() == 1, scale
        assert q.cluster_size[2].item() == pytest.approx(q.cluster_size.mean().item(), rel=0.2)
    with pytest.raises(UserError, match="dead_code_threshold"):
        tiny_cfg("model.learner.dead_code_threshold=2")


def test_assignment_is_exact_nearest_code_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    q = EMAQuantizer(64, 8)
    q.embed.copy_(torch.randn(64, 8, generator=g))
    z = torch.randn(500, 8, generator=g) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = q.assign(z)
    brute = ((z[:, None, :] - q.embed[None]) ** 2).sum(-1).argmin(1)  # [500]
    assert torch.equal(idx, brute)


def test_ema_buffers_stay_float32_under_bf16_cast():
    model = tiny_pathway().to(torch.bfloat16)
    q = model.learner.quantizer
    assert q.embed.dtype == q.embed_sum.dtype == q.cluster_size.dtype == torch.float32
    assert model.learner.pre_quant[1].weight.dtype == torch.bfloat16
    out = model.train()(clip(1, 2))
    assert out.cls.dtype == torch.bfloat16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, z: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = z.shape[1] // world
        mine = z[:, rank * half:(rank + 1) * half]  # [steps, batch / world, d]
        torch.manual_seed(0)
        q = EMAQuantizer(8, 4, decay=0.9, dead_code_threshold=0.0).train()
        q.initialized.fill_(True)  # EMA from one shared random codebook
        for step in range(z.shape[0]):
            q(mine[step])
        ema = {k: v.clone() for k, v in q.state_dict().items()}
        # data-driven seeding and restarts draw on rank 0 and broadcast: same codebook everywhere
        torch.manual_seed(100 + rank)
        fresh = EMAQuantizer(8, 4, decay=0.9, dead_code_threshold=0.0).train()
        fresh(mine[0])
        q.dead_code_threshold = 1e9
        q(mine[0])
        torch.save({"ema": ema, "init": fresh.state_dict(), "restart": q.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_one_process_on_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    z = torch.randn(3, 12, 4, generator=torch.Generator().manual_seed(3))  # [steps, batch, d]
    mp.spawn(_dist_worker, args=(2, _free_port(), z, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = EMAQuantizer(8, 4, decay=0.9, dead_code_threshold=0.0).train()
    single.initialized.fill_(True)
    for step in range(3):
        single(z[step])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert (single.cluster_size != 0.9 ** 3).sum() >= 2  # several codes were actually used
    for r in ranks:
        for key in ("embed", "embed_sum", "cluster_size"):
            torch.testing.assert_close(r["ema"][key], single.state_dict()[key], rtol=1e-6, atol=1e-6)
    for stage in ("init", "restart"):
        for key in ("embed", "embed_sum", "cluster_size"):
            assert torch.equal(ranks[0][stage][key], ranks[1][stage][key]), (stage, key)
    assert ranks[0]["restart"]["restarts"].item() == 8


# --------------------------------------------------------------------- checkpoints
def test_resize_time_embed():
    one = torch.randn(1, 5)
    assert torch.equal(resize_time_embed(one, 4), one.expand(4, 5))
    four = torch.arange(8.0).view(4, 2)
    eight = resize_time_embed(four, 8)
    torch.testing.assert_close(eight[0], four[0])
    torch.testing.assert_close(eight[-1], four[-1])
    torch.testing.assert_close(resize_time_embed(eight, 4), four)
    zeros = resize_time_embed(four, 6, "zeros")
    assert torch.equal(zeros[:4], four) and not zeros[4:].any()


def test_save_then_load_into_other_frame_count_keeps_every_learner_weight(tmp_path):
    pre = tiny_pathway("model.learner.max_frames=1", "data.num_frames=1", "model.learner.interaction_layers=2", seed=1)
    pre.train()(clip(2, 1))  # move the codebook off its init
    with torch.no_grad():
        pre.time_embed.weight.normal_()  # as if trained (it starts at zero)
    path = tmp_path / "model.pt"
    # saved as part of a whole model, as the trainer does
    torch.save({"module": {f"pathway.{k}": v for k, v in pre.state_dict().items()} | {"text.w": torch.ones(1)}},
               path)
    for frames in (4, 8):
        cfg = tiny_cfg(f"model.learner.max_frames={frames}", "model.learner.interaction_layers=2",
                       f"model.learner.checkpoint={path}")
        torch.manual_seed(2)
        fine = build_pathway(cfg)
        got, want = fine.state_dict(), pre.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            if key in ("time_embed.weight", "learner.interaction.time_embed"):
                assert got[key].shape[0] == frames
                torch.testing.assert_close(got[key], want[key].expand(frames, -1))
            else:
                assert torch.equal(got[key], want[key]), key
        out = fine(clip(1, frames))
        assert out.regions.shape == (1, frames * 3, 32)
    # an export folder (model.safetensors of the whole model), zero-filled frames
    from safetensors.torch import save_file

    export = tmp_path / "export"
    export.mkdir()
    save_file({f"pathway.{k}": v.clone().contiguous() for k, v in pre.state_dict().items()},
              str(export / "model.safetensors"))
    fine = tiny_pathway("model.learner.max_frames=8", "model.learner.interaction_layers=2")
    info = load_checkpoint(fine, export, temporal="zeros")
    assert sorted(info["resized"]) == ["learner.interaction.time_embed", "time_embed.weight"]
    assert torch.equal(fine.learner.quantizer.embed, pre.learner.quantizer.embed)
    assert torch.equal(fine.time_embed.weight[:1], pre.time_embed.weight) and not fine.time_embed.weight[1:].any()


def test_checkpoint_with_hand_written_interaction_layers_loads():
    src = tiny_pathway("model.learner.interaction_layers=2", seed=4)
    names = {".attn.qkv.": ".qkv.", ".attn.proj.": ".proj.", ".mlp.fc1.": ".mlp.0.", ".mlp.fc2.": ".mlp.3."}
    old = {}
    for key, value in src.state_dict().items():
        if "interaction.layers." in key:
            for new, was in names.items():
                key = key.replace(new, was)
        old[f"pathway.{key}"] = value
    assert "pathway.learner.interaction.layers.1.mlp.3.weight" in old
    target = tiny_pathway("model.learner.interaction_layers=2", seed=5)
    load_pathway_state(target, old)
    for key, value in src.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    one_layer = tiny_pathway().state_dict()
    target = tiny_pathway("model.learner.interaction_layers=2")
    with pytest.raises(UserError, match=r"missing keys: learner\.interaction\.layers\.1\."):
        load_pathway_state(target, one_layer)
    extra = dict(target.state_dict()) | {"learner.extra.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"unexpected keys: learner\.extra\.weight"):
        load_pathway_state(target, extra)
    with pytest.raises(UserError, match="shape mismatch"):
        load_pathway_state(tiny_pathway("model.learner.num_regions=5"), tiny_pathway().state_dict())
    with pytest.raises(UserError, match="no RegionLearner pathway"):
        load_pathway_state(target, {"vit.cls_token": torch.zeros(1)})
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(target, tmp_path / "nope.pt")


# -------------------------------------------------------------------------- bench
def test_bench_learner_cli_prints_one_json_line(capsys):
    import json

    from regionvlp.cli import main

    rc = main(["bench", "learner", "--backbone", "vit_tiny_patch16_224", "--depth", "2", "--img-size", "32",
               "--batch", "2", "--frames", "2", "--codebook-size", "16", "--code-dim", "8", "--num-regions", "2",
               "--iters", "1", "--warmup", "1", "--device", "cpu"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["baseline"] == "vit" and result["dtype"] == "fp32" and result["device"].startswith("cpu")
    assert result["learner_per_s"] > 0 and result["vit_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["learner_per_s"] / result["vit_per_s"])
    assert result["learner_gflop_per_step"] > result["vit_gflop_per_step"] > 0  # same ViT plus the learner
    assert (result["batch"], result["frames"], result["img_size"], result["depth"]) == (2, 2, 32, 2)
    assert result["divided_space_time"] is True  # the shipped pre-training config's attention mode


def test_bench_learner_defaults_to_the_shipped_pretraining_config():
    from regionvlp.bench.learner import SHIPPED_CONFIG, bench_config

    shipped = load_config(SHIPPED_CONFIG)
    cfg = bench_config()
    for key in ("backbone", "img_size", "divided_space_time", "codebook_size", "num_regions", "insert_after"):
        assert cfg.model.learner[key] == shipped.model.learner[key], key
    assert cfg.data.num_frames == shipped.data.num_frames == 1
    assert cfg.model.learner.pretrained == "none"  # speed does not need (or download) weights
    assert bench_config(divided_space_time=False, frames=4).model.learner.divided_space_time is False


# ---------------------------------------------------------------------- deepspeed
_ZERO3_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import deepspeed
from test_region_learner import clip, tiny_pathway
deepspeed.init_distributed(dist_backend="gloo")

class Wrap(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p
    def forward(self, batch):
        o = self.p(batch)
        return o.cls.float().pow(2).mean() + o.regions.float().pow(2).mean() + o.aux_losses["commitment"]

torch.manual_seed(0)
model = Wrap(tiny_pathway("model.learner.commitment=0.1"))
cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
losses = []
for _ in range(2):
    loss = engine(clip(2, 2))
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
q = model.p.learner.quantizer
print(json.dumps({"losses": losses, "embed_dtype": str(q.embed.dtype), "initialized": bool(q.initialized)}))
"""


def test_trains_under_deepspeed_zero3_bf16(tmp_path):
    """ZeRO-3 partitions parameters and gathers them per module call: the pathway must use
    every parameter inside its owning module's forward (regression: the ViT's position
    embedding and the frame embedding were used outside it)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    script = tmp_path / "zero3.py"
    script.write_text(_ZERO3_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert result["embed_dtype"] == "torch.float32" and result["initialized"]
