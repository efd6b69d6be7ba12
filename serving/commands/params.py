"""``petserve params``: trainable-parameter count of a kind on a backbone preset, as JSON."""
from __future__ import annotations

import json

from petserve.adapters.backbone.config import AUDIO_PRESETS, PRESETS
from petserve.serving.cli import CliError
from petserve.serving.commands.options import make_config, parse_kind_options


def register(sub) -> None:
    p = sub.add_parser("params", help="count trainable parameters of an adapter kind",
                       description="Print {\"trainable\", \"total\", \"percent\"} as docs/METHODS.md §5 "
                                   "counts them; extra --name value pairs are kind options "
                                   "(e.g. --gate large).")
    p.add_argument("--backbone", help=f"preset: {', '.join(PRESETS)} (optionally +clip-vit-b32 / "
                   f"+rn101; default bart-base); audio: {', '.join(AUDIO_PRESETS)} (default ast-base)")
    p.add_argument("--family", choices=("vl", "audio"), default="vl", help="backbone family")
    p.add_argument("--classes", type=int, default=50, help="audio: classes of the head (default "
                   "50, ESC-50's)")
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
        if args.family == "audio":
            from petserve.adapters.params import count_audio
            if args.classes < 1:
                raise CliError(f"--classes must be at least 1 (got {args.classes})")
            result = count_audio(args.backbone or "ast-base", args.kind, options, args.classes)
        else:
            result = count(args.backbone or "bart-base", args.kind, options)
    except (ValueError, KeyError) as e:
        raise CliError(str(e).strip("'\"")) from None
    print(json.dumps(result))
    return 0
