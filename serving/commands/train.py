"""``petserve train``: not built yet."""
from __future__ import annotations

from serving.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("train", help="(train: coming with its issue)")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    raise CliError("'petserve train' is not available yet")
