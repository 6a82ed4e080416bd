"""Benchmark the scratch planner: speed and packing quality of each strategy.

Run: ``.venv/bin/python benchmarks/plan_bench.py [--n 10000] [--seed 0] [--workload all]``

Workloads (all synthetic, generated here):

* ``network`` — one tensor per op, mostly short lifetimes (geometric, mean ~3 ops) plus 5 %
  long-lived skip connections; sizes log-uniform 256 B .. 4 MiB (a deep transformer-like trace);
* ``uniform`` — random [first, last] over n/10 ops, random sizes (many simultaneous lifetimes,
  the hard case for the collision index);
* ``plan`` — ``build_plan`` end to end on the ``network`` trace (with validation).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from npudispatch.dispatch.allocate import (
    ALL_STRATEGIES,
    Interval,
    allocate,
    dd_style_no_reuse_size,
    lower_bound,
)
from npudispatch.dispatch.plan import TensorRequest, build_plan


def network_trace(n: int, rng: np.random.Generator) -> list[Interval]:
    """One tensor per op: short lifetimes, a few long skip connections."""
    span = rng.geometric(1 / 3, n) - 1
    skips = rng.random(n) < 0.05
    span[skips] = rng.integers(10, 200, int(skips.sum()))
    sizes = np.exp(rng.uniform(np.log(256), np.log(4 << 20), n)).astype(np.int64)
    return [Interval(f"t{i}", int(sizes[i]), i, min(i + int(span[i]), n - 1)) for i in range(n)]


def uniform_trace(n: int, rng: np.random.Generator) -> list[Interval]:
    """Random lifetimes over n/10 ops: ~n/20 tensors live at once on average."""
    ops = max(n // 10, 1)
    a = rng.integers(0, ops, n)
    b = rng.integers(0, ops, n)
    sizes = rng.integers(1, 1 << 20, n)
    return [
        Interval(f"t{i}", int(sizes[i]), int(min(a[i], b[i])), int(max(a[i], b[i])))
        for i in range(n)
    ]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_intervals(title: str, intervals: list[Interval]) -> None:
    bound, t_lb = timed(lower_bound, intervals, 64)
    print(f"\n{title}: {len(intervals)} intervals, lower bound {bound:,} B ({t_lb * 1e3:.1f} ms)")
    print(f"  DD no-reuse size: {dd_style_no_reuse_size(intervals):,} B")
    print(f"  {'strategy':<20} {'size (B)':>16} {'vs bound':>9} {'time (ms)':>10}")
    for name in ALL_STRATEGIES:
        alloc, t = timed(allocate, intervals, 64, (name,))
        print(f"  {name:<20} {alloc.size:>16,} {alloc.size / bound:>9.4f} {t * 1e3:>10.1f}")
    alloc, t = timed(allocate, intervals, 64, stop_at_bound=False)
    print(
        f"  {'ALL -> ' + alloc.strategy:<20} {alloc.size:>16,} {alloc.size / bound:>9.4f} {t * 1e3:>10.1f}"
    )


def bench_plan(intervals: list[Interval]) -> None:
    n = len(intervals)
    tensors = [
        TensorRequest("x", 4096, "input", 0, 0, (1024,), "float32"),
        *(
            TensorRequest(
                iv.name, iv.nbytes, "intermediate", iv.first, iv.last, (iv.nbytes,), "uint8"
            )
            for iv in intervals
        ),
        TensorRequest("y", 4096, "output", n - 1, n - 1, (1024,), "float32"),
    ]
    ops = {f"op{i}": 64 * (i % 7) for i in range(n)}
    plan, t = timed(build_plan, tensors, op_scratch=ops, op_consts=ops, op_params=ops)
    print(
        f"\nbuild_plan: {len(tensors)} tensors, {n} ops -> scratch {plan.scratch_bytes:,} B "
        f"(strategy {plan.strategy}) in {t * 1e3:.1f} ms"
    )
    _, t = timed(plan.validate)
    print(f"  validate(): {t * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of tensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", choices=["all", "network", "uniform", "plan"], default="all")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    network = network_trace(args.n, rng)
    if args.workload in ("all", "network"):
        bench_intervals("network", network)
    if args.workload in ("all", "uniform"):
        bench_intervals("uniform", uniform_trace(args.n, rng))
    if args.workload in ("all", "plan"):
        bench_plan(network)


if __name__ == "__main__":
    main()
