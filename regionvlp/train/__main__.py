"""Launcher entry: ``python -m regionvlp.train CONFIG [k=v …]``, also under
``deepspeed --module`` and ``torchrun -m``. Rank 0 prints the JSON summary."""

from __future__ import annotations

import argparse
import os
import sys

from regionvlp import dist
from regionvlp.errors import UserError
from regionvlp.runtime import json_stdout, print_json
from regionvlp.train import run


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """``CONFIG [k=v …]``; the ``--local_rank=N`` / ``--local_rank N`` the deepspeed
    launcher appends is accepted (LOCAL_RANK is taken from it when unset)."""
    p = argparse.ArgumentParser(prog="regionvlp.train", description="train a regionvlp dual encoder")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args.config, list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with json_stdout():  # stdout: only the summary; DeepSpeed's chatter to stderr
            summary = run(config, overrides)
            if int(os.environ.get("RANK", 0)) == 0:
                print_json(summary)
    except UserError as err:
        print(f"regionvlp: error: {err}", file=sys.stderr)
        return 2
    dist.destroy_group(wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
