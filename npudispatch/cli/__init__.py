"""Command-line interface: ``npudispatch <command> ...``.

Each command lives in its own module of this package exposing ``register(subparsers)``; the module
adds its sub-parser and sets ``func`` (a callable taking the parsed namespace and returning an exit
code). Add a command by writing such a module and listing it in ``_COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from npudispatch import __version__
from npudispatch.errors import NpuDispatchError

_COMMAND_MODULES = (
    "example",
    "inspect_cmd",
    "txn_cmd",
    "compile_cmd",
    "run_cmd",
    "plan_cmd",
    "profile_cmd",
    "generate_cmd",
)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit 2), like every other CLI error.

    Sub-parsers inherit the class, so each command reports its own name and help command.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered command."""
    parser = _Parser(
        prog="npudispatch",
        description="Compile ONNX models for AMD Ryzen AI NPUs and run them (emulator by default).",
    )
    parser.add_argument("--version", action="version", version=f"npudispatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"npudispatch.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``npudispatch`` script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NpuDispatchError as exc:
        print(f"npudispatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `npudispatch txn dump x.bin | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
