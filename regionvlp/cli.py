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
import json
import sys
from typing import Any, Callable

from regionvlp.errors import UserError


def print_json(obj: Any) -> None:
    """One JSON line on stdout (the machine-readable result)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# ------------------------------------------------------------------------ config
def _cmd_config_show(args: argparse.Namespace) -> None:
    from regionvlp.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return None


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect run configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config (YAML + overrides)")
    show.add_argument("config", help="YAML run config")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    show.set_defaults(func=_cmd_config_show)


# ------------------------------------------------------------------------- synth
def _cmd_synth(args: argparse.Namespace) -> dict:
    from regionvlp.data.synth import synth

    return synth(args.out, videos=args.videos, seed=args.seed, val_videos=args.val_videos,
                 size=args.size, frames=args.frames, fps=args.fps, shard_size=args.shard_size,
                 workers=args.workers, compositional=args.compositional)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic video-caption shard set with boxes (train/ and val/)")
    p.add_argument("out", help="output folder (gets train/, val/, world.json)")
    p.add_argument("--videos", type=int, required=True, help="train clips")
    p.add_argument("--val-videos", type=int, default=None, help="val clips (default: videos/10, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="frame side in pixels (even)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=100, help="samples per tar")
    p.add_argument("--workers", type=int, default=1, help="processes rendering and encoding clips")
    p.add_argument("--compositional", action="store_true",
                   help="hold some shape+colour pairs out of train; every val clip has one")
    p.set_defaults(func=_cmd_synth)


# ------------------------------------------------------------------------- bench
# Each benchmark adds ``_add_bench_<name>(bench_sub)`` and lists it here; the
# measuring code lives in regionvlp/bench.py (or the module it measures).
_BENCH_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measurements against a baseline, printed as JSON")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for add in _BENCH_BUILDERS:
        add(bsub)


_PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_config,
    _add_bench,
    _add_synth,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as err:
        print(f"regionvlp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regionvlp: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print_json(result)
    return 0
