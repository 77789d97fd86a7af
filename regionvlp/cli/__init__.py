"""The ``regionvlp`` command line: parse, load config, call the library, print JSON.

Every command is a thin skin over a library function. The JSON summary is one line
on stdout, printed last; progress bars and logs go to stderr. Errors a user can
cause (:class:`~regionvlp.errors.UserError`) end in one line on stderr and exit 2.

To add a command: write ``add_<name>(sub)`` in the module of its group (``cli/data.py``,
``cli/bench.py``, ``cli/runs.py``; shared helpers in ``cli/args.py``) that registers its parser with
``set_defaults(func=...)`` and list it in ``PARSER_BUILDERS``. Handlers import the
heavy libraries they need themselves so ``regionvlp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from regionvlp.errors import UserError
from regionvlp.cli.args import Parser, collect_overrides, print_json
from regionvlp.cli.data import add_config, add_data, add_datasets, add_qa, add_regions, add_shards, add_synth
from regionvlp.cli.bench import add_bench
from regionvlp.cli.runs import add_compare, add_demo, add_detector, add_eval, add_export, add_show, add_train
from regionvlp.cli.args import is_override, split_overrides


PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_regions,
    add_data,
    add_config,
    add_train,
    add_export,
    add_bench,
    add_synth,
    add_shards,
    add_datasets,
    add_qa,
    add_eval,
    add_compare,
    add_show,
    add_detector,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="regionvlp",
        description="Video-language pre-training with region features (detector or RegionLearner).",
    )
    from regionvlp import __version__

    parser.add_argument("--version", action="version", version=f"regionvlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        extras = collect_overrides(args, extras)
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exc:
        if exc.code == 2:  # a usage error, already printed as one line by Parser.error
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


__all__ = ["build_parser", "main", "print_json", "is_override", "split_overrides"]
