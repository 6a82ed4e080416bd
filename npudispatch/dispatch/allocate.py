"""Offset assignment for tensors with known lifetimes (the scratch-buffer packing problem).

Input is plain data: :class:`Interval` ``(name, nbytes, first, last)`` with *inclusive* op indices.
Two intervals may share bytes only when their lifetimes are disjoint. Finding the smallest arena is
NP-hard (dynamic storage allocation), so :func:`allocate` runs several classic greedy heuristics and
keeps the smallest result; :func:`lower_bound` gives the exact "max live bytes" bound to judge them.

Every strategy places intervals one at a time, in its own order, at the lowest aligned offset that
does not collide with an already placed interval whose lifetime intersects (TFLite / onnxruntime
arena style). Strategies differ only in the order:

* ``greedy_by_size`` — largest first, ties by first use;
* ``first_fit_in_order`` — by first use, then largest first (what a linear scan would do);
* ``greedy_by_breadth`` — TFLite's "by breadth": ops sorted by live bytes (breadth), largest first;
  tensors in order of the widest op they are live at, then largest first;
* ``greedy_by_area`` — by bytes × lifetime length, largest first.

Op indices are compressed to their distinct values first, so sparse or huge indices cost nothing.
Collision queries use one time-sorted list per lifetime-length class (powers of two), which keeps a
query proportional to the intervals it can actually meet instead of to everything placed so far.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from npudispatch.errors import PlanError
from npudispatch.overlay_abi import round_up

__all__ = [
    "ALL_STRATEGIES",
    "Allocation",
    "Interval",
    "allocate",
    "dd_style_no_reuse_size",
    "lower_bound",
]


@dataclass(frozen=True, slots=True)
class Interval:
    """A tensor of ``nbytes`` live from op ``first`` to op ``last`` (both inclusive)."""

    name: str
    nbytes: int
    first: int
    last: int


@dataclass(frozen=True)
class Allocation:
    """The best packing found: byte offset per interval name and the arena size it needs.

    ``size`` counts every interval rounded up to the alignment; ``tried`` maps each strategy that
    ran to the arena size it reached; ``lower_bound`` is :func:`lower_bound` of the same input.
    """

    offsets: dict[str, int]
    size: int
    strategy: str
    lower_bound: int
    tried: dict[str, int] = field(default_factory=dict)
    alignment: int = 64


@dataclass(frozen=True)
class _Problem:
    """Validated, index-compressed arrays shared by all strategies."""

    names: list[str]
    sizes: np.ndarray  # int64, rounded up to the alignment
    first: np.ndarray  # int64, compressed op index
    last: np.ndarray  # int64, compressed op index (inclusive)
    n_times: int  # number of distinct compressed op indices


def _check_alignment(alignment: int) -> None:
    if not isinstance(alignment, int) or alignment < 1:
        raise PlanError(f"alignment must be a positive integer, got {alignment!r}")


def _prepare(intervals: Sequence[Interval], alignment: int) -> _Problem:
    _check_alignment(alignment)
    seen: set[str] = set()
    for i, iv in enumerate(intervals):
        if iv.name in seen:
            raise PlanError(
                f"interval #{i} {iv.name!r}: duplicate name; give every tensor a unique name"
            )
        seen.add(iv.name)
        if iv.nbytes < 0:
            raise PlanError(f"interval #{i} {iv.name!r}: negative size {iv.nbytes} bytes")
        if iv.first > iv.last:
            raise PlanError(
                f"interval #{i} {iv.name!r}: first use (op {iv.first}) after last use "
                f"(op {iv.last}); lifetimes are inclusive [first, last] op indices"
            )
    n = len(intervals)
    sizes = np.fromiter((round_up(iv.nbytes, alignment) for iv in intervals), np.int64, n)
    raw_first = np.fromiter((iv.first for iv in intervals), np.int64, n)
    raw_last = np.fromiter((iv.last for iv in intervals), np.int64, n)
    # Order-preserving compression keeps exactly the same overlap relation.
    times = np.unique(np.concatenate([raw_first, raw_last]))
    return _Problem(
        names=[iv.name for iv in intervals],
        sizes=sizes,
        first=np.searchsorted(times, raw_first),
        last=np.searchsorted(times, raw_last),
        n_times=len(times),
    )


def _live_bytes(p: _Problem, sizes: np.ndarray) -> np.ndarray:
    """Bytes live at each compressed op index, exactly (integer prefix sums, no loops)."""
    times = np.arange(p.n_times)
    by_first = np.argsort(p.first, kind="stable")
    by_last = np.argsort(p.last, kind="stable")
    started = np.concatenate(([0], np.cumsum(sizes[by_first])))
    ended = np.concatenate(([0], np.cumsum(sizes[by_last])))
    live_from = started[np.searchsorted(p.first[by_first], times, side="right")]
    dead_by = ended[np.searchsorted(p.last[by_last], times, side="left")]
    return live_from - dead_by


def lower_bound(intervals: Sequence[Interval], alignment: int = 64) -> int:
    """Exact maximum, over all ops, of the bytes live at that op (sizes rounded to ``alignment``).

    No packing can be smaller; a packing of this size is optimal.
    """
    p = _prepare(intervals, alignment)
    return _lower_bound(p)


def _lower_bound(p: _Problem) -> int:
    if not p.names:
        return 0
    return int(_live_bytes(p, p.sizes).max())


def dd_style_no_reuse_size(intervals: Iterable[Interval], alignment: int = 4) -> int:
    """Scratch size without reuse, as DD lays intermediates out when ``optimize_scratch`` is off:
    every tensor back to back, each rounded up to 4 bytes."""
    _check_alignment(alignment)
    return sum(round_up(iv.nbytes, alignment) for iv in intervals)


# --- placement orders -------------------------------------------------------------------------


def _order_by_size(p: _Problem) -> np.ndarray:
    return np.lexsort((p.first, -p.sizes))


def _order_in_time(p: _Problem) -> np.ndarray:
    return np.lexsort((-p.sizes, p.first))


def _order_by_area(p: _Problem) -> np.ndarray:
    area = p.sizes * (p.last - p.first + 1)
    return np.lexsort((p.first, -p.sizes, -area))


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Vectorised min of ``values[lo[i]:hi[i] + 1]`` for every i (sparse table)."""
    table = [values]
    span = 1
    while 2 * span <= len(values):
        prev = table[-1]
        table.append(np.minimum(prev[:-span], prev[span:]))
        span *= 2
    length = hi - lo + 1
    level = np.floor(np.log2(length)).astype(np.int64)
    out = np.empty(len(lo), values.dtype)
    for k in np.unique(level):
        sel = level == k
        row = table[k]
        out[sel] = np.minimum(row[lo[sel]], row[hi[sel] - (1 << int(k)) + 1])
    return out


def _order_by_breadth(p: _Problem) -> np.ndarray:
    breadth = _live_bytes(p, p.sizes)
    rank = np.empty(p.n_times, np.int64)
    rank[np.argsort(-breadth, kind="stable")] = np.arange(p.n_times)
    # The first op (in breadth order) a tensor is live at is the widest op of its lifetime.
    widest = _range_min(rank, p.first, p.last)
    return np.lexsort((-p.sizes, widest))


_ORDERS: dict[str, Callable[[_Problem], np.ndarray]] = {
    "greedy_by_size": _order_by_size,
    "first_fit_in_order": _order_in_time,
    "greedy_by_breadth": _order_by_breadth,
    "greedy_by_area": _order_by_area,
}

ALL_STRATEGIES: tuple[str, ...] = tuple(_ORDERS)


# --- placement core ---------------------------------------------------------------------------

# Above this many collision candidates a vectorised scan over everything placed beats the
# per-candidate Python loop (measured with benchmarks/plan_bench.py).
_DENSE_CANDIDATES = 96


class _TimeIndex:
    """Placed intervals, bucketed by lifetime length class and sorted by first use.

    An interval in class ``c`` spans at most ``2**c - 1`` op indices, so one that overlaps
    ``[f, l]`` must start in ``[f - 2**c + 1, l]``: one bisect range per class.
    """

    def __init__(self) -> None:
        self._classes: dict[int, tuple[list[int], list[int]]] = {}

    def add(self, idx: int, first: int, last: int) -> None:
        firsts, items = self._classes.setdefault((last - first).bit_length(), ([], []))
        pos = bisect_right(firsts, first)
        firsts.insert(pos, first)
        items.insert(pos, idx)

    def overlapping(self, first: int, last: int, lasts: list[int]) -> list[int] | None:
        """Indices of placed intervals overlapping ``[first, last]``; ``None`` when there are
        more than ``_DENSE_CANDIDATES`` candidates (the caller then scans vectorised)."""
        ranges = []
        total = 0
        for cls, (firsts, items) in self._classes.items():
            lo = bisect_left(firsts, first - (1 << cls) + 1)
            hi = bisect_right(firsts, last)
            if hi > lo:
                ranges.append((items, lo, hi))
                total += hi - lo
        if total > _DENSE_CANDIDATES:
            return None
        return [j for items, lo, hi in ranges for j in items[lo:hi] if lasts[j] >= first]


class _OffsetTable:
    """Placed intervals as numpy rows (offset, end, first, last), kept sorted by offset.

    Rows are merged in lazily, so sparse workloads that never need a dense scan never pay for it.
    """

    def __init__(self, capacity: int) -> None:
        self._rows = np.empty((4, capacity), np.int64)
        self._count = 0
        self._pending: list[tuple[int, int, int, int]] = []

    def add(self, offset: int, end: int, first: int, last: int) -> None:
        self._pending.append((offset, end, first, last))

    def _merge(self) -> None:
        k = self._count
        if len(self._pending) <= 4:
            for row in self._pending:
                pos = int(self._rows[0, :k].searchsorted(row[0], side="right"))
                self._rows[:, pos + 1 : k + 1] = self._rows[:, pos:k]
                self._rows[:, pos] = row
                k += 1
        else:
            new = np.array(self._pending, np.int64).T
            rows = np.concatenate((self._rows[:, :k], new), axis=1)
            k = rows.shape[1]
            self._rows[:, :k] = rows[:, np.argsort(rows[0], kind="stable")]
        self._count = k
        self._pending.clear()

    def lowest_fit(self, first: int, last: int, size: int) -> int:
        """Lowest offset where ``size`` bytes collide with no interval live in [first, last]."""
        if self._pending:
            self._merge()
        offset, end, starts_at, ends_at = self._rows[:, : self._count]
        live = (starts_at <= last) & (ends_at >= first)
        starts = offset[live]
        if not len(starts) or starts[0] >= size:
            return 0
        reach = np.maximum.accumulate(end[live])  # highest byte used below each start
        fits = np.flatnonzero(starts[1:] - reach[:-1] >= size)
        return int(reach[fits[0]] if len(fits) else reach[-1])


def _place(p: _Problem, order: np.ndarray) -> tuple[list[int], int]:
    """Place intervals in ``order``; returns (offset per interval, arena size)."""
    n = len(p.names)
    sizes = p.sizes.tolist()
    firsts = p.first.tolist()
    lasts = p.last.tolist()
    offsets = [0] * n
    ends = [0] * n
    index = _TimeIndex()
    table = _OffsetTable(n)
    arena = 0
    for i in order.tolist():
        size = sizes[i]
        if size == 0:  # occupies no bytes: collides with nothing
            continue
        f, last = firsts[i], lasts[i]
        near = index.overlapping(f, last, lasts)
        if near is None:
            cursor = table.lowest_fit(f, last, size)
        else:
            cursor = 0
            for start, end in sorted((offsets[j], ends[j]) for j in near):
                if start - cursor >= size:
                    break
                cursor = max(cursor, end)
        offsets[i] = cursor
        ends[i] = cursor + size
        arena = max(arena, ends[i])
        index.add(i, f, last)
        table.add(cursor, cursor + size, f, last)
    return offsets, arena


def allocate(
    intervals: Sequence[Interval],
    alignment: int = 64,
    strategies: Sequence[str] = ALL_STRATEGIES,
    *,
    stop_at_bound: bool = True,
) -> Allocation:
    """Pack ``intervals`` into one arena; run every strategy and keep the smallest result.

    Offsets are multiples of ``alignment``; each interval reserves ``nbytes`` rounded up to it.
    Ties keep the earliest strategy in ``strategies``. With ``stop_at_bound`` the remaining
    strategies are skipped (and absent from ``tried``) once one reaches the lower bound. Raises :class:`PlanError` on an unknown
    strategy, duplicate names, negative sizes or inverted lifetimes.
    """
    if not strategies:
        raise PlanError(f"allocate: no strategy given; choose from {', '.join(ALL_STRATEGIES)}")
    unknown = [s for s in strategies if s not in _ORDERS]
    if unknown:
        raise PlanError(
            f"allocate: unknown strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}"
        )
    p = _prepare(intervals, alignment)
    bound = _lower_bound(p)
    tried: dict[str, int] = {}
    best: tuple[str, list[int], int] | None = None
    for name in dict.fromkeys(strategies):
        offsets, size = _place(p, _ORDERS[name](p))
        tried[name] = size
        if best is None or size < best[2]:
            best = (name, offsets, size)
        if stop_at_bound and size == bound:  # optimal: no other strategy can do better
            break
    assert best is not None
    name, offsets, size = best
    return Allocation(
        offsets=dict(zip(p.names, offsets, strict=True)),
        size=size,
        strategy=name,
        lower_bound=bound,
        tried=tried,
        alignment=alignment,
    )
