"""The fused pathway (model.regions: fused): detector box tokens and learned regions in
one region set, trained, evaluated, compared and shown like the other two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regionvlp.config import ConfigError, load_config
from regionvlp.errors import UserError
from regionvlp.model import build_batch_transform, build_model, prepare_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def test_one_region_set_with_a_type_each_and_one_cls():
    cfg = load_config(TINY / "fused.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    frames = torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8)
    batch = prepare_batch({"frames": frames}, build_batch_transform(cfg))
    pathway = model.pathway
    with torch.no_grad():
        out = pathway(batch)
        box, lrn = pathway.detector(batch), pathway.learned(batch)
    T, K, R = 2, 4, 4
    assert out.cls.shape == (2, 32) and out.regions.shape == (2, T * K + T * R, 32)
    assert torch.equal(out.region_mask, torch.cat([box.region_mask, lrn.region_mask], 1))
    assert out.region_mask[:, T * K:].all() and set(out.aux_losses) == {"commitment"}
    assert {"regions_per_frame", "perplexity"} <= set(out.logs)
    assert not out.regions[~out.region_mask].any()  # padded boxes are zero
    # padded boxes cannot change anything: garbage in their features, same output
    noisy = dict(batch, region_feats=torch.where(batch["region_mask"][..., None], batch["region_feats"],
                                                 torch.full_like(batch["region_feats"], 1e4)))
    with torch.no_grad():
        again = pathway(noisy)
    torch.testing.assert_close(again.cls, out.cls, rtol=1e-5, atol=1e-5)
    # the type embedding tells the two kinds apart: swapping its rows changes the output
    with torch.no_grad():
        pathway.type_embed.weight.copy_(pathway.type_embed.weight.flip(0))
        assert not torch.allclose(pathway(batch).cls, out.cls)
    with pytest.raises(UserError, match="needs frames"):
        pathway({k: v for k, v in batch.items() if k != "frames"})


def test_every_part_of_both_pathways_learns():
    cfg = load_config(TINY / "fused.yaml")
    model = build_model(cfg).train()
    frames = torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8)
    batch = prepare_batch({"frames": frames}, build_batch_transform(cfg))
    out = model.pathway(batch)
    (out.cls.square().sum() + out.regions.square().sum()).backward()
    for part in ("detector.feat_proj.weight", "detector.temporal.pos_embed", "learned.time_embed.weight",
                 "learned.cls_head.weight", "type_embed.weight", "cls.cls_token", "blocks.0.attn.qkv.weight"):
        grad = dict(model.pathway.named_parameters())[part].grad
        assert grad is not None and grad.abs().sum() > 0, part


def test_fused_heads_must_divide_the_joint_width():
    with pytest.raises(ConfigError, match="model.fused.heads"):
        load_config(TINY / "fused.yaml", ["model.fused.heads=3"])
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain_fused.yaml").model.regions == "fused"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """`regionvlp compare --pathways detector,learned,fused` on tiny configs (training in
    this process, 2 steps each), then its output folder and shards."""
    from regionvlp import compare as compare_mod
    from regionvlp.cli import main
    from regionvlp.data.synth import synth

    root = tmp_path_factory.mktemp("fused")
    s = synth(root / "synth", videos=8, val_videos=3, size=64, frames=4, shard_size=100, progress=False)
    train_urls, val_urls = s["train"]["urls"], s["val"]["urls"]
    argv = ["compare", "--out", str(root / "cmp"), "--pathways", "detector,learned,fused",
            "--detector", str(TINY / "detector.yaml"), "--config", f"learned={TINY / 'learned.yaml'}",
            "--config", f"fused={TINY / 'fused.yaml'}", f"data.train.urls=[{train_urls}]",
            f"data.val.urls=[{val_urls}]", "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2",
            "data.batch_size=2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare_mod, "train_isolated", compare_mod.train_in_process)  # no spawned processes
        assert main(argv) == 0
    return root / "cmp", val_urls


def test_compare_reports_three_pathways(compared, capsys):
    out, _ = compared
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert "| metric | detector | learned | fused |" in report and "All 3 pathways ran" in report
    assert "- `fused`: detector box tokens and learned regions in one region set" in report
    assert summary["fused"]["settings"]["model.fused"]["layers"] == 1
    for name in ("detector", "learned", "fused"):
        assert summary[name]["steps"] == 2 and [v["step"] for v in summary[name]["curve"]] == [2]
        assert 0.0 <= summary[name]["t2v_r1"] <= 100.0 and summary[name]["num_videos"] == 3
    png = out / "regions.png"
    assert summary["figures"]["regions"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_fused_run_evaluates_and_shows_boxes_and_masks(compared, tmp_path, capsys, monkeypatch):
    from regionvlp import show
    from regionvlp.cli import main

    out, val_urls = compared
    expect = json.loads((out / "summary.json").read_text())["fused"]
    capsys.readouterr()
    assert main(["eval", str(TINY / "fused.yaml"), "--checkpoint", str(out / "fused"),
                 f"data.val.urls=[{val_urls}]", "data.batch_size=2"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["regions"] == "fused"
    for key in ("t2v_r1", "t2v_medr", "v2t_r1", "num_texts"):
        assert got[key] == pytest.approx(expect[key], abs=1e-6), key

    drawn = []
    for name in ("draw_boxes", "draw_masks"):
        real = getattr(show, name)
        monkeypatch.setattr(show, name, lambda ax, frame, view, real=real, name=name: (drawn.append(name),
                                                                                      real(ax, frame, view)))
    assert main(["show", "regions", str(out / "fused"), val_urls, "--out", str(tmp_path), "--clips", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["regions"] == "fused" and len(line["clips"]) == 2 and Path(line["image"]).is_file()
    assert sorted(drawn) == ["draw_boxes"] * 2 + ["draw_masks"] * 2  # both views of each clip
