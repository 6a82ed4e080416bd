"""Interval allocation: exact lower bound, every strategy valid, best one kept."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npudispatch.dispatch.allocate as allocate_mod
from npudispatch.dispatch.allocate import (
    ALL_STRATEGIES,
    Interval,
    allocate,
    dd_style_no_reuse_size,
    lower_bound,
)
from npudispatch.errors import PlanError
from npudispatch.overlay_abi import round_up

# llama2-MLP intermediates (docs/architecture.md §6).
MLP = [
    Interval("Y0", 131_072, 0, 2),
    Interval("Y1", 131_072, 1, 3),
    Interval("Z0", 131_072, 2, 3),
    Interval("A", 131_072, 3, 4),
]


def brute_lower_bound(intervals: list[Interval], alignment: int) -> int:
    """Oracle: max over every op of the aligned bytes live there."""
    ops = {iv.first for iv in intervals}
    return max(
        (
            sum(round_up(iv.nbytes, alignment) for iv in intervals if iv.first <= t <= iv.last)
            for t in ops
        ),
        default=0,
    )


def assert_valid(intervals: list[Interval], offsets: dict[str, int], size: int, alignment: int):
    """Oracle: pairwise, no two time-overlapping non-empty intervals share a byte."""
    assert set(offsets) == {iv.name for iv in intervals}
    for iv in intervals:
        off = offsets[iv.name]
        assert off >= 0 and off % alignment == 0, (iv, off)
        assert off + round_up(iv.nbytes, alignment) <= size, (iv, off, size)
    for a, b in itertools.combinations(intervals, 2):
        if a.nbytes == 0 or b.nbytes == 0 or a.last < b.first or b.last < a.first:
            continue
        oa, ob = offsets[a.name], offsets[b.name]
        assert oa + a.nbytes <= ob or ob + b.nbytes <= oa, (a, oa, b, ob)


def test_llama_mlp_reaches_lower_bound_and_beats_dd():
    alloc = allocate(MLP, alignment=4)
    assert lower_bound(MLP, 4) == 393_216
    assert alloc.lower_bound == 393_216
    assert alloc.size == 393_216 < 401_408  # DD v3 needs 401,408 B
    assert dd_style_no_reuse_size(MLP) == 524_288
    assert_valid(MLP, alloc.offsets, alloc.size, 4)


def test_each_strategy_runs_and_tried_records_sizes():
    alloc = allocate(MLP, alignment=64, stop_at_bound=False)
    assert set(alloc.tried) == set(ALL_STRATEGIES)
    assert alloc.size == min(alloc.tried.values())
    assert alloc.tried[alloc.strategy] == alloc.size


def test_stop_at_bound_skips_remaining_strategies():
    alloc = allocate(MLP, alignment=64)
    assert list(alloc.tried) == [ALL_STRATEGIES[0]]  # greedy_by_size is already optimal here


def test_best_strategy_is_kept():
    # Size order is poor here: the big short tensor goes first at 0 and the long small ones stack
    # above it, while in time order the small ones fit below it.
    intervals = [
        Interval("big", 1000, 5, 5),
        Interval("s1", 100, 0, 9),
        Interval("s2", 100, 0, 3),
        Interval("s3", 100, 4, 9),
    ]
    alloc = allocate(intervals, alignment=1, stop_at_bound=False)
    assert alloc.size == min(alloc.tried.values())
    assert alloc.size == lower_bound(intervals, 1) == 1200
    assert_valid(intervals, alloc.offsets, alloc.size, 1)


def test_alignment_rounds_sizes_and_offsets():
    intervals = [Interval("a", 1, 0, 1), Interval("b", 65, 1, 2), Interval("c", 3, 2, 3)]
    alloc = allocate(intervals, alignment=64)
    assert lower_bound(intervals, 64) == 192
    assert all(off % 64 == 0 for off in alloc.offsets.values())
    assert alloc.size == 192


def test_sparse_op_indices_are_compressed():
    intervals = [Interval("a", 10, 0, 10**12), Interval("b", 10, 10**12, 10**15)]
    assert lower_bound(intervals, 1) == 20
    alloc = allocate(intervals, alignment=1)
    assert alloc.size == 20


def test_empty_and_zero_size():
    assert allocate([]).size == 0
    assert lower_bound([]) == 0
    alloc = allocate([Interval("z", 0, 0, 3), Interval("a", 8, 0, 3)], alignment=8)
    assert alloc.size == 8


@pytest.mark.parametrize(
    ("intervals", "kwargs", "match"),
    [
        ([Interval("a", 1, 0, 0), Interval("a", 1, 1, 1)], {}, "duplicate name"),
        ([Interval("a", -1, 0, 0)], {}, "negative size"),
        ([Interval("a", 1, 3, 2)], {}, "first use"),
        ([Interval("a", 1, 0, 0)], {"alignment": 0}, "alignment"),
        ([Interval("a", 1, 0, 0)], {"strategies": ("best_ever",)}, "unknown strategy 'best_ever'"),
        ([Interval("a", 1, 0, 0)], {"strategies": ()}, "no strategy"),
    ],
)
def test_bad_input_raises_plan_error(intervals, kwargs, match):
    with pytest.raises(PlanError, match=match):
        allocate(intervals, **kwargs)


@st.composite
def interval_sets(draw, max_size: int = 40):
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        first = draw(st.integers(0, 30))
        span = draw(st.integers(0, 12))
        nbytes = draw(st.integers(0, 5000))
        out.append(Interval(f"t{i}", nbytes, first, first + span))
    return out


@settings(max_examples=150, deadline=None)
@given(intervals=interval_sets(), alignment=st.sampled_from([1, 4, 64]))
def test_random_intervals_every_strategy_valid(intervals, alignment):
    bound = lower_bound(intervals, alignment)
    assert bound == brute_lower_bound(intervals, alignment)
    for name in ALL_STRATEGIES:
        alloc = allocate(intervals, alignment, (name,))
        assert alloc.strategy == name
        assert alloc.size >= bound
        assert_valid(intervals, alloc.offsets, alloc.size, alignment)
    best = allocate(intervals, alignment, stop_at_bound=False)
    assert best.size == min(best.tried.values())
    assert_valid(intervals, best.offsets, best.size, alignment)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_dense_vectorised_path_matches_sparse_path(monkeypatch, strategy):
    # 400 intervals over 40 ops: far more collision candidates than the threshold, so the numpy
    # scan is taken. Both paths compute the same lowest fit, so offsets must be identical.
    rng = np.random.default_rng(7)
    first = rng.integers(0, 40, 400)
    intervals = [
        Interval(f"t{i}", int(rng.integers(1, 5000)), int(f), int(f + rng.integers(0, 15)))
        for i, f in enumerate(first)
    ]
    calls = []
    original = allocate_mod._OffsetTable.lowest_fit

    def counting(self, *args):
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(allocate_mod._OffsetTable, "lowest_fit", counting)
    dense = allocate(intervals, 4, (strategy,))
    assert calls, "dense path never taken; the test no longer covers it"
    assert_valid(intervals, dense.offsets, dense.size, 4)

    monkeypatch.setattr(allocate_mod, "_DENSE_CANDIDATES", 10**9)
    calls.clear()
    sparse = allocate(intervals, 4, (strategy,))
    assert not calls
    assert sparse.offsets == dense.offsets
