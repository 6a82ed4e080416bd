"""The command line of a benchmark module run on its own (``python -m benchmarks.memory_bench``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def json_quick_main(run: Callable[..., dict[str, Any]], doc: str | None) -> None:
    """``--json`` (print the result as one JSON object) and ``--quick`` (tiny sizes) for a
    benchmark whose ``run(json=..., quick=...)`` returns its result."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (numbers not meaningful)")
    args = parser.parse_args()
    result = run(json=args.json, quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=1))
