"""The ``fourbit`` console script. Each subcommand lives in ``fourbit/commands/<name>.py`` and exposes
``register(subparsers)`` (adding its parser with ``set_defaults(func=...)``)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module; each module imports its heavy dependencies lazily inside its function
COMMANDS = ("formats", "train", "compare", "ptq", "explore", "accumulate", "report", "diagnose")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="4-bit and 8-bit floating point for AI")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fourbit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fourbit.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        print(f"fourbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
