"""`cxrlt` command line: every pipeline step as a subcommand, `main(argv)` callable from tests.

DVC stages, Prefect tasks and people all call these same functions. Expected failures (bad data,
missing files, unknown names) print one clear message and exit 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import sys

from cxrlt.cli import data, registry, reports, reproduce, serving, training

EXPECTED = (ValueError, KeyError, FileNotFoundError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxrlt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, training, registry, serving, reports, reproduce):  # the order of `cxrlt --help`
        group.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except EXPECTED as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cxrlt {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`cxrlt registry list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
