"""The ``petserve`` command line. Each subcommand lives in ``serving/commands/<name>.py`` and
registers itself with ``register(subparsers)``; errors print one line naming the problem (exit 2)."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules in serving/commands/
COMMANDS = ("serve", "train", "train_generator", "params", "push", "import_seed", "sft_files",
            "build_cache")


class CliError(Exception):
    """A user error: printed as ``petserve: error: <message>`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petserve", description=(
        "Serve many parameter-efficient adapters on one frozen VL-T5 / VL-BART backbone."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"petserve.serving.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args, extra) or 0)
    except CliError as e:
        print(f"petserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as ``python -m petserve.serving.cli``: subcommands import ``petserve.serving.cli``, so
    # use that module's CliError (not this __main__ copy's) by delegating to it.
    from petserve.serving.cli import main as package_main
    sys.exit(package_main())
