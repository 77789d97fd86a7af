"""`regionvlp show regions` and the region/retrieval figures: what is drawn is the
models' own output for the clips shown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regionvlp import show
from regionvlp.config import load_config
from regionvlp.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


@pytest.fixture(scope="module")
def val_urls(tmp_path_factory) -> str:
    from regionvlp.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    return synth(out, videos=2, val_videos=6, size=64, frames=4, shard_size=100, progress=False)["val"]["urls"]


def export_untrained(name: str, out: Path) -> Path:
    """An export folder (model.safetensors + config.yaml) of a freshly built tiny model."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from regionvlp.model import build_model

    cfg = load_config(TINY / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    out.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {name: export_untrained(name, root / name) for name in ("detector", "learned")}


def spy(monkeypatch, name: str) -> list[tuple]:
    """Record the arguments of show.<name> (the drawing call) and still draw."""
    calls: list[tuple] = []
    real = getattr(show, name)

    def record(ax, frame, view):
        calls.append((frame.copy(), view))
        return real(ax, frame, view)

    monkeypatch.setattr(show, name, record)
    return calls


def test_pick_clips_is_fixed_by_seed(exports, val_urls):
    cfg = load_config(TINY / "detector.yaml")
    a, skipped = show.pick_clips([val_urls], cfg, 3, seed=0)
    b, _ = show.pick_clips([val_urls], cfg, 3, seed=0)
    c, _ = show.pick_clips([val_urls], cfg, 3, seed=5)
    assert [x.key for x in a] == [x.key for x in b] and skipped == {}
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(a, b))
    assert len({x.key for x in a}) == 3 and a[0].frames.shape == (2, 3, 64, 64)
    assert [x.key for x in a] != [x.key for x in c]  # 20 choose-3 draws: another seed, other clips
    with pytest.raises(UserError, match="--clips"):
        show.pick_clips([val_urls], cfg, 0, seed=0)


def test_drawn_boxes_are_the_extractors_real_boxes(exports, val_urls, tmp_path, monkeypatch):
    calls = spy(monkeypatch, "draw_boxes")
    summary = show.show_regions(exports["detector"], [val_urls], tmp_path / "out", clips=3)
    assert summary["regions"] == "detector" and len(summary["clips"]) == 3 and len(calls) == 3

    loaded = show.load(exports["detector"])
    clips, _ = show.pick_clips([val_urls], loaded.cfg, 3, seed=0)
    assert [c.key for c in clips] == summary["clips"]
    frames = torch.stack([c.frames for c in clips])  # [3, T, 3, 64, 64]
    regions = loaded.transform(frames)  # the frozen extractor, called directly
    t = frames.shape[1] // 2
    for b, (frame, view) in enumerate(calls):
        assert np.array_equal(frame, frames[b, t].permute(1, 2, 0).numpy())
        real = regions["region_mask"][b, t]
        assert 0 < int(real.sum()) == len(view.boxes) <= 4
        expect = regions["region_boxes"][b, t][real] * torch.tensor([64.0, 64.0, 64.0, 64.0])
        np.testing.assert_allclose(view.boxes, expect.numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(view.scores, regions["region_scores"][b, t][real].numpy(), rtol=1e-5)
    png = Path(summary["image"])
    assert png.read_bytes()[:4] == b"\x89PNG" and 1000 < png.stat().st_size < show.MAX_PNG_BYTES


def test_drawn_masks_are_the_learners_own_masks(exports, val_urls, tmp_path, monkeypatch):
    calls = spy(monkeypatch, "draw_masks")
    summary = show.show_regions(exports["learned"], [val_urls], tmp_path / "out", clips=2, seed=1)
    assert summary["regions"] == "learned" and len(calls) == 2

    loaded = show.load(exports["learned"])
    clips, _ = show.pick_clips([val_urls], loaded.cfg, 2, seed=1)
    frames = torch.stack([c.frames for c in clips])
    seen: list[torch.Tensor] = []  # the RegionLearner's output, taken by a hook of this test
    handle = loaded.model.pathway.learner.register_forward_hook(lambda m, a, out: seen.append(out.masks))
    with torch.no_grad():
        loaded.model.encode_video({"frames": frames})
    handle.remove()
    masks = seen[0]  # [B, T, R, N]
    B, T, R, N = masks.shape
    h, w = loaded.model.pathway.grid
    t = T // 2
    for b, (_, view) in enumerate(calls):
        assert view.masks.shape == (R, h, w) == (4, h, w) and h * w == N
        np.testing.assert_allclose(view.masks, masks[b, t].reshape(R, h, w).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(view.masks.sum(0), 1.0, atol=1e-5)  # softmax over the R regions


def test_show_regions_cli_and_wrong_kinds(exports, val_urls, tmp_path, capsys):
    from regionvlp.cli import main

    assert main(["show", "regions", str(exports["learned"]), val_urls, "--out", str(tmp_path / "o"),
                 "--clips", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["regions"] == "learned" and len(out["clips"]) == 2 and Path(out["image"]).is_file()
    first = Path(out["image"]).read_bytes()
    assert main(["show", "regions", str(exports["learned"]), val_urls, "--out", str(tmp_path / "o"),
                 "--clips", "2"]) == 0
    assert Path(out["image"]).read_bytes() == first  # same seed, same clips, same picture
    capsys.readouterr()

    fit_ckpt = tmp_path / "detector.pt"  # what `regionvlp detector fit` writes: a detector alone
    torch.save({"arch": "fasterrcnn_tiny", "state_dict": {}}, fit_ckpt)
    for wrong in (fit_ckpt, tmp_path / "o"):
        assert main(["show", "regions", str(wrong), val_urls, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "run dir" in err[0] and "export" in err[0]
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no GPU"):
            show.load(exports["learned"], "cuda")
    learned = show.load(exports["learned"])
    with pytest.raises(UserError, match="learned-pathway checkpoint, not a detector one"):
        show.detector_views(learned, torch.zeros(1, 2, 3, 64, 64, dtype=torch.uint8), 0)


def test_retrieval_ranks_as_the_model_scores(exports, val_urls, tmp_path, monkeypatch):
    models = {name: show.load(path) for name, path in exports.items()}
    items, thumbs = show.retrieval_views(models, [val_urls], queries=3, top=5, seed=0)
    assert len(items) == 3 and len({it.true_key for it in items}) == 3
    clips, _ = show.pick_clips([val_urls], models["learned"].cfg, 6, seed=0)  # all 6 val clips
    frames = torch.stack([c.frames for c in clips])
    from regionvlp import data

    tok = data.load_tokenizer(str(models["learned"].cfg.model.text.name))
    for name, loaded in models.items():
        with torch.no_grad():
            batch = {"frames": frames}
            if loaded.transform is not None:
                batch.update(loaded.transform(frames))
            video = loaded.model.encode_video(batch)
            for item in items:
                ids, mask = data.tokenize(tok, [item.caption], int(loaded.cfg.data.max_words))
                text = loaded.model.encode_text(torch.as_tensor(ids).long(), torch.as_tensor(mask).long())
                scores = loaded.model.similarity(video, text)[:, 0]  # [6]
                expect = [clips[i].key for i in scores.topk(5).indices.tolist()]
                assert item.ranked[name] == expect, (name, item.caption)
    assert set(thumbs) == {c.key for c in clips} and thumbs[clips[0].key].shape == (64, 64, 3)

    calls: list[tuple[int, bool]] = []
    real = show.draw_thumb
    monkeypatch.setattr(show, "draw_thumb", lambda ax, th, rank, true: (calls.append((rank, true)), real(ax, th, rank, true)))
    png = show.plot_retrieval(items, thumbs, tmp_path / "retrieval.png")
    assert len(calls) == 3 * 2 * 5
    outlined = [true for _, true in calls]
    assert sum(outlined) == sum(it.true_key in r for it in items for r in it.ranked.values())
    assert png.read_bytes()[:4] == b"\x89PNG" and 1000 < png.stat().st_size < show.MAX_PNG_BYTES


def test_box_labels_are_class_names_when_the_weights_have_them():
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = show.class_names(SimpleNamespace(arch="fasterrcnn_resnet50_fpn", weights="COCO_V1"))
    assert names[:2] == ["__background__", "person"]  # the torchvision enum's meta, no download
    assert show.class_names(SimpleNamespace(arch="fasterrcnn_tiny", weights="none")) is None
    view = show.DetectorView(boxes=np.array([[2.0, 3.0, 20.0, 30.0], [5.0, 5.0, 9.0, 9.0]]),
                             scores=np.array([0.9, 0.2]), labels=["person", ""])
    fig, ax = plt.subplots()
    show.draw_boxes(ax, np.zeros((32, 32, 3), np.uint8), view)
    assert [t.get_text() for t in ax.texts] == ["person 0.90"]  # unnamed boxes get no text
    rects = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
    assert rects == [(2.0, 3.0, 18.0, 27.0), (5.0, 5.0, 4.0, 4.0)]
    plt.close(fig)
