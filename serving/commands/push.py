"""``petserve push``: not built yet."""
from __future__ import annotations

from serving.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("push", help="(push: coming with its issue)")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    raise CliError("'petserve push' is not available yet")
