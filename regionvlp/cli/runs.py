"""``train``, ``export``, ``eval``, ``compare``, ``show``, ``detector`` and ``demo`` commands.
"""

from __future__ import annotations

import argparse

from regionvlp.errors import UserError
from regionvlp.cli.args import add_overrides, count, positive_int


# ------------------------------------------------------------------ train/export
def cmd_train(args: argparse.Namespace) -> dict | None:
    import os

    from regionvlp.train import run

    summary = run(args.config, args.overrides)
    return summary if int(os.environ.get("RANK", 0)) == 0 else None  # one JSON line per job


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a dual encoder (single process, or under deepspeed/torchrun)")
    p.add_argument("config", help="YAML run config (e.g. configs/tiny/detector.yaml)")
    add_overrides(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)


def cmd_export(args: argparse.Namespace) -> dict:
    from regionvlp.checkpoint import export

    return export(args.run_dir, args.out, tag=args.tag)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidated fp32 safetensors + config from a run's checkpoint")
    p.add_argument("run_dir", help="run directory (run.out_dir) or a checkpoint folder")
    p.add_argument("out", help="output folder (model.safetensors, config.yaml, text/)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00001000 (default: the newest)")
    p.set_defaults(func=cmd_export)


# -------------------------------------------------------------------------- eval
def eval_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--checkpoint", required=required, metavar="DIR",
                        help="a `regionvlp train` run dir (newest checkpoint), a checkpoints/stepN folder, or an export dir")
    parser.add_argument("--split", default=None, choices=("val", "test", "train"),
                        help="which data.<split>.urls (default val)")
    parser.add_argument("--cache", default=None, metavar="DIR", help="save/reuse the eval embeddings in DIR")
    parser.add_argument("--limit", type=positive_int, default=None, help="stop after N clips per rank (smoke tests only)")


def cmd_eval(args: argparse.Namespace) -> dict | None:
    from regionvlp.evaluation import run_eval

    if args.checkpoint is None:
        raise UserError("eval needs --checkpoint DIR (a training run dir, a checkpoint folder or an export dir)")
    return run_eval(args.config, args.checkpoint, args.overrides, split=args.split or "val", cache_dir=args.cache,
                    limit=args.limit)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="text<->video retrieval (R@1/5/10/50, MedR, MeanR) and multiple-choice accuracy",
                       description="Retrieval metrics of a trained model on data.val (or data.train with "
                                   "--split train). The model's architecture comes from the checkpoint; CONFIG "
                                   "gives the data. Runs under torchrun/deepspeed too (each clip counted once).")
    p.add_argument("config", help="YAML config naming the eval shards (data.val.urls), e.g. configs/downstream/*.yaml")
    eval_options(p, required=False)
    add_overrides(p)
    p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------- compare
def cmd_compare(args: argparse.Namespace) -> dict:
    from regionvlp.compare import compare_main

    from regionvlp.region_cache import RegionCache

    cache = None
    if args.region_cache:
        cache = RegionCache(args.region_cache, args.region_cache_frames, args.region_cache_dtype)
    elif args.region_cache_frames is not None or args.region_cache_dtype != "fp16":
        raise UserError("compare: --region-cache-frames / --region-cache-dtype need --region-cache DIR")
    return compare_main(out=args.out, detector=args.detector, learned=args.learned, runs=args.runs,
                        overrides=args.overrides, pathways_arg=args.pathways, configs=args.configs or [],
                        region_cache=cache)


def add_compare(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--region-cache", metavar="DIR", help="pathways that can train from region shards (detector) "
                                                         "train and validate from regions extracted once into "
                                                         "DIR/NAME/{train,val}; their final eval still runs the "
                                                         "detector in the loop on the raw val frames")
    p.add_argument("--region-cache-frames", type=int, metavar="N", help="training frames stored per clip in the cache "
                                                                        "(default data.num_frames; more keeps "
                                                                        "training's temporal sampling)")
    p.add_argument("--region-cache-dtype", default="fp16", choices=("fp16", "int8"), help="cached feature dtype")
    add_overrides(p, urls=("runs",), positional=True)  # applied to every config
    p.set_defaults(func=cmd_compare)


# -------------------------------------------------------------------------- show
def cmd_show_regions(args: argparse.Namespace) -> dict:
    from regionvlp.show import show_regions

    return show_regions(args.checkpoint, args.urls, args.out, clips=args.clips, seed=args.seed, device=args.device)


def add_show(sub: argparse._SubParsersAction) -> None:
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
    r.add_argument("--clips", type=positive_int, default=4, help="clips to show (default 4)")
    r.add_argument("--seed", type=count, default=None, help="which clips (default: the checkpoint's seed)")
    r.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")
    r.set_defaults(func=cmd_show_regions)


# ---------------------------------------------------------------------- detector
def cmd_detector_fit(args: argparse.Namespace) -> dict:
    from regionvlp.config import load_config
    from regionvlp.detector.fit import fit_detector

    cfg = load_config(args.config, args.overrides)
    return fit_detector(cfg, args.urls, out=args.out, val_urls=args.val_urls, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, num_frames=args.frames,
                        max_clips=args.max_clips, val_clips=args.val_clips, num_classes=args.num_classes,
                        trainable_layers=args.trainable_layers)


def add_detector(sub: argparse._SubParsersAction) -> None:
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
    add_overrides(fit, urls=("urls", "val_urls"))
    fit.add_argument("--val-urls", nargs="+", default=None, metavar="URL",
                     help="shards for box recall (default: data.val.urls)")
    fit.add_argument("--out", default=None, help="checkpoint path (default: RUN_OUT_DIR/detector.pt)")
    fit.add_argument("--steps", type=positive_int, default=300, help="optimizer steps (default 300)")
    fit.add_argument("--batch-size", type=positive_int, default=16, help="frames per step (default 16)")
    fit.add_argument("--lr", type=float, default=2.0e-3, help="AdamW peak learning rate (default 2e-3)")
    fit.add_argument("--frames", type=positive_int, default=None, help="frames per clip (default data.num_frames)")
    fit.add_argument("--max-clips", type=positive_int, default=None, help="read at most N training clips")
    fit.add_argument("--val-clips", type=positive_int, default=None, help="measure recall on at most N val clips")
    fit.add_argument("--num-classes", type=positive_int, default=None,
                     help="classes incl. background (default: largest label in the shards + 1)")
    fit.add_argument("--trainable-layers", type=count, default=3,
                     help="from pretrained weights: backbone stages that train, last first (torchvision's rule; "
                          "default 3 of ResNet's 5); the backbone's BatchNorm is frozen. Ignored for weights none")
    fit.set_defaults(func=cmd_detector_fit)


# -------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> dict:
    from regionvlp.demo import run_demo

    return run_demo(args.out, config_dir=args.config_dir, overrides=args.overrides)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the embedded default end to end: synth shards -> fitted detector -> both pathways -> report",
        description="Writes synthetic shards, fits a tiny Faster R-CNN on their boxes, trains the detector and "
                    "the learned pathway on CPU under one budget, evaluates both and writes OUT/report/report.md. "
                    "Settings come from configs/demo/*.yaml (demo.yaml holds the demo's own sizes).")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config-dir", default=None, help="folder with detector.yaml, learned.yaml (default configs/demo)")
    add_overrides(p)
    p.set_defaults(func=cmd_demo)
