"""configs/paper/: the two papers' recipes load and validate with the settings their
headers claim, every file names its remaining departures, docs/paper.md covers each,
and the CPU variants (the recipe + small sizes) run end to end: DemoVLP's two steps
(regions extract, then training on region shards), 1 -> 8 frame fine-tuning from the
pretraining run, QA, and the RegionLearner pretrain -> fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regionvlp.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
NAMES = ("demovlp_pretrain", "demovlp_finetune_msrvtt", "demovlp_qa_msrvtt", "demovlp_qa_msvd",
         "regionlearner_pretrain", "regionlearner_finetune_msrvtt")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", NAMES)
def test_paper_config_loads_and_names_its_departures(name):
    text = (PAPER / f"{name}.yaml").read_text()
    assert "Remaining departures" in text, name
    cfg = load_config(PAPER / f"{name}.yaml")
    assert name in (ROOT / "docs" / "paper.md").read_text()
    if name.startswith("demovlp"):
        rt, det = cfg.model.region_transformer, cfg.model.detector
        assert (cfg.model.regions, det.num_regions, det.min_size, det.max_size) == ("detector", 30, 600, 1000)
        assert (rt.layers, rt.hidden, rt.heads, rt.frame_local, rt.temporal_resize) == (12, 768, 12, True, "zeros")
        assert cfg.loss.temperature == 0.05
        if name == "demovlp_pretrain":
            assert (cfg.data.num_frames, cfg.data.batch_size, rt.init) == (1, 128, "vit_base_patch16_224")
        else:
            assert cfg.data.num_frames == 8 and cfg.train.init_from == "exports/demovlp_pretrain"
    else:
        lr = cfg.model.learner
        assert (lr.num_regions, lr.codebook_size, lr.insert_after, lr.divided_space_time) == (8, 2048, -1, True)
        assert cfg.data.num_frames == (1 if name.endswith("pretrain") else 8)
    if "_qa_" in name:
        assert cfg.qa.enabled and cfg.data.qa_pairs_per_visit == "all"
        assert cfg.optim.lr * cfg.optim.head_lr_mult == pytest.approx(1e-4)
        assert list(cfg.data.test.urls) and list(cfg.data.val.urls) != list(cfg.data.test.urls)


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> dict[str, str]:
    from regionvlp.data.synth import synth

    root = tmp_path_factory.mktemp("paper_raw")
    clips = synth(root / "clips", videos=8, val_videos=4, size=64, frames=8, shard_size=8, progress=False)
    qa = synth(root / "qa", videos=8, val_videos=4, size=64, frames=8, shard_size=8, qa=True, progress=False)
    return {"train": clips["train"]["urls"], "val": clips["val"]["urls"], "qa_train": qa["train"]["urls"],
            "qa_val": qa["val"]["urls"]}


def _urls(value) -> str:
    return json.dumps([value] if isinstance(value, str) else list(value))


def _regions(cfg_path: Path, urls, out: Path, *overrides: str) -> str:
    """Step 1 of the DemoVLP route: the recipe's own `regions extract`."""
    from regionvlp.detector.extract import extract_regions

    summary = extract_regions(load_config(cfg_path, list(overrides)), json.loads(_urls(urls)), out, progress=False)
    assert summary["samples"] > 0
    return str(out / "{000000..000000}.tar") if (out / "000000.tar").is_file() else str(sorted(out.glob("*.tar"))[0])


def _train(cfg_path: Path, run: Path, *overrides: str) -> dict:
    from regionvlp.train import train

    summary = train(load_config(cfg_path, [f"run.out_dir={run}", *overrides]))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    return summary


def test_demovlp_two_step_route_pretrain_finetune_qa_on_cpu(raw_shards, tmp_path):
    tiny = PAPER / "tiny"
    regions = _regions(tiny / "demovlp_pretrain.yaml", raw_shards["train"], tmp_path / "regions1")
    _train(tiny / "demovlp_pretrain.yaml", tmp_path / "pre", f"data.train.urls={_urls(regions)}")
    regions8 = _regions(tiny / "demovlp_finetune_msrvtt.yaml", raw_shards["train"], tmp_path / "regions8")
    val8 = _regions(tiny / "demovlp_finetune_msrvtt.yaml", raw_shards["val"], tmp_path / "regions8_val")
    _train(tiny / "demovlp_finetune_msrvtt.yaml", tmp_path / "ft", f"data.train.urls={_urls(regions8)}",
           f"data.val.urls={_urls(val8)}", f"data.test.urls={_urls(val8)}", f"train.init_from={tmp_path / 'pre'}")
    qa_train = _regions(tiny / "demovlp_qa_msrvtt.yaml", raw_shards["qa_train"], tmp_path / "qa_regions")
    qa_val = _regions(tiny / "demovlp_qa_msrvtt.yaml", raw_shards["qa_val"], tmp_path / "qa_regions_val")
    _train(tiny / "demovlp_qa_msrvtt.yaml", tmp_path / "qa", f"data.train.urls={_urls(qa_train)}",
           f"data.val.urls={_urls(qa_val)}", f"data.test.urls={_urls(qa_val)}", f"train.init_from={tmp_path / 'pre'}")


def test_regionlearner_pretrain_then_finetune_on_cpu(raw_shards, tmp_path):
    tiny = PAPER / "tiny"
    _train(tiny / "regionlearner_pretrain.yaml", tmp_path / "pre", f"data.train.urls={_urls(raw_shards['train'])}")
    _train(tiny / "regionlearner_finetune_msrvtt.yaml", tmp_path / "ft", f"data.train.urls={_urls(raw_shards['train'])}",
           f"data.val.urls={_urls(raw_shards['val'])}", f"train.init_from={tmp_path / 'pre'}")
