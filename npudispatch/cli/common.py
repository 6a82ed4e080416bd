"""Small helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from npudispatch.errors import ModelError


def parse_dims(items: list[str] | None) -> dict[str, int]:
    """Parse repeated ``--dims name=value`` options into a dict, with clear errors."""
    dims: dict[str, int] = {}
    for item in items or []:
        for part in item.split(","):
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep or not name or not value.strip().lstrip("-").isdigit():
                raise ModelError(f"--dims expects NAME=INT (e.g. --dims batch=1), got {part!r}")
            dims[name.strip()] = int(value)
    return dims


def add_dims_option(parser: argparse.ArgumentParser) -> None:
    """Add the ``--dims k=v`` option used by every command that reads a model."""
    parser.add_argument(
        "--dims",
        action="append",
        metavar="NAME=INT",
        help="bind a symbolic dimension (repeatable, or comma-separated)",
    )


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (stable key order as given)."""
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
