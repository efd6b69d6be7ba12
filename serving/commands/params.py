"""``petserve params``: trainable-parameter count of a kind on a backbone preset, as JSON."""
from __future__ import annotations

import json

from petserve.adapters.backbone.config import PRESETS
from petserve.serving.cli import CliError
from petserve.serving.commands.options import make_config, parse_kind_options


def register(sub) -> None:
    p = sub.add_parser("params", help="count trainable parameters of an adapter kind",
                       description="Print {\"trainable\", \"total\", \"percent\"} as docs/METHODS.md §5 "
                                   "counts them; extra --name value pairs are kind options "
                                   "(e.g. --gate large).")
    p.add_argument("--backbone", default="bart-base", help=f"preset: {', '.join(PRESETS)} "
                   "(optionally +clip-vit-b32 / +rn101)")
    p.add_argument("--kind", required=True, help="adapter kind (lora, adapter, vlpet, ...)")
    p.set_defaults(run=run, accepts_extra=True)


def run(args, extra: list[str]) -> int:
    from petserve.adapters.kinds import KINDS
    from petserve.adapters.params import count
    if args.kind not in KINDS:
        raise CliError(f"unknown kind {args.kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    kind_cls = KINDS[args.kind]
    options = parse_kind_options(kind_cls, extra)
    make_config(kind_cls, options)                     # clear errors before counting
    try:
        result = count(args.backbone, args.kind, options)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(json.dumps(result))
    return 0
