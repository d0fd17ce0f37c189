"""The `ctfgen` command. Each module here holds a group of subcommands: their flags (`register`) beside their
handlers, and each handler calls the library. The flags of the training commands are made from their config
dataclasses, so their names, defaults, choices and help lines are written once, in the library."""

from __future__ import annotations

import argparse
import sys
import warnings

from ctfgen.cli import bench, data, evaluate, fit, sample, serve, tokenizer, train
from ctfgen.errors import CtfgenError

# In the order `ctfgen --help` lists them: from the tokenizer to the trained pipeline and its evaluation.
COMMAND_GROUPS = (tokenizer, data, train, fit, sample, bench, serve, evaluate)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other error (`--help` still shows the usage)."""

    def error(self, message):
        self.exit(2, f"ctfgen: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctfgen", description="Coarse-to-fine autoregressive image generation")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def _one_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI shows it: one line, like its errors (not Python's file, line and source)."""
    return f"ctfgen: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    python_format, warnings.formatwarning = warnings.formatwarning, _one_line
    try:
        return _run(argv)
    finally:
        warnings.formatwarning = python_format


def _run(argv: list[str] | None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)  # a number flag's rule refuses a bad value as it is read
        except SystemExit as e:  # --help (0) or a usage error (2, one line already printed)
            return e.code
        args.argv = list(sys.argv[1:] if argv is None else argv)
        args.func(args)
    except CtfgenError as e:
        print(f"ctfgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission denied mid-way: the system's reason, with the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"ctfgen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a training stopped by SIGTERM/SIGINT (TrainingStopped says where)
        print(f"ctfgen: interrupted: {e}" if str(e) else "ctfgen: interrupted", file=sys.stderr)
        return 130
    return 0
