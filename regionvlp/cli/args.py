"""Shared argument helpers of the CLI: one-line usage errors, integer flags, and the one
override style (trailing ``key=value``, ``--set`` alias, overrides split out of URL lists).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from regionvlp.errors import UserError


def print_json(obj: object) -> None:
    """:func:`regionvlp.runtime.print_json`, imported on use: runtime imports torch, which
    ``regionvlp --help`` should not wait for."""
    from regionvlp.runtime import print_json as print_line

    print_line(obj)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like a :class:`UserError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"regionvlp: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int) -> Callable[[str], int]:
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


positive_int = int_at_least(1)


count = int_at_least(0)


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


def add_overrides(p: argparse.ArgumentParser, urls: tuple[str, ...] = (), tail: str | None = None,
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


def split_url_args(args: argparse.Namespace) -> list[str]:
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


def collect_overrides(args: argparse.Namespace, extras: list[str]) -> list[str]:
    """``args.overrides`` from every place they may stand; returns the extras that are not
    overrides (argparse leaves a trailing ``key=value`` after an option unparsed)."""
    if not hasattr(args, "set_overrides"):
        return extras
    found = list(getattr(args, "overrides", None) or []) + split_url_args(args)
    found += [t for t in extras if is_override(t)]
    args.overrides = found + list(args.set_overrides)
    return [t for t in extras if not is_override(t)]
