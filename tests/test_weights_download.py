"""Pretrained weights like torchvision's: a weights URL lands in the torch hub cache when
online, a second build reads the cache, offline is one error (exit 2) naming the URL.
A loopback HTTP server stands in for the weights host; the state dicts are tiny."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from regionvlp.config import load_config
from regionvlp.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


class _Host(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def weights_host(tmp_path, monkeypatch):
    """(base URL, folder it serves, request log); TORCH_HOME in tmp, online."""
    root = tmp_path / "host"
    root.mkdir()
    handler = type("Host", (_Host,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, handler.hits
    finally:
        server.shutdown()
        server.server_close()


def test_detector_default_weights_download_to_the_torch_cache_then_read_it(weights_host, tmp_path, monkeypatch):
    import regionvlp.detector.detector as det
    from torchvision.models import get_model_weights

    base, root, hits = weights_host
    member = get_model_weights("fasterrcnn_resnet50_fpn").DEFAULT
    monkeypatch.setattr(member.value, "url", f"{base}/tiny_detector.pth")  # the enum's URL -> the loopback host
    monkeypatch.setattr(det, "_construct", lambda arch, num_classes, kw: nn.Linear(3, 2))  # a tiny "detector"
    served = nn.Linear(3, 2)
    torch.save(served.state_dict(), root / "tiny_detector.pth")

    first = det.build_detector("fasterrcnn_resnet50_fpn", "DEFAULT")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "tiny_detector.pth"
    assert cached.is_file() and hits == ["/tiny_detector.pth"]
    assert torch.equal(first.weight, served.weight)
    second = det.build_detector("fasterrcnn_resnet50_fpn", "COCO_V1")  # same file: from the cache
    assert hits == ["/tiny_detector.pth"] and torch.equal(second.weight, served.weight)

    cached.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=f"{base}/tiny_detector.pth.*offline"):
        det.build_detector("fasterrcnn_resnet50_fpn", "DEFAULT")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(member.value, "url", f"{base}/missing.pth")  # the host answers 404
    with pytest.raises(UserError, match="could not download .*missing.pth"):
        det.build_detector("fasterrcnn_resnet50_fpn", "DEFAULT")
    assert not (cached.parent / "missing.pth").exists()


def test_run_offline_gives_exit_2_with_the_url(weights_host, tmp_path, capsys, monkeypatch):
    from torchvision.models import get_model_weights

    from regionvlp.cli import main

    base, root, hits = weights_host
    member = get_model_weights("fasterrcnn_resnet50_fpn").DEFAULT
    monkeypatch.setattr(member.value, "url", f"{base}/tiny_detector.pth")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "0")  # restored after the test: run.offline sets them for the process
    (tmp_path / "clips.tar").write_bytes(b"")  # the weights are refused before any shard is read
    code = main(["regions", "extract", str(TINY / "detector.yaml"), str(tmp_path / "clips.tar"), str(tmp_path / "out"),
                 "--set", "model.detector.arch=fasterrcnn_resnet50_fpn", "--set", "model.detector.weights=DEFAULT",
                 "--set", "run.offline=true"])
    err = capsys.readouterr().err
    assert code == 2 and f"{base}/tiny_detector.pth" in err and "offline" in err
    assert not hits  # nothing was fetched


def test_region_transformer_init_and_learner_pretrained_by_url(weights_host, tmp_path):
    import timm

    from regionvlp.model import build_pathway

    base, root, hits = weights_host
    cfg = load_config(TINY / "detector.yaml", [f"model.region_transformer.init={base}/vit_blocks.pth"])
    torch.manual_seed(1)
    fresh = build_pathway(load_config(TINY / "detector.yaml")).state_dict()
    vit = {k: v for k, v in fresh.items() if k.startswith(("blocks.", "norm."))}
    vit = {k: v + 0.25 for k, v in vit.items()}
    torch.save(vit, root / "vit_blocks.pth")
    got = build_pathway(cfg).state_dict()
    assert all(torch.equal(got[k], v) for k, v in vit.items()) and hits == ["/vit_blocks.pth"]
    build_pathway(cfg)  # the second build reads the cache
    assert hits == ["/vit_blocks.pth"]

    lcfg = load_config(TINY / "learned.yaml", [f"model.learner.pretrained={base}/test_vit.pth"])
    source = timm.create_model("test_vit", pretrained=False, img_size=64, num_classes=0)
    torch.save(source.state_dict(), root / "test_vit.pth")
    learned = build_pathway(lcfg)
    assert torch.equal(learned.vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "test_vit.pth").is_file()
