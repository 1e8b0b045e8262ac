"""The ``fourbit`` console script (also ``python -m fourbit``). Each subcommand lives in
``fourbit/commands/<name>.py`` and exposes ``register(subparsers)`` (adding its parser with
``set_defaults(func=...)``).

A user mistake (a bad option value, a missing, unreadable or malformed file) ends the command with one
line, ``fourbit <command>: error: <what and which file>``, and exit status 2, as argparse does for bad
arguments; a Ctrl-C that the command does not handle itself ends it with status 130. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys

# subcommand -> module; each module imports its heavy dependencies lazily inside its function
COMMANDS = ("formats", "train", "compare", "ptq", "explore", "accumulate", "report", "diagnose", "cpt")
USAGE_ERROR = 2  # argparse's status for bad arguments
INTERRUPTED = 130  # 128 + SIGINT

# What a bad input raises: option values (ValueError, json's and unicode's decode errors included), files
# (OSError: missing, a directory, unreadable, a config Hugging Face cannot parse), torch.load of a
# truncated or foreign file (EOFError, UnpicklingError, RuntimeError from its zip reader).
USER_ERRORS = (ValueError, OSError, EOFError, pickle.UnpicklingError, RuntimeError)
USER_ERROR_NAMES = ("SafetensorError", "HeaderTooLarge")  # safetensors' errors, matched without importing it


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


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or type(e).__name__ in USER_ERROR_NAMES


def one_line(e: BaseException) -> str:
    """The error as one line: its message (its type when it has none, as a bare EOFError), newlines folded."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if isinstance(e, (EOFError, pickle.UnpicklingError)) else text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nfourbit {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"fourbit {args.command}: error: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
