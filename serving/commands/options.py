"""Turn ``--name value`` command-line pairs into a validated kind config."""
from __future__ import annotations

import typing

from pydantic import ValidationError

from petserve.serving.cli import CliError


def parse_pairs(extra: list[str], what: str) -> dict[str, str]:
    """``["--r", "8", "--gate=large"]`` -> {"r": "8", "gate": "large"} (``-`` in names read as
    ``_``); ``what`` names the options in errors."""
    options, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--"):
            raise CliError(f"unexpected argument {flag!r} ({what} are --name value)")
        name, _, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        if not value:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise CliError(f"option --{name} needs a value")
            value, i = extra[i + 1], i + 1
        options[name] = value
        i += 1
    return options


def parse_kind_options(kind_cls, extra: list[str]) -> dict:
    """``["--r", "8", "--targets", "enc.self.q,enc.self.v"]`` -> {"r": "8", "targets": (...)}.

    Values stay strings (pydantic coerces them); tuple-typed options split on commas. Unknown
    names are reported with the kind's known options."""
    fields = kind_cls.Config.model_fields
    options = parse_pairs(extra, "kind options")
    for name, value in options.items():
        if name not in fields:
            raise CliError(f"{kind_cls.name} has no option --{name}; options: "
                           + ", ".join(f"--{f}" for f in fields))
        if typing.get_origin(fields[name].annotation) is tuple:
            options[name] = tuple(v for v in value.split(",") if v)
    return options


def make_config(kind_cls, options: dict):
    try:
        return kind_cls.Config(**options)
    except ValidationError as e:
        where = lambda x: "--" + ".".join(map(str, x["loc"])) if x["loc"] else "options"
        msg = "; ".join(f"{where(x)}: {x['msg']}" for x in e.errors())
        raise CliError(f"invalid {kind_cls.name} options: {msg}") from None
