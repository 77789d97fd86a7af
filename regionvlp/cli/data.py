"""``config``, ``synth``, ``qa``, ``shards``, ``datasets``, ``data`` and ``regions`` commands.
"""

from __future__ import annotations

import argparse
from regionvlp.cli.args import add_overrides, count, positive_int, print_json


# ------------------------------------------------------------------------ config
def cmd_config_show(args: argparse.Namespace) -> None:
    from regionvlp.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    from regionvlp.runtime import result_stream

    result_stream().write(to_yaml(cfg))  # the result is YAML here, not a JSON line
    return None


def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect run configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config (YAML + overrides; "
                                        "environment reads stay ${oc.env:NAME})")
    show.add_argument("config", help="YAML run config")
    add_overrides(show)
    show.set_defaults(func=cmd_config_show)


# ------------------------------------------------------------------------- synth
def cmd_synth(args: argparse.Namespace) -> dict:
    from regionvlp.data.synth import synth

    return synth(args.out, videos=args.videos, seed=args.seed, val_videos=args.val_videos,
                 size=args.size, frames=args.frames, fps=args.fps, shard_size=args.shard_size,
                 workers=args.workers, compositional=args.compositional, qa=args.qa)


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic video-caption shard set with boxes (train/ and val/)")
    p.add_argument("out", help="output folder (gets train/, val/, world.json)")
    p.add_argument("--videos", type=positive_int, required=True, help="train clips")
    p.add_argument("--val-videos", type=positive_int, default=None, help="val clips (default: videos/10, at least 1)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--size", type=positive_int, default=128, help="frame side in pixels (even)")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per clip")
    p.add_argument("--fps", type=positive_int, default=8)
    p.add_argument("--shard-size", type=positive_int, default=100, help="samples per tar")
    p.add_argument("--workers", type=positive_int, default=1, help="processes rendering and encoding clips")
    p.add_argument("--compositional", action="store_true",
                   help="hold some shape+colour pairs out of train; every val clip has one")
    p.add_argument("--qa", action="store_true",
                   help="add video QA pairs to every clip's json (colour, shape, direction, count questions)")
    p.set_defaults(func=cmd_synth)


# ---------------------------------------------------------------------------- qa
def cmd_qa_vocab(args: argparse.Namespace) -> dict:
    from regionvlp.qa.vocab import vocab_command

    return vocab_command(args.urls, args.top, args.out)


def add_qa(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qa", help="video question answering tools (answer vocabulary)")
    qsub = p.add_subparsers(dest="qa_command", required=True)
    v = qsub.add_parser("vocab", help="the K most frequent training answers in one streaming pass -> vocab.json",
                        description="Counts the (lower-cased) answers of every question/answer pair in the "
                                    "shards and keeps the K most frequent (ties by answer text). Give the file "
                                    "to training with qa.vocab=FILE; by default training builds it itself.")
    v.add_argument("urls", nargs="+", help="training shard specs (brace patterns allowed)")
    v.add_argument("--top", type=positive_int, required=True, help="K answers (1500 MSRVTT-QA, 1000 MSVD-QA)")
    v.add_argument("--out", required=True, help="output vocab.json")
    v.set_defaults(func=cmd_qa_vocab)


# ------------------------------------------------------------------------ shards
def cmd_shards_write(args: argparse.Namespace) -> dict:
    from regionvlp.data.writer import write_shards

    return write_shards(args.src, args.out, video_col=args.video_col, caption_col=args.caption_col, qa=args.qa,
                        **write_options(args))


def cmd_shards_convert(args: argparse.Namespace) -> dict:
    from regionvlp.data.convert import convert_shards

    return convert_shards(args.urls, args.out, keep_frames=args.keep_frames, drop_video=args.drop_video,
                          jpeg_quality=args.jpeg_quality, allow_pipe=args.allow_pipe, **frame_side(args))


def frame_side(args: argparse.Namespace) -> dict:
    """``--frame-side`` as a keyword when given (the writer's default otherwise)."""
    return {} if args.frame_side is None else {"frame_side": args.frame_side}


def add_frame_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--keep-frames", type=count, required=required, default=None if required else 0, metavar="N",
                   help="frame shards: store N evenly spaced frames per clip as JPEG (frame000.jpg ...)")
    p.add_argument("--drop-video", action="store_true", help="with --keep-frames: leave the video out of the sample")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the stored frames (1-100)")
    p.add_argument("--frame-side", type=count, default=None, metavar="S",
                   help="short side of the stored frames (default 256: a 224 crop with room to crop; 0: as decoded)")


def add_write_options(p: argparse.ArgumentParser) -> None:
    """The shard writer's options, shared by `shards write` and `datasets prepare`."""
    p.add_argument("--shard-size", type=positive_int, default=1000, help="inputs per shard")
    p.add_argument("--workers", type=count, default=1, help="processes reading/re-encoding videos")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="re-encode videos whose longer side exceeds this (with --keep-frames the video keeps its "
                        "size; --frame-side bounds the stored frames)")
    p.add_argument("--max-seconds", type=float, default=None, help="re-encode (cut) videos longer than this")
    p.add_argument("--fps", type=float, default=None, help="re-encode videos faster than this frame rate")
    add_frame_options(p, required=False)
    p.add_argument("--max-caption-chars", type=positive_int, default=2000,
                   help="cut longer captions to this many characters (counted in captions_cut)")


def write_options(args: argparse.Namespace) -> dict:
    return dict(shard_size=args.shard_size, workers=args.workers, max_side=args.max_side,
                max_seconds=args.max_seconds, fps=args.fps, keep_frames=args.keep_frames,
                drop_video=args.drop_video, jpeg_quality=args.jpeg_quality, max_caption_chars=args.max_caption_chars,
                **frame_side(args))


def cmd_shards_check(args: argparse.Namespace) -> dict:
    from regionvlp.data.check import check_shards

    result = check_shards(args.urls, config=args.config, overrides=args.overrides,
                          max_bad_keys=args.max_bad_keys, allow_pipe=args.allow_pipe)
    if args.strict and not result["ok"]:
        print_json(result)
        raise SystemExit(1)  # for scripts: vet shards before a long run
    return result


def add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write video-caption tar shards, check them before a long run")
    ssub = p.add_subparsers(dest="shards_command", required=True)
    w = ssub.add_parser("write", help="CSV/JSONL manifest or folder of videos + .txt captions -> tar shards")
    w.add_argument("src", help="manifest (.csv/.tsv with a header, .jsonl) or a folder of videos with sidecar .txt")
    w.add_argument("out", help="output folder (NNNNNN.tar, sizes.json, skipped.jsonl)")
    add_write_options(w)
    w.add_argument("--video-col", default=None, help="manifest column with the video path or URL")
    w.add_argument("--caption-col", default=None, help="manifest column with the caption")
    w.add_argument("--qa", default=None, metavar="FILE",
                   help="video QA annotations joined by video id: the MSRVTT-QA / MSVD-QA JSON or JSONL "
                        "with video_id, question, answer (inputs with QA pairs need no caption)")
    w.set_defaults(func=cmd_shards_write)
    v = ssub.add_parser("convert", help="video shards (e.g. from video2dataset) -> frame shards, streaming, resumable")
    v.add_argument("urls", nargs="+", help="input shard specs (brace patterns allowed)")
    v.add_argument("out", help="output folder (same shard names, sizes.json, skipped.jsonl)")
    v.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    add_frame_options(v, required=True)
    v.set_defaults(func=cmd_shards_convert)
    c = ssub.add_parser("check", help="decode every sample as training would; report good/bad counts and bad keys")
    c.add_argument("urls", nargs="+", help="shard specs (brace patterns allowed)")
    c.add_argument("--config", default=None, help="run config whose data section (frames, size, backend) to use")
    add_overrides(c, urls=("urls",))
    c.add_argument("--max-bad-keys", type=count, default=1000, help="list at most this many bad keys")
    c.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    c.add_argument("--strict", action="store_true", help="exit 1 (after the JSON) when anything is bad")
    c.set_defaults(func=cmd_shards_check)


# ---------------------------------------------------------------------- datasets
def cmd_datasets_list(args: argparse.Namespace) -> dict:
    from regionvlp.data.datasets import list_datasets

    return list_datasets()


def cmd_datasets_prepare(args: argparse.Namespace) -> dict:
    from regionvlp.data.datasets.prepare import prepare_dataset

    return prepare_dataset(args.name, args.annotations, args.videos, args.out, args.split, **write_options(args))


def add_datasets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="public benchmarks and pretraining sets from their own annotation files")
    dsub = p.add_subparsers(dest="datasets_command", required=True)
    dsub.add_parser("list", help="the datasets prepare knows, the files each reads, their splits").set_defaults(
        func=cmd_datasets_list)
    d = dsub.add_parser("prepare", help="a dataset's annotation files as shipped + its videos -> OUT/SPLIT shards",
                        description="Reads NAME's annotation files as their authors ship them, finds each clip "
                                    "under --videos by the dataset's own naming, and writes OUT/SPLIT/NNNNNN.tar, "
                                    "sizes.json and dataset.json (see docs/datasets.md).")
    d.add_argument("name", help="dataset (regionvlp datasets list)")
    d.add_argument("--annotations", nargs="+", required=True, metavar="PATH", help="the annotation files, as shipped")
    d.add_argument("--videos", required=True, metavar="DIR", help="folder holding the videos (any depth)")
    d.add_argument("out", help="output folder; each split goes to OUT/SPLIT")
    d.add_argument("--split", default=None, help="write this split only (default: every split the files give)")
    add_write_options(d)
    d.set_defaults(func=cmd_datasets_prepare)


# -------------------------------------------------------------------------- data
def data_config(args: argparse.Namespace):
    """The run config (or defaults) with the command line's data options on top."""
    from regionvlp.config import load_config

    flags = [f"data.{key}={value}" for key, value in (("num_frames", args.frames), ("size", args.size),
                                                      ("backend", args.backend)) if value is not None]
    cfg = load_config(args.config, list(args.overrides) + flags)  # flags checked like config values
    if args.allow_pipe:
        cfg.data.allow_pipe = True
    return cfg


def cmd_data_inspect(args: argparse.Namespace) -> dict:
    from regionvlp.data.inspect import inspect_samples

    return inspect_samples(args.urls, data_config(args), limit=args.limit, training=args.train, emit=print_json,
                           region_shape=args.config is not None)  # no config: K/F of the first region sample


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", nargs="+", help="shard specs (brace patterns, ::-joined sources, s3:// http(s):// gs://)")
    p.add_argument("--frames", type=positive_int, default=None, help="T frames per clip (default: data.num_frames)")
    p.add_argument("--size", type=positive_int, default=None, help="output side in pixels (default: data.size)")
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default=None, help="video decoder (default: data.backend)")
    p.add_argument("--config", default=None, help="run config whose data section to start from")
    add_overrides(p, urls=("urls",))
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="look at the data stream as training sees it")
    dsub = p.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("inspect", help="stream + decode samples: one JSON line each, then a JSON summary")
    add_data_options(i)
    i.add_argument("--limit", type=count, default=10, help="stop after N good samples (0: all)")
    i.add_argument("--train", action="store_true", help="training-time sampling/crops instead of eval's")
    i.set_defaults(func=cmd_data_inspect)


# ----------------------------------------------------------------------- regions
def cmd_regions_extract(args: argparse.Namespace) -> dict:
    from regionvlp.config import load_config
    from regionvlp.detector.extract import extract_regions

    cfg = load_config(args.config, args.overrides)
    return extract_regions(cfg, args.urls, args.out, batch_size=args.batch, device=args.device,
                           feature_dtype=args.feature_dtype, keep_frames=args.keep_frames)


def add_regions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("regions", help="detector regions (frozen Faster R-CNN)")
    rsub = p.add_subparsers(dest="regions_command", required=True)
    e = rsub.add_parser("extract", help="offline detector regions of raw video shards, written as region shards")
    e.add_argument("config", help="run config (model.detector, data.num_frames/size/eval_sampling)")
    e.add_argument("urls", nargs="+", help="raw video shard specs (brace patterns allowed)")
    e.add_argument("out", help="output folder (one region shard per input shard, sizes.json, extract.json)")
    e.add_argument("--batch", type=positive_int, default=None, help="clips per extractor pass (default: data.batch_size)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: run.device")
    e.add_argument("--feature-dtype", choices=("fp16", "int8"), default="fp16",
                   help="stored region features: fp16, or int8 with a symmetric per-region scale (about half the bytes)")
    e.add_argument("--keep-frames", type=positive_int, default=None,
                   help="frames per clip to extract and store (default: data.num_frames)")
    add_overrides(e, urls=("urls",), tail="out")
    e.set_defaults(func=cmd_regions_extract)
