"""Vectorized address generation against a literal per-element transcription of docs/txn_format.md §9."""

from __future__ import annotations

import numpy as np
from emu_progs import SHIM_BDS, reference_offsets
from hypothesis import given, settings

from npudispatch.emulator.addrgen import (
    base_byte_address,
    is_linear,
    iteration_index,
    pattern,
    word_offsets,
)
from npudispatch.txn.shim import ShimBd


@settings(max_examples=300, deadline=None)
@given(SHIM_BDS)
def test_word_offsets_match_reference(bd: ShimBd) -> None:
    assert word_offsets(bd).tolist() == reference_offsets(bd)


@settings(max_examples=300, deadline=None)
@given(SHIM_BDS)
def test_linear_fast_path_is_sound(bd: ShimBd) -> None:
    linear = np.array_equal(word_offsets(bd), np.arange(bd.length_words))
    if is_linear(bd):  # the slice fast path may only be taken for truly linear BDs
        assert linear
    pat = pattern(bd, 0)
    assert (pat.offsets is None) == is_linear(bd)
    if pat.offsets is not None:  # the strided blocks expand to exactly the reference order
        assert pat.offsets.tolist() == reference_offsets(bd)
    expected_span = (max(reference_offsets(bd)) + 1) if bd.length_words else 0
    assert pat.span_words == expected_span


def test_common_linear_shapes_take_fast_path() -> None:
    assert is_linear(ShimBd(length_words=100))
    assert is_linear(ShimBd(length_words=100, d0_wrap=10, d1_step=10))
    assert is_linear(ShimBd(length_words=100, d0_wrap=5, d1_wrap=4, d1_step=5, d2_step=20))
    assert not is_linear(ShimBd(length_words=100, d0_wrap=5, d1_wrap=4, d1_step=5, d2_step=21))


def test_iteration_advances_per_repeat_and_wraps() -> None:
    bd = ShimBd(
        length_words=4, address=0x1000, iteration_wrap=3, iteration_step=10, iteration_current=1
    )
    assert [iteration_index(bd, r) for r in range(5)] == [1, 2, 0, 1, 2]
    assert [base_byte_address(bd, r) for r in range(3)] == [0x1000 + 40, 0x1000 + 80, 0x1000]
    assert pattern(bd, 2).base_word == 0x1000 // 4


def test_corpus_weight_pattern_shape() -> None:
    """The mladf weight BD (AMD's corpus): d0 816x1, d1 44x816, d2 step 71808, 789,888 words."""
    bd = ShimBd(length_words=789_888, d0_wrap=816, d1_wrap=44, d1_step=816, d2_step=71_808)
    offs = word_offsets(bd)
    assert offs.size == 789_888
    # Each d2 block is 816*44 = 35,904 contiguous words, then jumps to the next 71,808 boundary.
    assert offs[35_903] == 35_903 and offs[35_904] == 71_808
    assert offs[-1] == 21 * 71_808 + 35_903
    assert pattern(bd, 0).offsets is not None
