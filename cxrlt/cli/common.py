"""What every command group of the `cxrlt` command line shares: how a subcommand is added, the parameters
file with its --set overrides."""

from __future__ import annotations

import yaml


def add_command(sub, name: str, fn, help_: str):
    """A subcommand `name` running `fn(args)`, its help also its description."""
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(fn=fn)
    return p


def add_params(p) -> None:
    """--params FILE and repeatable --set KEY=VALUE (read by `overrides`)."""
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. train.epochs=1")


def overrides(pairs: list[str]) -> dict:
    """--set values as {dotted key: YAML-parsed value}."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--set takes key=value (e.g. train.epochs=1), got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out
