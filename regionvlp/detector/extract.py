"""``regionvlp regions extract CONFIG URLS OUT``: offline detector regions as new shards.

Every input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` holding, per good sample,
``__key__``, ``txt`` (first caption), ``json`` (the sample's meta with all its captions
and a ``region_extractor`` record) and ``regions.bin`` (:mod:`regionvlp.data.regions`:
``feats`` float16 or int8 with a per-region scale [T,K,F], ``boxes`` float32 [T,K,4],
``mask`` bool [T,K], ``labels`` int64 [T,K], ``scores`` float32 [T,K]). Frames are
decoded as evaluation does (``data.eval_sampling``, ``data.size``), T =
``keep_frames`` (default ``data.num_frames``). A shard is written to ``NAME.tar.PID.tmp`` and
renamed when complete, so a rerun skips finished shards (resume) and redoes a cut-off one.
``sizes.json`` beside them counts the samples per shard. OUT is held by one ``regions
extract`` for the command's life (:meth:`Output.held`: a second exits 2 naming the first),
and temp files of dead writers are removed at start (never a live process's).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from regionvlp.data import iter_samples
from regionvlp.data.matching import check_written
from regionvlp.data.output import SampleTarWriter, clear_stale_temps, temp_name, write_sizes
from regionvlp.data.regions import FEATURE_DTYPES, REGION_EXT, region_bytes
from regionvlp.data.staging import Output
from regionvlp.data.samples import with_frames
from regionvlp.data.sources import load_sizes, parse_specs
from regionvlp.detector.extractor import build_extractor
from regionvlp.errors import UserError
from regionvlp.limits import SIZES_JSON_BYTES, ReadLimitError, read_text
from regionvlp.runtime import add_counts, resolve_device


MANIFEST = "extract.json"


def _shard_name(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return name if name.endswith(".tar") else name + ".tar"


def _batches(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(read_text(path, SIZES_JSON_BYTES))
    except (OSError, ValueError, ReadLimitError):
        return {}


def input_shards(cfg: Any, urls: Sequence[str]) -> tuple[list[str], list[str]]:
    """The input shard URLs and their output file names (which must not collide)."""
    shards = parse_specs(list(urls), allow_pipe=bool(cfg.data.allow_pipe)).urls
    if not shards:
        raise UserError("regions extract: no shards match the given URLS")
    names = [_shard_name(u) for u in shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"regions extract: input shards share file names ({', '.join(dupes[:3])}); "
                        "extract each folder/split into its own OUT")
    return shards, names


def weights_fingerprint(weights: str) -> dict[str, Any]:
    """``weights_sha256`` of a local weights file (a detector re-fitted into the same path
    must not resume an OUT its old weights made); nothing for a name or ``none``."""
    path = Path(weights).expanduser()
    if not path.is_file():
        return {}
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"weights_sha256": digest.hexdigest()}


def extractor_record(cfg: Any, *, feature_dtype: str = "fp16", keep_frames: int | None = None) -> dict[str, Any]:
    """The settings the regions depend on; a resumed OUT must have been made with the same."""
    d = cfg.model.detector
    return {"arch": str(d.arch), "weights": str(d.weights), **weights_fingerprint(str(d.weights)),
            "num_regions": int(d.num_regions),
            "num_frames": int(keep_frames or cfg.data.num_frames), "size": int(cfg.data.size),
            "feature_dtype": feature_dtype,
            "sampling": str(cfg.data.eval_sampling), "min_size": d.min_size, "max_size": d.max_size,
            "rpn_pre_nms_top_n": d.rpn_pre_nms_top_n, "rpn_post_nms_top_n": d.rpn_post_nms_top_n,
            "nms_thresh": float(d.nms_thresh), "score_thresh": float(d.score_thresh),
            "selection": str(d.selection)}


@dataclass
class OutFolder:
    """OUT's resume state: the extractor record and per-shard skips (``extract.json``) and
    the finished shards' sample counts (``sizes.json``)."""

    out: Path
    record: dict[str, Any]
    shard_skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, out: Path, record: dict[str, Any]) -> "OutFolder":
        out.mkdir(parents=True, exist_ok=True)
        previous = _read_json(out / MANIFEST)
        if previous and previous.get("extractor") != record:
            raise UserError(f"{out} holds regions extracted with other settings ({out / MANIFEST}); "
                            "use a new OUT folder or delete it to start over")
        sizes = load_sizes(str(out / "sizes.json")) or {}
        folder = cls(out, record, dict(previous.get("skipped", {})), sizes)
        folder.save_manifest()
        return folder

    def save_manifest(self) -> None:
        tmp = self.out / temp_name(MANIFEST)
        tmp.write_text(json.dumps({"extractor": self.record, "skipped": self.shard_skipped}, indent=1) + "\n")
        os.replace(tmp, self.out / MANIFEST)

    def finish(self, name: str, tmp: Path, count: int, skips: dict[str, int]) -> None:
        """A shard written completely: rename it into place and record it."""
        os.replace(tmp, self.out / name)
        self.shard_skipped[name] = skips
        self.save_manifest()
        self.sizes[name] = count
        write_sizes(self.out, self.sizes)


def region_sample(sample: dict[str, Any], regions: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, Any]:
    """One output sample: key, first caption, meta with all captions and the extractor
    record, and the sample's regions ([T, K, ...] tensors) as ``regions.bin`` with the
    record's feature dtype."""
    meta = dict(sample.get("meta") or {})
    meta.update(caption=sample["captions"][0], captions=list(sample["captions"]), region_extractor=record)
    return {"__key__": sample["__key__"], "txt": sample["captions"][0], "json": meta,
            REGION_EXT: region_bytes(regions, record["feature_dtype"])}


def extract_shard(url: str, tmp: Path, cfg: Any, extractor: Any, record: dict[str, Any], batch_size: int,
                  bar: Any) -> tuple[int, dict[str, int], int]:
    """Regions of every sample of shard ``url`` into the tar ``tmp``: ``(samples written,
    skips by reason, captions cut)``."""
    stream = iter_samples([url], cfg, training=False, num_frames=record["num_frames"])
    count = 0
    with SampleTarWriter(tmp) as sink:  # keys made safe, the file opened here: never a shell
        for batch in _batches(with_frames(stream, stream.counter), batch_size):
            frames = torch.stack([s["frames"] for s in batch])  # [B, T, 3, H, W] uint8
            regions = {k: v.cpu() for k, v in extractor(frames).items()}  # one copy per batch
            for i, s in enumerate(batch):
                sink.write(region_sample(s, {k: v[i] for k, v in regions.items()}, record))
            count += len(batch)
            bar.update(len(batch))
    return count, stream.skipped, stream.counter.captions_cut


def extract_regions(cfg: Any, urls: Sequence[str], out: str | Path, *, batch_size: int | None = None,
                    device: str | None = None, progress: bool = True, feature_dtype: str = "fp16",
                    keep_frames: int | None = None) -> dict[str, Any]:
    """Run the frozen extractor over ``urls`` and write region shards into ``out`` (see
    module doc): features stored as ``feature_dtype`` (fp16 | int8), ``keep_frames``
    frames per clip (default ``data.num_frames``). OUT is held by this process throughout
    (a second ``regions extract`` into it: :class:`UserError` naming this one)."""
    if feature_dtype not in FEATURE_DTYPES:
        raise UserError(f"regions extract: --feature-dtype {feature_dtype!r}; expected one of {', '.join(FEATURE_DTYPES)}")
    if keep_frames is not None and not 1 <= int(keep_frames) <= 1024:
        raise UserError(f"regions extract: --keep-frames {keep_frames}; expected 1..1024")
    start = time.perf_counter()
    shards, names = input_shards(cfg, urls)
    with Output.held(out, "regions extract") as staged:  # a folder, or a bucket staged locally; one writer
        clear_stale_temps(staged.local)  # leftovers of interrupted runs (this process holds OUT)
        folder = OutFolder.open(staged.local, extractor_record(cfg, feature_dtype=feature_dtype,
                                                               keep_frames=keep_frames))
        dev = resolve_device(device or str(cfg.run.device))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("CUDA was asked for but no GPU is visible; use --device cpu (or auto)")
        extractor = build_extractor(cfg).to(dev)
        done = _extract_pending(staged, folder, shards, names, cfg, extractor, int(batch_size or cfg.data.batch_size),
                                progress)
    skipped: dict[str, int] = dict(done["skipped"])
    for name in names:  # resumed shards' skips were recorded by the run that wrote them
        add_counts(skipped, folder.shard_skipped.get(name, {}))
    failed = done["failed"]
    if failed and not done["written"] and not done["resumed"]:
        raise UserError(f"regions extract: no input shard could be read (first: {failed[0]}); check the URLS")
    samples = sum(folder.sizes.get(n, 0) for n in names)
    check_written(samples, samples + sum(skipped.values()), skipped, "regions extract")  # nothing extracted: exit 2
    return {
        "out": staged.shown(),
        "samples": samples,
        "skipped": skipped,
        "shards": len(shards),
        "shards_written": done["written"],
        "shards_resumed": done["resumed"],
        "shards_failed": failed,  # unreadable inputs, not written; rerun to retry them
        "captions_cut": done["captions_cut"],  # cut to data.max_caption_chars
        "device": str(dev),
        "num_regions": int(cfg.model.detector.num_regions),
        "num_frames": folder.record["num_frames"],
        "feature_dtype": feature_dtype,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _extract_pending(staged: Output, folder: OutFolder, shards: list[str], names: list[str], cfg: Any,
                     extractor: Any, batch_size: int, progress: bool) -> dict[str, Any]:
    """Every input shard not finished in OUT, extracted under its per-process temp name
    and renamed (a bucket OUT: uploaded); the counts of this run."""
    done: dict[str, Any] = {"skipped": {}, "written": 0, "resumed": 0, "captions_cut": 0, "failed": []}
    bar = tqdm(desc="regions extract", unit="clip", file=sys.stderr, disable=not progress)
    for url, name in zip(shards, names):
        if name in folder.sizes and staged.has(name):
            done["resumed"] += 1
            continue
        folder.sizes.pop(name, None)
        tmp = staged.local / temp_name(name)  # NAME.tar.PID.tmp: never another writer's
        try:
            count, shard_skips, cut = extract_shard(url, tmp, cfg, extractor, folder.record, batch_size, bar)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        done["captions_cut"] += cut
        if count == 0 and shard_skips.get("unreadable_shard"):
            # not finalised: a rerun retries it (a network blip must not become an empty shard)
            tmp.unlink(missing_ok=True)
            done["failed"].append(url)
            add_counts(done["skipped"], shard_skips)
            continue
        folder.finish(name, tmp, count, shard_skips)
        staged.publish(name)  # a bucket OUT: the shard whole, then the resume state
        staged.publish(MANIFEST, "sizes.json", keep=True)
        done["written"] += 1
    bar.close()
    return done
