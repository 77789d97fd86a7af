"""``regions extract``: region shards equal the in-loop extractor, resume, skips counted,
and the same model trains from raw frames or from region shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regionvlp.config import load_config
from regionvlp.data import build_loader, iter_samples
from regionvlp.detector import build_extractor, build_pathway
from regionvlp.detector.extract import extract_regions
from regionvlp.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "detector.yaml"


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    import webdataset as wds

    from regionvlp.data.synth import synth

    root = tmp_path_factory.mktemp("regions_extract")
    synth(root / "syn", videos=5, val_videos=1, seed=1, size=64, frames=4, shard_size=3, progress=False)
    # one more shard with a broken video and a failed download record: skipped and counted
    with wds.TarWriter(str(root / "syn" / "train" / "000002.tar")) as sink:
        sink.write({"__key__": "broken", "mp4": b"\x00\x00\x00 not an mp4", "txt": "a broken clip"})
        sink.write({"__key__": "failed", "json": {"status": "failed_to_download"}, "txt": "never fetched"})
    return root


def test_extract_equals_in_loop_and_resumes(raw_shards, tmp_path):
    cfg = load_config(TINY)
    urls = [str(raw_shards / "syn" / "train" / "{000000..000002}.tar")]
    out = tmp_path / "regions"
    summary = extract_regions(cfg, urls, out, batch_size=2, progress=False)
    assert summary["samples"] == 5 and summary["shards_written"] == 3
    assert sum(summary["skipped"].values()) == 2, summary["skipped"]
    assert json.loads((out / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 2, "000002.tar": 0}

    # in the loop: the same frames through a freshly built extractor (another "process")
    extractor = build_extractor(cfg)
    raw = {s["__key__"]: s for s in iter_samples(urls, cfg, training=False)}
    stored = {s["__key__"]: s for s in iter_samples([str(out / "{000000..000002}.tar")], cfg, training=False)}
    assert sorted(raw) == sorted(stored) and len(raw) == 5
    # extraction ran in batches of 2, the live extractor here on 1 clip: fp32 reductions
    # may differ in the last bits between the two on another CPU, so features and boxes
    # compare within a tolerance (features are stored fp16: its rounding, 2^-11 relative,
    # plus fp32 noise); which regions were kept and their labels are discrete and equal
    for key, s in raw.items():
        live = extractor(s["frames"][None])  # [1, T, K, ...]
        r = stored[key]
        assert "frames" not in r
        assert r["region_feats"].dtype == torch.float16  # as stored: widened on the device (prepare_batch)
        torch.testing.assert_close(r["region_feats"].float(), live["region_feats"][0], rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(r["region_boxes"], live["region_boxes"][0], rtol=1e-4, atol=1e-3)
        assert torch.equal(r["region_mask"], live["region_mask"][0])
        assert torch.equal(r["region_labels"], live["region_labels"][0])
        assert r["region_mask"].shape == (cfg.data.num_frames, cfg.model.detector.num_regions)
        assert r["captions"] == s["captions"]

    # resume: finished shards are kept, a lost one and a cut-off temp file are redone
    (out / "000001.tar").unlink()
    (out / "000001.tar.tmp").write_bytes(b"half a tar")
    again = extract_regions(cfg, urls, out, batch_size=2, progress=False)
    assert again["shards_resumed"] == 2 and again["shards_written"] == 1
    assert again["samples"] == 5 and sum(again["skipped"].values()) == 2
    assert not (out / "000001.tar.tmp").exists()

    # region shards given as input: nothing to detect, every sample counted, and a run
    # that wrote nothing is an error naming the counts (exit 2 on the CLI)
    with pytest.raises(UserError, match=r"0 of 3 inputs written \(no_frames: 3\)"):
        extract_regions(cfg, [str(out / "000000.tar")], tmp_path / "twice", progress=False)

    # other settings into the same folder: refused, not mixed
    other = load_config(TINY, ["model.detector.num_regions=3"])
    with pytest.raises(Exception, match="other settings"):
        extract_regions(other, urls, out, progress=False)


def test_same_pathway_reads_region_shards_or_raw_frames(raw_shards, tmp_path):
    cfg = load_config(TINY)
    raw_url = str(raw_shards / "syn" / "val" / "000000.tar")
    out = tmp_path / "val_regions"
    extract_regions(cfg, [raw_url], out, progress=False)
    pathway = build_pathway(cfg).eval()
    extractor = build_extractor(cfg)

    cfg.data.val.urls = [str(out / "000000.tar")]
    region_batch = next(iter(build_loader(cfg, "val", training=False)))
    assert "frames" not in region_batch and region_batch["region_feats"].shape[-1] == 1024
    cfg.data.val.urls = [raw_url]
    raw_batch = next(iter(build_loader(cfg, "val", training=False)))
    live = extractor(raw_batch["frames"])
    with torch.no_grad():
        a = pathway(region_batch)
        live["region_feats"] = live["region_feats"].half().float()  # what the shard stores
        b = pathway({**raw_batch, **live})
    torch.testing.assert_close(a.cls, b.cls)
    torch.testing.assert_close(a.regions, b.regions)


def test_int8_and_keep_frames(raw_shards, tmp_path):
    from regionvlp.model import prepare_batch

    cfg = load_config(TINY)
    url = [str(raw_shards / "syn" / "train" / "000000.tar")]
    fp16 = extract_regions(cfg, url, tmp_path / "fp16", progress=False, keep_frames=1)
    int8 = extract_regions(cfg, url, tmp_path / "int8", progress=False, keep_frames=1, feature_dtype="int8")
    assert fp16["num_frames"] == int8["num_frames"] == 1 and int8["feature_dtype"] == "int8"
    from regionvlp.data.reader import tar_samples
    from regionvlp.data.skips import SkipCounter

    def member_bytes(name: str) -> int:
        return sum(len(s["regions.bin"]) for s in tar_samples([str(tmp_path / name / "000000.tar")], SkipCounter()))
    # K=4, F=1024: the header and the small arrays are a larger share than at K=30 (0.52x there, bench data)
    assert member_bytes("int8") <= 0.6 * member_bytes("fp16")
    a = {s["__key__"]: s for s in iter_samples([str(tmp_path / "fp16" / "000000.tar")], cfg, num_frames=1)}
    b = {s["__key__"]: s for s in iter_samples([str(tmp_path / "int8" / "000000.tar")], cfg, num_frames=1)}
    assert sorted(a) == sorted(b) and len(a) == 3
    for key, s in a.items():
        q = b[key]
        assert q["region_feats"].dtype == torch.int8 and q["region_feats"].shape == (1, 4, 1024)
        wide = prepare_batch({k: v[None] for k, v in q.items() if k.startswith("region_")}, None, torch.device("cpu"))
        real = s["region_mask"]  # padded slots are all zero in both
        cos = torch.nn.functional.cosine_similarity(wide["region_feats"][0][real], s["region_feats"][real].float(), -1)
        assert cos.min() >= 0.999
        assert torch.equal(q["region_mask"], s["region_mask"])
    # the loader reads 1 stored frame for a 2-frame config by repeating it, as with video
    loader_cfg = load_config(TINY, [f"data.val.urls=[{tmp_path / 'int8' / '000000.tar'}]"])
    batch = next(iter(build_loader(loader_cfg, "val", training=False)))
    assert batch["region_feats"].dtype == torch.int8 and batch["region_feats_scale"].shape[1:] == (2, 4)
    with pytest.raises(Exception, match="feature-dtype"):
        extract_regions(cfg, url, tmp_path / "bad", progress=False, feature_dtype="int4")
    with pytest.raises(Exception, match="other settings"):  # another feature dtype into the same folder
        extract_regions(cfg, url, tmp_path / "fp16", progress=False, keep_frames=1, feature_dtype="int8")


def test_cli_regions_extract(raw_shards, tmp_path, capsys):
    from regionvlp.cli import main

    out = tmp_path / "cli"
    rc = main(["regions", "extract", str(TINY), str(raw_shards / "syn" / "val" / "000000.tar"), str(out),
               "model.detector.num_regions=2"])  # a trailing override after OUT
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 1 and summary["num_regions"] == 2
    rc = main(["regions", "extract", str(TINY), str(raw_shards / "syn" / "val" / "000000.tar"), str(out / "q"),
               "--feature-dtype", "int8", "--keep-frames", "3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["feature_dtype"] == "int8" and summary["num_frames"] == 3
    assert main(["regions", "extract", str(TINY), str(raw_shards / "syn" / "val" / "000000.tar"), str(out / "z"),
                 "--feature-dtype", "bf16"]) == 2
    rc = main(["regions", "extract", str(TINY), str(tmp_path / "nothing-*.tar"), str(out / "x")])
    assert rc == 2  # nothing readable at all: a clear error
    missing = str(tmp_path / "gone.tar")
    rc = main(["regions", "extract", str(TINY), str(raw_shards / "syn" / "val" / "000000.tar"), missing, str(out / "y")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["shards_failed"] == [missing] and summary["skipped"] == {"unreadable_shard": 1}
    assert not (out / "y" / "gone.tar").exists()  # not finalised: a rerun retries it


def test_cli_regions_extract_of_only_bad_clips_exits_2(tmp_path, capsys):
    from data_shards import write_tar
    from regionvlp.cli import main

    bad = write_tar(tmp_path / "bad.tar", [{"__key__": f"{i:03d}", "mp4": b"not a video", "txt": "a caption"}
                                            for i in range(3)])
    rc = main(["regions", "extract", str(TINY), str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "regions extract: 0 of 3 inputs written" in err, err


def test_refitted_weights_in_the_same_file_do_not_resume(raw_shards, tmp_path):
    """The record holds the weights file's SHA-256: a detector re-fitted into the same path
    must not resume the regions its old weights made."""
    from regionvlp.detector.detector import build_detector

    cfg = load_config(TINY)
    weights = tmp_path / "detector.pt"
    model = build_detector(str(cfg.model.detector.arch), "none")
    torch.save({"arch": str(cfg.model.detector.arch), "state_dict": model.state_dict()}, weights)
    cfg.model.detector.weights = str(weights)
    url = [str(raw_shards / "syn" / "val" / "000000.tar")]
    first = extract_regions(cfg, url, tmp_path / "out", progress=False)
    assert first["shards_written"] == 1
    assert extract_regions(cfg, url, tmp_path / "out", progress=False)["shards_resumed"] == 1  # same file: resumed
    with torch.no_grad():
        next(iter(model.parameters())).add_(1.0)
    torch.save({"arch": str(cfg.model.detector.arch), "state_dict": model.state_dict()}, weights)
    with pytest.raises(UserError, match="other settings"):
        extract_regions(cfg, url, tmp_path / "out", progress=False)
