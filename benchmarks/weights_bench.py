"""Weight-formatting throughput (GB/s of formatted output), llama2-MLP shapes.

Run: ``.venv/bin/python benchmarks/weights_bench.py [--repeat N] [--json]``. Cases: MatMulNBits
4-bit (block 128, with zero points) for 4096x11008 (gate/up) and 11008x4096 (down), plus the bf16
format of a 4096x4096 float32 weight. Each is timed as the best of ``--repeat`` runs; the target
for the 4-bit cases is >= 1 GB/s of output.
"""

from __future__ import annotations

import argparse
import json as jsonlib
import time
from collections.abc import Callable

import numpy as np

from npudispatch.operators.weights import format_bf16, format_q4

TARGET_GBPS = 1.0


def _best(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = fn().size
        times.append(time.perf_counter() - t0)
    return min(times), size


def _q4_case(k: int, n: int, block: int, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    kb = -(-k // block)
    b = rng.integers(0, 256, (n, kb, block // 2), dtype=np.uint8)
    scales = rng.random(n * kb, dtype=np.float32)
    zp = rng.integers(0, 256, n * (-(-kb // 2)), dtype=np.uint8)
    return lambda: format_q4(b, scales, zp, k, n, block)


def run(json: bool = False, repeat: int = 5) -> dict:
    """Time every case; print one line each (or one JSON document); return the results."""
    rng = np.random.default_rng(0)
    cases = {
        "q4_4096x11008_g128": _q4_case(4096, 11008, 128, rng),
        "q4_11008x4096_g128": _q4_case(11008, 4096, 128, rng),
    }
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    cases["bf16_4096x4096"] = lambda: format_bf16(w)
    results = {}
    for name, fn in cases.items():
        seconds, nbytes = _best(fn, repeat)
        results[name] = {
            "seconds": seconds,
            "output_bytes": nbytes,
            "gb_per_s": nbytes / seconds / 1e9,
        }
    if json:
        print(jsonlib.dumps(results, indent=2))
    else:
        for name, r in results.items():
            flag = (
                "" if not name.startswith("q4") or r["gb_per_s"] >= TARGET_GBPS else "  (< target)"
            )
            print(
                f"{name:24s} {r['output_bytes'] / 1e6:8.1f} MB  {r['seconds'] * 1e3:8.1f} ms  "
                f"{r['gb_per_s']:6.2f} GB/s{flag}"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run(json=args.json, repeat=args.repeat)


if __name__ == "__main__":
    main()
