"""``petserve serve``: not built yet."""
from __future__ import annotations

from serving.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("serve", help="(serve: coming with its issue)")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    raise CliError("'petserve serve' is not available yet")
