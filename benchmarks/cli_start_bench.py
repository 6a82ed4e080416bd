"""Start-up of the command line: ``npudispatch --help`` and ``npudispatch txn stats FILE``.

Each is a fresh process (``python -m npudispatch.cli ...``), timed wall-clock, best of
``repeat``. The ratio divides the slower of the two by ``python -c "import numpy"`` timed the
same way in the same run (numpy is the floor: transactions are parsed with it), so it says how
much npudispatch adds to that start. The target of issue 16 is an
absolute 0.3 s for each command: onnx, onnxruntime, ml_dtypes and matplotlib are imported only
by the commands that use them. FILE is the fused transaction of the small llama2 MLP example.
Run: ``python -m benchmarks.cli_start_bench [--json] [--quick]``.
"""

from __future__ import annotations

import json as jsonlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.3


def _best_seconds(argv: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def run(*, json: bool = False, quick: bool = False) -> dict:
    """Time the two commands and the bare interpreter; returns the measured values."""
    from npudispatch.dispatch import compile_model
    from npudispatch.examples import build_example

    repeat = 1 if quick else 5
    (program,) = compile_model(build_example("llama2-mlp-small")).programs.values()
    with tempfile.TemporaryDirectory() as tmp:
        txn = Path(tmp) / "txn.bin"
        txn.write_bytes(program.txn.to_bytes())
        cli = [sys.executable, "-m", "npudispatch.cli"]
        numpy_s = _best_seconds([sys.executable, "-c", "import numpy"], repeat)
        help_s = _best_seconds([*cli, "--help"], repeat)
        stats_s = _best_seconds([*cli, "txn", "stats", str(txn)], repeat)
    slowest = max(help_s, stats_s)
    result = {
        "repeat": repeat,
        "txn_bytes": program.txn.nbytes,
        "numpy_start_s": numpy_s,
        "help_s": help_s,
        "txn_stats_s": stats_s,
        "target_s": TARGET_S,
        "target_met": slowest <= TARGET_S,
        "ratio_to_numpy_start": slowest / numpy_s,
    }
    if json:
        print(jsonlib.dumps(result))
    else:
        print(
            f"CLI start-up, best of {repeat} (target {TARGET_S} s each)\n"
            f"  npudispatch --help      {help_s * 1e3:7.0f} ms\n"
            f"  npudispatch txn stats   {stats_s * 1e3:7.0f} ms ({program.txn.nbytes:,} B)\n"
            f"  python -c 'import numpy' {numpy_s * 1e3:6.0f} ms\n"
            f"  ratio (slower / numpy)  {slowest / numpy_s:7.2f}x"
        )
    return result


if __name__ == "__main__":
    run(json="--json" in sys.argv[1:], quick="--quick" in sys.argv[1:])
