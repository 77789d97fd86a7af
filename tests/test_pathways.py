"""The pathway registry: what model, config, data, show, compare, bench and cli read
per pathway comes from one entry each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from regionvlp import pathways
from regionvlp.config import ConfigError, declared_checks, load_config
from regionvlp.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def test_registry_is_what_config_and_cli_offer():
    assert pathways.names()[:2] == ("detector", "learned")
    assert declared_checks()["model.regions"]["choices"]() == pathways.names()
    with pytest.raises(ConfigError, match="choose one of detector, learned"):
        load_config(overrides=["model.regions=nope"])
    with pytest.raises(UserError, match="'model.regions' is 'nope'"):
        pathways.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        pathways.register(pathways.get("detector"))
    assert "detector" in pathways.with_view("boxes") and "learned" in pathways.with_view("masks")


def test_importing_the_registry_imports_no_pathway():
    code = ("import sys, regionvlp, regionvlp.pathways, regionvlp.config, regionvlp.cli; "
            "bad = [m for m in sys.modules if m.startswith(('timm', 'torchvision', 'regionvlp.detector', "
            "'regionvlp.region_learner'))]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_model_builds_by_the_registry_entry():
    from regionvlp.model import build_batch_transform, build_pathway

    det, learned = load_config(TINY / "detector.yaml"), load_config(TINY / "learned.yaml")
    assert type(build_pathway(det)).__name__ == "RegionTransformer"
    assert type(build_pathway(learned)).__name__ == "RegionLearnerPathway"
    assert type(build_batch_transform(det)).__name__ == "RegionExtractor"
    assert build_batch_transform(learned) is None
    assert pathways.of(det).regions_per_frame(det) == 4 and pathways.of(learned).regions_per_frame(learned) == 4


def test_loader_checks_the_region_shape_the_entry_names():
    from regionvlp.data.samples import decode_spec

    det = load_config(TINY / "detector.yaml", ["model.detector.num_regions=7"])
    spec = decode_spec(det, training=False)
    assert (spec.regions.num_regions, spec.regions.feature_dim) == (7, 1024)
    assert decode_spec(det, training=False, region_shape=False).regions is None
    assert decode_spec(load_config(TINY / "learned.yaml"), training=False).regions is None  # frames only


def test_bench_flags_follow_the_entry():
    from regionvlp.bench.train import bench_overrides

    assert "model.learner.img_size=96" in bench_overrides("learned", None, None, 96, "fp32")
    assert not any("img_size" in o for o in bench_overrides("detector", None, None, 96, "fp32"))


def test_compare_flags(tmp_path, capsys):
    from regionvlp.cli import main
    from regionvlp.compare import pathway_configs

    assert pathway_configs(["fused=c.yaml"], detector="d.yaml") == {"detector": "d.yaml", "fused": "c.yaml"}
    out = str(tmp_path / "c")
    for argv, message in [
        (["--pathways", "detector,learned", "--config", f"detector={TINY / 'detector.yaml'}"], "no --config for learned"),
        (["--pathways", "detector,nope"], "choose one of"),
        (["--pathways", "detector,detector"], "two or more different pathways"),
        (["--config", "detector"], "NAME=CONFIG"),
        (["--pathways", "detector,learned", "--detector", str(TINY / "detector.yaml"),
          "--config", f"learned={TINY / 'detector.yaml'}"], "learned config has model.regions=detector"),
        (["--runs", out], "at least two run directories"),
        (["--runs", out, out, "--detector", "x.yaml"], "not both"),
    ]:
        assert main(["compare", "--out", out, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert main(["bench", "train", "--regions", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert json.dumps(list(pathways.names()))  # plain names, printable in JSON
